//! The grid's supervisor: owns the applications' processes and their state, and answers the
//! requests of [`crate::protocol`] on `STATE/daemon.sock`.
//!
//! Every state change is written to `app.json` before it is acted on, so a restarted daemon finds
//! each application where it was: running applications whose processes are all alive are adopted
//! (and watched by polling), anything caught half-way is made safe (`starting` → `failed`,
//! `stopping` → `stopped`, processes killed). SIGTERM ends the daemon alone, leaving the
//! applications running for the next daemon; only the `Shutdown` request (`lab down`) stops them.
//!
//! By concern: this file holds the state and the request loop; [`lifecycle`] provisions, starts,
//! stops and destroys; [`supervise`] watches runs and restarts failed ones; [`leases`] holds
//! applications for export, import and staging; [`recovery`] loads the state at start-up and
//! stops everything at `lab down`.

mod leases;
mod lifecycle;
mod recovery;
mod supervise;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::Context;
use dialect::Command;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

use crate::model::{self, AppRecord};
use crate::protocol::{socket_path, Reply, Request};

struct Entry {
    rec: AppRecord,
    /// Export connections holding the application stopped.
    leases: u32,
    /// Bumped by every start and stop, so a watcher of an older run leaves the state alone.
    generation: u64,
    /// Automatic restarts since the last start someone asked for.
    restarts: u32,
}

#[derive(Default)]
struct Inner {
    apps: BTreeMap<String, Entry>,
    /// Names being provisioned or imported, not yet listed.
    reserved: BTreeSet<String>,
}

pub struct Daemon {
    state: PathBuf,
    inner: Mutex<Inner>,
    shutdown: Notify,
}

type Res = Result<String, String>;

/// Runs the daemon until a `Shutdown` request.
pub async fn run(state: PathBuf) -> anyhow::Result<()> {
    fs::create_dir_all(model::apps_dir(&state))
        .with_context(|| format!("creating {}", state.display()))?;
    fs::create_dir_all(state.join("templates"))?;
    let sock = socket_path(&state);
    if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
        anyhow::bail!("another gridctl daemon already serves {}", state.display());
    }
    let _ = fs::remove_file(&sock);
    let d = Arc::new(Daemon {
        state: state.clone(),
        inner: Mutex::new(Inner::default()),
        shutdown: Notify::new(),
    });
    d.load().context("loading the applications")?;
    let listener =
        UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    // Whoever can talk to the daemon runs the grid: root only.
    fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    tracing::info!(state = %state.display(), "gridctl daemon listening");
    loop {
        tokio::select! {
            _ = d.shutdown.notified() => break,
            acc = listener.accept() => match acc {
                Ok((s, _)) => { tokio::spawn(serve_conn(d.clone(), s)); }
                Err(e) => tracing::warn!("accept: {e}"),
            }
        }
    }
    let _ = fs::remove_file(&sock);
    tracing::info!("gridctl daemon stopped");
    Ok(())
}

async fn serve_conn(d: Arc<Daemon>, s: UnixStream) {
    let (r, mut w) = s.into_split();
    let mut lines = BufReader::new(r).lines();
    let mut leases: Vec<String> = Vec::new();
    let mut import: Option<String> = None;
    while let Ok(Some(line)) = lines.next_line().await {
        let req = serde_json::from_str::<Request>(&line);
        let shutdown = matches!(req, Ok(Request::Shutdown));
        let reply = match req {
            Err(e) => Reply::fail(2, format!("bad request: {e}")),
            Ok(req) => d.handle(req, &mut leases, &mut import).await,
        };
        let mut out = serde_json::to_vec(&reply).unwrap_or_default();
        out.push(b'\n');
        if w.write_all(&out).await.is_err() {
            break;
        }
        if shutdown {
            d.shutdown.notify_one();
        }
    }
    // The connection is gone: leases end, an uncommitted import is removed.
    let mut inner = d.lock();
    for name in leases {
        if let Some(e) = inner.apps.get_mut(&name) {
            e.leases = e.leases.saturating_sub(1);
        }
    }
    if let Some(name) = import {
        d.abort_import(&mut inner, &name);
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, String> {
    Err(msg.into())
}

impl Daemon {
    /// The applications' state, behind the one lock every request takes. A request that
    /// panicked while holding it (a bug) must not make every later request panic too, so a
    /// poisoned lock is taken all the same.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn handle(
        self: &Arc<Self>,
        req: Request,
        leases: &mut Vec<String>,
        import: &mut Option<String>,
    ) -> Reply {
        let done = |r: Res| match r {
            Ok(out) => Reply::ok(out),
            Err(e) => Reply::fail(1, e),
        };
        match req {
            Request::Ping => Reply::ok("pong\n"),
            Request::Command { line } => match Command::parse(&line) {
                Err(e) => Reply::fail(2, format!("refused: {e}")),
                Ok(cmd) => self.command(cmd).await,
            },
            Request::ExportBegin { app, live } => match self.export_begin(&app, live) {
                Ok((record, app_dir)) => {
                    leases.push(app);
                    Reply::Export { record, app_dir }
                }
                Err(e) => Reply::fail(1, e),
            },
            Request::ImportBegin { name } => {
                if import.is_some() {
                    return Reply::fail(2, "one import per connection");
                }
                match self.import_begin(&name) {
                    Ok(app_dir) => {
                        *import = Some(name);
                        Reply::Import { app_dir }
                    }
                    Err(e) => Reply::fail(1, e),
                }
            }
            Request::ImportCommit { record } => match import.take() {
                Some(name) if name == record.name => done(self.import_commit(record)),
                other => {
                    *import = other;
                    Reply::fail(2, "commit without a matching import")
                }
            },
            Request::ImportAbort => {
                if let Some(name) = import.take() {
                    let mut inner = self.lock();
                    self.abort_import(&mut inner, &name);
                }
                Reply::ok("")
            }
            Request::StageBegin { name } => match self.stage_begin(&name) {
                Ok((record, app_dir)) => {
                    leases.push(name);
                    Reply::Export { record, app_dir }
                }
                Err(e) => Reply::fail(1, e),
            },
            Request::StageCommit { record } => {
                if !leases.contains(&record.name) {
                    return Reply::fail(2, "commit of a staged copy this connection does not hold");
                }
                done(self.stage_commit(record))
            }
            Request::Shutdown => done(self.shutdown_apps().await),
        }
    }

    async fn command(self: &Arc<Self>, cmd: Command) -> Reply {
        let r = match cmd {
            Command::List { batch } => Ok(self.list(batch)),
            Command::Info { name, batch } => self.with_app(name.as_str(), |e| {
                Ok(if batch {
                    e.rec.info_batch()
                } else {
                    e.rec.info_human()
                })
            }),
            Command::Provision {
                template,
                name,
                props,
            } => {
                self.provision(template.as_str(), name.as_str(), &props)
                    .await
            }
            Command::Start { name } => {
                let _ = self.with_app(name.as_str(), |e| {
                    e.restarts = 0;
                    Ok(())
                });
                self.start(name.as_str()).await
            }
            Command::Stop { name } => self.stop(name.as_str()).await,
            Command::Destroy { name } => self.destroy(name.as_str()).await,
            Command::Config { name, props } => self.config(name.as_str(), &props),
            Command::Checksum { name } => self.checksum(name.as_str()).await,
            Command::Grid { batch } => self.grid(batch),
            Command::Migrate { .. } | Command::MigrateCheck { .. } => {
                return Reply::fail(
                    2,
                    "refused: app migrate is run by gridctl ssh, not the daemon",
                )
            }
        };
        match r {
            Ok(out) => Reply::ok(out),
            Err(e) => Reply::fail(1, e),
        }
    }

    fn with_app<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut Entry) -> Result<T, String>,
    ) -> Result<T, String> {
        let mut inner = self.lock();
        match inner.apps.get_mut(name) {
            Some(e) => f(e),
            None => err(format!("no application named {name} on this grid")),
        }
    }

    fn persist(&self, rec: &AppRecord) {
        if let Err(e) = rec.save(&self.state) {
            tracing::error!(app = %rec.name, "cannot save app.json: {e}");
        }
    }

    fn list(&self, batch: bool) -> String {
        let inner = self.lock();
        let mut s = String::new();
        if !batch {
            s.push_str(&format!("{:<24} {:<9} {}\n", "NAME", "STATE", "TEMPLATE"));
        }
        for e in inner.apps.values() {
            if batch {
                s.push_str(&format!(
                    "{}\t{}\t{}\n",
                    e.rec.name, e.rec.state, e.rec.template
                ));
            } else {
                s.push_str(&format!(
                    "{:<24} {:<9} {}\n",
                    e.rec.name, e.rec.state, e.rec.template
                ));
            }
        }
        s
    }

    /// `app grid`: what a new application needs of this grid, for MIG's dry run: the room for
    /// volumes (free bytes of the state directory's file system), the templates, and the IP
    /// addresses the applications' properties hold.
    fn grid(&self, batch: bool) -> Res {
        let st = nix::sys::statvfs::statvfs(&self.state).map_err(|e| {
            format!(
                "cannot read the free space of {}: {e}",
                self.state.display()
            )
        })?;
        #[allow(clippy::unnecessary_cast)] // the field types differ by platform
        let free = st.blocks_available() as u64 * st.fragment_size() as u64;
        let mut templates: Vec<String> = std::fs::read_dir(self.state.join("templates"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().to_string();
                        n.strip_suffix(".toml").map(str::to_string)
                    })
                    .collect()
            })
            .unwrap_or_default();
        templates.sort();
        let addresses: std::collections::BTreeSet<String> = {
            let inner = self.lock();
            inner
                .apps
                .values()
                .flat_map(|e| e.rec.props.values())
                .filter_map(|v| {
                    let host = v.rsplit_once(':').map_or(v.as_str(), |(h, _)| h);
                    host.parse::<std::net::IpAddr>()
                        .ok()
                        .map(|ip| ip.to_string())
                })
                .collect()
        };
        let mut out = String::new();
        let sep = if batch { "\t" } else { ": " };
        out.push_str(&format!("free_bytes{sep}{free}\n"));
        for t in &templates {
            out.push_str(&format!("template{sep}{t}\n"));
        }
        for a in &addresses {
            out.push_str(&format!("address{sep}{a}\n"));
        }
        Ok(out)
    }

    fn reserve(&self, name: &str) -> Result<(), String> {
        let mut inner = self.lock();
        if inner.apps.contains_key(name) || inner.reserved.contains(name) {
            return err(format!(
                "an application named {name} already exists on this grid"
            ));
        }
        inner.reserved.insert(name.to_string());
        Ok(())
    }
}
