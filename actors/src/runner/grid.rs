//! The idempotent grid commands the steps are made of: each reads the real state first, so a step
//! run again after a restart does only what is left; and the text of a leftover's manual command.

use dialect::AppState;

use super::{StepError, MARK};
use crate::controller::GridController;

/// The state of `name` on `grid`, `None` when the grid has no such application.
pub async fn app_state(
    grid: &dyn GridController,
    name: &str,
) -> Result<Option<AppState>, StepError> {
    let apps = grid.list().await?;
    Ok(apps.into_iter().find(|a| a.name == name).map(|a| a.state))
}

/// Stops `name` unless it is already stopped (or absent). Idempotent.
pub async fn ensure_stopped(grid: &dyn GridController, name: &str) -> Result<(), StepError> {
    match app_state(grid, name).await? {
        None | Some(AppState::Stopped) => Ok(()),
        Some(_) => Ok(grid.stop(name).await?),
    }
}

/// Starts `name` unless it is already running. Idempotent.
pub async fn ensure_running(grid: &dyn GridController, name: &str) -> Result<(), StepError> {
    match app_state(grid, name).await? {
        Some(AppState::Running) => Ok(()),
        None => Err(StepError::permanent(format!(
            "application {name} does not exist on {}",
            grid.controller()
        ))),
        Some(AppState::Failed) | Some(AppState::Starting) | Some(AppState::Stopping) => {
            // A failed or half-way application is stopped first so `start` begins clean.
            let _ = grid.stop(name).await;
            Ok(grid.start(name).await?)
        }
        Some(AppState::Stopped) => Ok(grid.start(name).await?),
    }
}

/// Stops (if needed) and destroys `name` unless it is already gone. Idempotent.
pub async fn ensure_destroyed(grid: &dyn GridController, name: &str) -> Result<(), StepError> {
    match app_state(grid, name).await? {
        None => Ok(()),
        Some(state) => destroy(grid, name, state).await,
    }
}

async fn destroy(grid: &dyn GridController, name: &str, state: AppState) -> Result<(), StepError> {
    if !matches!(state, AppState::Stopped | AppState::Failed) {
        grid.stop(name).await?;
    }
    Ok(grid.destroy(name).await?)
}

/// Destroys `name` if it carries operation `op_id`'s [`MARK`]. One that does not is another's
/// (given the name after the operation started) and is left untouched: `Ok(Some(why))` says so.
/// Absent is done (`Ok(None)`).
pub async fn destroy_if_ours(
    grid: &dyn GridController,
    name: &str,
    op_id: &str,
) -> Result<Option<String>, StepError> {
    let Some(state) = app_state(grid, name).await? else {
        return Ok(None);
    };
    let info = grid.info(name).await?;
    let mark = info.props.iter().find(|(k, _)| k == MARK).map(|(_, v)| v);
    if mark.map(String::as_str) != Some(op_id) {
        return Ok(Some(format!(
            "grid controller {} has an application {name} that this operation did not create \
             ({MARK} {}), so it was left untouched",
            grid.controller(),
            mark.map_or("not set".to_string(), |m| format!("is {m:?}"))
        )));
    }
    destroy(grid, name, state).await?;
    Ok(None)
}

/// A leftover: what is left behind and, after `": "`, the command that clears it (`verb NAME` on
/// `controller`). The public view cuts a leftover at that `": ssh "`.
pub fn leftover(what: impl std::fmt::Display, controller: &str, verb: &str, name: &str) -> String {
    format!("{what}: {}", manual_command(controller, verb, name))
}

/// The leftover that a MigHelper not destroyed is: where it is, and the command that clears it.
pub fn helper_leftover(plan: &crate::op::Plan) -> String {
    leftover(
        format_args!("MigHelper {} on grid {}", plan.helper_app, plan.target_grid),
        &plan.target_controller,
        "destroy",
        &plan.helper_app,
    )
}

/// The exact command an operator runs to do `verb NAME` by hand on a controller.
pub fn manual_command(controller: &str, verb: &str, name: &str) -> String {
    match controller.parse::<dialect::Controller>() {
        Ok(c) => format!(
            "ssh -p {} {}@{} app {verb} {name}",
            c.port_or_default(),
            c.user_or_default(),
            c.host
        ),
        Err(_) => format!("ssh {controller} app {verb} {name}"),
    }
}
