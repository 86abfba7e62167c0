//! The dry run: every check an operation needs of the grids, run without changing anything on
//! any of them (`POST /api/v1/ops` with `"dry_run": true`, `mig migrate|snapshot --dry-run`, the
//! form's Check button). A real start runs the same checks first and refuses with the list when
//! one fails. Each failed check's detail says what to fix.

use serde::{Deserialize, Serialize};

use crate::controller::{AppInfo, AppSummary, GridSummary};
use crate::op::{Kind, Plan, HELPER_TEMPLATE};
use crate::properties::Mode;
use crate::runner::StepRunner;

/// One check, as the API and the CLI show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// The checks' names, stable for scripts.
pub const MODE: &str = "mode";
pub const SOURCE_CONTROLLER: &str = "source controller";
pub const TARGET_CONTROLLER: &str = "target controller";
pub const SOURCE_APP: &str = "source application";
pub const TARGET_NAME: &str = "target name";
pub const TEMPLATES: &str = "templates";
pub const PULL_TRUST: &str = "pull trust";
pub const ROOM: &str = "room";
pub const ADDRESSES: &str = "addresses";

fn check(name: &str, r: Result<String, String>) -> Check {
    let (ok, detail) = match r {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    Check {
        name: name.to_string(),
        ok,
        detail,
    }
}

/// Runs every check of a `kind` operation with `plan` (its addresses from grid.info); `mode` is
/// this MIG's. Only reads: `app list`, `app info`, `app grid` and `app migrate … --check`.
pub async fn run(runner: &StepRunner, mode: Mode, kind: Kind, plan: &Plan) -> Vec<Check> {
    let mut out = vec![check(
        MODE,
        if mode.allows(kind.as_str()) {
            Ok(format!("this MIG's mode allows {}", kind.as_str()))
        } else {
            Err(format!(
                "this MIG's mode does not allow {}: set the mode property to {} or both",
                kind.as_str(),
                kind.as_str()
            ))
        },
    )];
    let (src, dst) = (
        runner.grid(&plan.source_controller),
        runner.grid(&plan.target_controller),
    );
    let (src, dst) = match (src, dst) {
        (Ok(s), Ok(d)) => (s, d),
        (s, d) => {
            for (name, r) in [(SOURCE_CONTROLLER, s.err()), (TARGET_CONTROLLER, d.err())] {
                out.push(check(
                    name,
                    r.map_or(Ok("address is valid".into()), |e| {
                        Err(format!("fix its address in grid.info: {e}"))
                    }),
                ));
            }
            return out;
        }
    };
    // One grid's commands one after the other: at the same time they would each take a session,
    // and an instance logs in to a grid once for all its commands.
    let (src_list, (dst_list, dst_grid)) = tokio::join!(src.list(), async {
        (dst.list().await, dst.grid_summary().await)
    });
    let controller = |role: &str, grid: &str, c: &str, r: &Result<Vec<AppSummary>, _>| {
        match r {
        Ok(_) => Ok(format!("{role} grid {grid}'s controller {c} answered with its pinned host key and took the application's key")),
        Err(e) => Err(format!("{e}")),
    }
    };
    out.push(check(
        SOURCE_CONTROLLER,
        controller(
            "source",
            &plan.source_grid,
            &plan.source_controller,
            &src_list,
        ),
    ));
    out.push(check(
        TARGET_CONTROLLER,
        controller(
            "target",
            &plan.target_grid,
            &plan.target_controller,
            &dst_list,
        ),
    ));
    fn not_checked<T>(what: &str) -> Result<T, String> {
        Err(format!("not checked: the {what} controller did not answer"))
    }

    // The source application, and its size and template.
    let source: Option<AppSummary> = src_list
        .as_ref()
        .ok()
        .and_then(|l| l.iter().find(|a| a.name == plan.source_app).cloned());
    let info: Option<AppInfo> = match &source {
        Some(_) => src.info(&plan.source_app).await.ok(),
        None => None,
    };
    out.push(check(
        SOURCE_APP,
        match (&src_list, &source) {
            (Err(_), _) => not_checked("source"),
            (Ok(_), None) => Err(format!(
                "grid {} has no application {}: check the app_name property",
                plan.source_grid, plan.source_app
            )),
            (Ok(_), Some(a)) => Ok(format!(
                "grid {} has {} ({}, template {})",
                plan.source_grid,
                a.name,
                a.state.as_str(),
                a.template
            )),
        },
    ));
    out.push(check(
        TARGET_NAME,
        match &dst_list {
            Err(_) => not_checked("target"),
            Ok(l) if l.iter().any(|a| a.name == plan.target_app) => Err(format!(
                "grid {} already has an application {}: pick another target name",
                plan.target_grid, plan.target_app
            )),
            Ok(_) => Ok(format!(
                "{} is free on grid {}",
                plan.target_app, plan.target_grid
            )),
        },
    ));
    let dst_grid: Result<GridSummary, String> = match (&dst_list, dst_grid) {
        (Err(_), _) => not_checked("target"),
        (Ok(_), r) => r.map_err(|e| {
            format!("{e} (the dry run needs `app grid --batch` on the target controller)")
        }),
    };
    out.push(check(
        TEMPLATES,
        dst_grid.as_ref().map_err(Clone::clone).and_then(|g| {
            let mut want = vec![HELPER_TEMPLATE.to_string()];
            want.extend(source.as_ref().map(|a| a.template.clone()));
            let missing: Vec<&String> = want.iter().filter(|t| !g.templates.contains(t)).collect();
            if missing.is_empty() {
                Ok(format!(
                    "grid {} has template{} {}",
                    plan.target_grid,
                    if want.len() == 1 { "" } else { "s" },
                    want.join(" and ")
                ))
            } else {
                Err(format!(
                    "grid {} lacks template {}: install {} on its controller",
                    plan.target_grid,
                    join(&missing),
                    if missing.len() == 1 { "it" } else { "them" }
                ))
            }
        }),
    ));
    out.push(check(
        PULL_TRUST,
        match (&src_list, &dst_list, &source) {
            (Err(_), _, _) => not_checked("source"),
            (_, Err(_), _) => not_checked("target"),
            (_, _, None) => Err("not checked: no source application to pull".into()),
            _ => match plan.source_controller.parse::<dialect::Controller>() {
                Err(e) => Err(e.to_string()),
                Ok(remote) => dst
                    .check_import(&remote, &plan.source_app, &plan.target_app)
                    .await
                    .map(|()| {
                        format!(
                            "grid {} reached grid {}'s controller with its own key and may pull {}",
                            plan.target_grid, plan.source_grid, plan.source_app
                        )
                    })
                    .map_err(|e| {
                        format!(
                            "{e}: grid {} must pin grid {}'s host key and be allowed to export from it (the grids' own SSH trust)",
                            plan.target_grid, plan.source_grid
                        )
                    }),
            },
        },
    ));
    out.push(check(
        ROOM,
        match (&dst_grid, &info) {
            (Err(e), _) => Err(e.clone()),
            (_, None) => Err("not checked: the source application's volumes are unknown".into()),
            (Ok(g), Some(i)) => {
                let need: u64 = i.volumes.iter().map(|(_, n)| n).sum();
                if need <= g.free_bytes {
                    Ok(format!(
                        "grid {} has {} bytes free for the {need} bytes of {}'s volumes",
                        plan.target_grid, g.free_bytes, plan.source_app
                    ))
                } else {
                    Err(format!(
                        "grid {} has {} bytes free, {}'s volumes need {need}: free space on it, or pick another grid",
                        plan.target_grid, g.free_bytes, plan.source_app
                    ))
                }
            }
        },
    ));
    out.push(check(
        ADDRESSES,
        dst_grid.as_ref().map_err(Clone::clone).and_then(|g| {
            let ours: Vec<(&str, &String)> = [
                ("MigHelper_config", &plan.helper_config),
                ("app_config", &plan.target_app_config),
            ]
            .into_iter()
            .flat_map(|(what, props)| {
                props
                    .iter()
                    .filter(|(k, _)| k.ends_with("_ip"))
                    .map(move |(_, v)| (what, v))
            })
            .collect();
            let taken: Vec<String> = ours
                .iter()
                .filter(|(_, v)| g.addresses.contains(v))
                .map(|(what, v)| format!("{v} ({what})"))
                .collect();
            if taken.is_empty() {
                Ok(format!(
                    "no application on grid {} uses {}",
                    plan.target_grid,
                    ours.iter()
                        .map(|(_, v)| v.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            } else {
                Err(format!(
                    "grid {} already uses {}: change MigHelper_config or app_config for grid {} in grid.info, or free the address",
                    plan.target_grid,
                    taken.join(", "),
                    plan.target_grid
                ))
            }
        }),
    ));
    out
}

fn join(v: &[&String]) -> String {
    v.iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(" and ")
}

/// The failed checks as one line each, for an error text.
pub fn failures(checks: &[Check]) -> String {
    checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::book::OpBook;
    use crate::memory_lab::MemoryLab;
    use crate::test_support::shop_lab;
    use dialect::AppState;

    fn plan() -> Plan {
        let mut p = crate::op::tests::plan();
        p.target_app_config = vec![("in_ip".into(), "127.0.2.10".into())];
        p
    }

    fn runner(dir: &std::path::Path, lab: &MemoryLab) -> StepRunner {
        let book = OpBook::open(crate::journal::Journal::open(dir).unwrap()).unwrap();
        StepRunner::new(book, Arc::new(lab.clone()))
    }

    fn failed(checks: &[Check]) -> Vec<&str> {
        checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.as_str())
            .collect()
    }

    #[tokio::test]
    async fn every_check_passes_when_nothing_is_wrong_and_nothing_changes() {
        let dir = tempfile::tempdir().unwrap();
        let lab = shop_lab("127.0.2.1:2222", b"abc");
        let d = runner(dir.path(), &lab);
        let checks = run(&d, Mode::Both, Kind::Migrate, &plan()).await;
        assert_eq!(failed(&checks), [] as [&str; 0], "{checks:#?}");
        assert_eq!(
            checks.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            [
                MODE,
                SOURCE_CONTROLLER,
                TARGET_CONTROLLER,
                SOURCE_APP,
                TARGET_NAME,
                TEMPLATES,
                PULL_TRUST,
                ROOM,
                ADDRESSES
            ]
        );
        assert_eq!(lab.grid("127.0.1.1:2222").app_names(), ["shop"]);
        assert!(
            lab.grid("127.0.2.1:2222").app_names().is_empty(),
            "nothing made"
        );
    }

    #[tokio::test]
    async fn each_failure_is_named_with_what_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let lab = shop_lab("127.0.2.1:2222", b"abc");
        lab.grid("127.0.2.1:2222").put_app(
            "shop2",
            "demoapp",
            AppState::Stopped,
            &[("in_ip", "127.0.2.10")],
            &[],
        );
        let d = runner(dir.path(), &lab);
        let checks = run(&d, Mode::Snapshot, Kind::Migrate, &plan()).await;
        assert_eq!(
            failed(&checks),
            [MODE, TARGET_NAME, PULL_TRUST, ADDRESSES],
            "{checks:#?}"
        );
        let detail = |n: &str| checks.iter().find(|c| c.name == n).unwrap().detail.clone();
        assert!(detail(MODE).contains("set the mode property"));
        assert!(detail(TARGET_NAME).contains("pick another target name"));
        assert!(detail(ADDRESSES).contains("127.0.2.10 (app_config)"));
    }
}
