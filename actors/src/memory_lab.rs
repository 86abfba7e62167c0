//! An in-memory stand-in for a set of grids, for tests: same validation, same errors, no SSH.
//! Grids of one [`MemoryLab`] can `migrate_import` from each other. A test double: compiled only
//! for this crate's tests and, with the `test-support` feature, for other crates' tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use dialect::{AppState, Command, Controller, DialectError};

use crate::controller::*;

#[derive(Debug, Clone)]
struct App {
    state: AppState,
    template: String,
    props: Vec<(String, String)>,
    volumes: Vec<(String, Vec<u8>)>,
    /// A staged copy (`--stage`): listed, never started, until `--delta` completes it.
    staged: bool,
}

#[derive(Debug, Default)]
struct Grid {
    apps: BTreeMap<String, App>,
    log: Vec<String>,
    /// (verb, name, exit code, stderr): the next matching command fails, once.
    failures: Vec<(String, String, i32, String)>,
}

/// Grids keyed by `host:port`.
#[derive(Debug, Clone, Default)]
pub struct MemoryLab {
    grids: Arc<Mutex<BTreeMap<String, Grid>>>,
}

fn key(c: &Controller) -> String {
    format!("{}:{}", c.host, c.port_or_default())
}

impl MemoryLab {
    pub fn new() -> Self {
        Self::default()
    }

    /// The grid behind `controller` (e.g. `"127.0.1.1:2222"`), created empty on first use.
    pub fn grid(&self, controller: &str) -> MemoryGrid {
        let controller: Controller = controller.parse().expect("a valid controller address");
        self.lock().entry(key(&controller)).or_default();
        MemoryGrid {
            lab: self.clone(),
            controller,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Grid>> {
        self.grids.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One grid of a [`MemoryLab`].
#[derive(Debug, Clone)]
pub struct MemoryGrid {
    lab: MemoryLab,
    controller: Controller,
}

impl MemoryGrid {
    /// Adds (or replaces) an application, e.g. the one a test migrates.
    pub fn put_app(
        &self,
        name: &str,
        template: &str,
        state: AppState,
        props: &[(&str, &str)],
        volumes: &[(&str, &[u8])],
    ) {
        let app = App {
            state,
            template: template.into(),
            props: props
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            volumes: volumes
                .iter()
                .map(|(n, d)| (n.to_string(), d.to_vec()))
                .collect(),
            staged: false,
        };
        self.with(|g| g.apps.insert(name.to_string(), app));
    }

    /// The next command `verb` on `name` fails with this exit code and stderr.
    pub fn fail_next(&self, verb: &str, name: &str, exit_code: i32, stderr: &str) {
        self.with(|g| {
            g.failures
                .push((verb.into(), name.into(), exit_code, stderr.into()))
        });
    }

    /// The command lines this grid received, in order.
    pub fn log(&self) -> Vec<String> {
        self.with(|g| g.log.clone())
    }

    /// Names of the applications on this grid.
    pub fn app_names(&self) -> Vec<String> {
        self.with(|g| g.apps.keys().cloned().collect())
    }

    /// The contents of a volume, to check that bytes arrived.
    pub fn volume(&self, app: &str, volume: &str) -> Option<Vec<u8>> {
        self.with(|g| {
            g.apps
                .get(app)?
                .volumes
                .iter()
                .find(|(n, _)| n == volume)
                .map(|(_, d)| d.clone())
        })
    }

    fn with<R>(&self, f: impl FnOnce(&mut Grid) -> R) -> R {
        let mut grids = self.lab.lock();
        f(grids.get_mut(&key(&self.controller)).expect("grid exists"))
    }

    fn failed(&self, cmd: &Command, exit_code: i32, stderr: String) -> GridError {
        GridError::Command {
            addr: self.controller.to_string(),
            command: cmd.to_command_line(),
            exit_code: Some(exit_code),
            status: format!("exited with code {exit_code}"),
            stderr,
        }
    }

    /// Logs `cmd`, applies an injected failure, else runs `f` on this grid.
    fn run<R>(
        &self,
        cmd: Result<Command, DialectError>,
        name: &str,
        f: impl FnOnce(&mut Grid) -> Result<R, String>,
    ) -> Result<R, GridError> {
        let cmd = cmd?;
        let injected = self.with(|g| {
            g.log.push(cmd.to_command_line());
            let i = g
                .failures
                .iter()
                .position(|(v, n, _, _)| v == cmd.verb() && n == name)?;
            Some(g.failures.remove(i))
        });
        if let Some((_, _, code, stderr)) = injected {
            return Err(self.failed(&cmd, code, stderr));
        }
        self.with(f).map_err(|e| self.failed(&cmd, 1, e))
    }
}

fn app<'g>(g: &'g mut Grid, name: &str) -> Result<&'g mut App, String> {
    g.apps
        .get_mut(name)
        .ok_or_else(|| format!("no such application {name}"))
}

impl GridController for MemoryGrid {
    fn controller(&self) -> &Controller {
        &self.controller
    }

    fn list(&self) -> GridFuture<'_, Vec<AppSummary>> {
        let r = self.run(Ok(commands::list()), "", |g| {
            Ok(g.apps
                .iter()
                .map(|(n, a)| AppSummary {
                    name: n.clone(),
                    state: a.state,
                    template: a.template.clone(),
                })
                .collect())
        });
        Box::pin(std::future::ready(r))
    }

    fn info<'a>(&'a self, name: &'a str) -> GridFuture<'a, AppInfo> {
        let r = self.run(commands::info(name), name, |g| {
            let a = app(g, name)?;
            Ok(AppInfo {
                name: name.to_string(),
                state: a.state,
                template: a.template.clone(),
                error: None,
                props: a.props.clone(),
                volumes: a
                    .volumes
                    .iter()
                    .map(|(n, d)| (n.clone(), d.len() as u64))
                    .collect(),
                extra: if a.staged {
                    vec![("staged".into(), "true".into())]
                } else {
                    Vec::new()
                },
            })
        });
        Box::pin(std::future::ready(r))
    }

    fn provision<'a>(
        &'a self,
        template: &'a str,
        name: &'a str,
        props: &'a [(String, String)],
    ) -> GridFuture<'a, ()> {
        let r = self.run(commands::provision(template, name, props), name, |g| {
            if g.apps.contains_key(name) {
                return Err(format!("application {name} already exists"));
            }
            g.apps.insert(
                name.to_string(),
                App {
                    state: AppState::Running,
                    template: template.to_string(),
                    props: props.to_vec(),
                    volumes: Vec::new(),
                    staged: false,
                },
            );
            Ok(())
        });
        Box::pin(std::future::ready(r))
    }

    fn start<'a>(&'a self, name: &'a str) -> GridFuture<'a, ()> {
        let r = self.run(commands::start(name), name, |g| {
            let a = app(g, name)?;
            if a.staged {
                return Err(format!("cannot start {name}: it is a staged copy"));
            }
            a.state = AppState::Running;
            Ok(())
        });
        Box::pin(std::future::ready(r))
    }

    fn stop<'a>(&'a self, name: &'a str) -> GridFuture<'a, ()> {
        let r = self.run(commands::stop(name), name, |g| {
            app(g, name)?.state = AppState::Stopped;
            Ok(())
        });
        Box::pin(std::future::ready(r))
    }

    fn destroy<'a>(&'a self, name: &'a str) -> GridFuture<'a, ()> {
        let r = self.run(commands::destroy(name), name, |g| {
            if app(g, name)?.state != AppState::Stopped {
                return Err(format!("application {name} is not stopped"));
            }
            g.apps.remove(name);
            Ok(())
        });
        Box::pin(std::future::ready(r))
    }

    fn config<'a>(&'a self, name: &'a str, props: &'a [(String, String)]) -> GridFuture<'a, ()> {
        let r = self.run(commands::config(name, props), name, |g| {
            let a = app(g, name)?;
            // As gridctl: properties change only while the application is stopped.
            if a.state != AppState::Stopped {
                return Err(format!(
                    "cannot configure {name}: it is running; stop it first"
                ));
            }
            for (n, v) in props {
                match a.props.iter_mut().find(|(k, _)| k == n) {
                    Some(p) => p.1 = v.clone(),
                    None => a.props.push((n.clone(), v.clone())),
                }
            }
            Ok(())
        });
        Box::pin(std::future::ready(r))
    }

    fn migrate_import<'a>(
        &'a self,
        remote: &'a Controller,
        app_name: &'a str,
        new_name: &'a str,
        props: &'a [(String, String)],
        opts: MigrateOptions,
        progress: ProgressFn<'a>,
    ) -> GridFuture<'a, ()> {
        let cmd = commands::migrate_import(remote, app_name, new_name, props, opts);
        // Read the source first: the lab lock is not re-entrant.
        let source = self
            .lab
            .lock()
            .get(&key(remote))
            .map(|g| g.apps.get(app_name).cloned());
        let r = self.run(cmd, new_name, |g| {
            let mut a = match source {
                None => return Err(format!("unknown remote controller {remote}")),
                Some(None) => return Err(format!("{remote} has no application {app_name}")),
                Some(Some(a)) => a,
            };
            // As gridctl: only the pre-copy reads a running source.
            if a.state != AppState::Stopped && !opts.stage {
                return Err(format!("source application {app_name} is not stopped"));
            }
            let mut moved = None;
            if opts.delta {
                let staged = g
                    .apps
                    .get(new_name)
                    .filter(|t| t.staged)
                    .ok_or_else(|| format!("{new_name} is not a staged copy"))?;
                moved = Some(
                    a.volumes
                        .iter()
                        .filter(|v| !staged.volumes.contains(v))
                        .map(|(_, d)| d.len() as u64)
                        .sum::<u64>(),
                );
            } else if g.apps.contains_key(new_name) {
                return Err(format!("application {new_name} already exists"));
            }
            a.state = AppState::Stopped;
            a.staged = opts.stage;
            if opts.novols {
                a.volumes.clear();
            }
            for (n, v) in props {
                match a.props.iter_mut().find(|(k, _)| k == n) {
                    Some(p) => p.1 = v.clone(),
                    None => a.props.push((n.clone(), v.clone())),
                }
            }
            let total =
                moved.unwrap_or_else(|| a.volumes.iter().map(|(_, d)| d.len() as u64).sum());
            progress(0, total);
            progress(total, total);
            g.apps.insert(new_name.to_string(), a);
            Ok(())
        });
        Box::pin(std::future::ready(r))
    }

    /// Every template any application of the lab uses, and MigHelper; room to spare; the
    /// addresses this grid's applications hold.
    fn grid_summary(&self) -> GridFuture<'_, GridSummary> {
        let mut templates: Vec<String> = self
            .lab
            .lock()
            .values()
            .flat_map(|g| g.apps.values().map(|a| a.template.clone()))
            .chain(["MigHelper".to_string()])
            .collect();
        templates.sort();
        templates.dedup();
        let r = self.run(Ok(commands::grid()), "", |g| {
            Ok(GridSummary {
                free_bytes: 1 << 40,
                templates,
                addresses: g
                    .apps
                    .values()
                    .flat_map(|a| a.props.iter().map(|(_, v)| v.clone()))
                    .filter(|v| v.parse::<std::net::IpAddr>().is_ok())
                    .collect(),
            })
        });
        Box::pin(std::future::ready(r))
    }

    fn check_import<'a>(
        &'a self,
        remote: &'a Controller,
        app_name: &'a str,
        new_name: &'a str,
    ) -> GridFuture<'a, ()> {
        let cmd = commands::check_import(remote, app_name, new_name);
        let has = self
            .lab
            .lock()
            .get(&key(remote))
            .map(|g| g.apps.contains_key(app_name));
        let r = self.run(cmd, new_name, |g| match has {
            None => Err(format!("unknown remote controller {remote}")),
            Some(false) => Err(format!("{remote} has no application {app_name}")),
            Some(true) if g.apps.contains_key(new_name) => {
                Err(format!("application {new_name} already exists"))
            }
            Some(true) => Ok(()),
        });
        Box::pin(std::future::ready(r))
    }
    fn checksum<'a>(&'a self, name: &'a str) -> GridFuture<'a, Vec<VolumeChecksum>> {
        let r = self.run(commands::checksum(name), name, |g| {
            Ok(app(g, name)?
                .volumes
                .iter()
                .map(|(n, d)| VolumeChecksum {
                    volume: n.clone(),
                    size: d.len() as u64,
                    blake3: blake3::hash(d).to_hex().to_string(),
                })
                .collect())
        });
        Box::pin(std::future::ready(r))
    }
}

/// Tests reach in-memory grids the way the runner reaches real ones.
impl crate::runner::Connect for MemoryLab {
    fn connect(&self, controller: &str) -> Result<Arc<dyn GridController>, String> {
        controller
            .parse::<dialect::Controller>()
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(self.grid(controller)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dialect::{AppState, Controller};

    #[tokio::test]
    async fn memory_grids_behave_like_a_controller() {
        let lab = MemoryLab::new();
        let g1 = lab.grid("127.0.1.1:2222");
        let g2 = lab.grid("127.0.2.1:2222");
        g1.put_app(
            "shop",
            "kvstore",
            AppState::Running,
            &[("in_ip", "127.0.1.10")],
            &[("data", b"hello")],
        );
        let remote: Controller = "127.0.1.1:2222".parse().unwrap();
        let over = |n: &str, v: &str| vec![(n.to_string(), v.to_string())];
        let none = &mut |_, _| {};

        // The source must be stopped.
        let e = g2
            .migrate_import(
                &remote,
                "shop",
                "shop",
                &[],
                MigrateOptions::default(),
                none,
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not stopped"), "{e}");
        g1.stop("shop").await.unwrap();
        let mut seen = Vec::new();
        g2.migrate_import(
            &remote,
            "shop",
            "shop",
            &over("in_ip", "127.0.2.10"),
            MigrateOptions::default(),
            &mut |d, t| seen.push((d, t)),
        )
        .await
        .unwrap();
        assert_eq!(seen.last(), Some(&(5, 5)));
        let info = g2.info("shop").await.unwrap();
        assert_eq!(
            (info.state, info.prop("in_ip")),
            (AppState::Stopped, Some("127.0.2.10"))
        );
        assert_eq!(g2.volume("shop", "data").as_deref(), Some(&b"hello"[..]));
        assert_eq!(
            g1.checksum("shop").await.unwrap(),
            g2.checksum("shop").await.unwrap()
        );

        // Injected failures, refused names, and the log of what was sent.
        g2.fail_next("start", "shop", 1, "component web failed");
        let e = g2.start("shop").await.unwrap_err();
        assert!(
            matches!(&e, GridError::Command { exit_code: Some(1), stderr, .. } if stderr == "component web failed")
        );
        g2.start("shop").await.unwrap();
        assert!(matches!(g2.stop("$(id)").await, Err(GridError::Invalid(_))));
        assert_eq!(
            g2.log().last().unwrap(),
            "app start shop",
            "refused before sending"
        );
        assert!(g2.config("shop", &over("port", "1")).await.is_err());
        assert!(
            g2.destroy("shop").await.is_err(),
            "running apps are not destroyed"
        );
        g1.destroy("shop").await.unwrap();
        assert!(g1.app_names().is_empty());
    }
}
