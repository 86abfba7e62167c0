//! **Target**, in the MIG of the application that runs at the end: the target MIG after a migrate
//! (Target Application Monitor: destroying the source application, stopping MigHelper, destroying
//! MigHelper), or the re-started source MIG after a snapshot or a roll-back (Re-Start Source
//! Application Monitor: stopping MigHelper, destroying MigHelper).
//!
//! This is after the cut-over: the application runs, so nothing is undone. Each clean-up step
//! retries with back-off; one that still fails is recorded with the exact command that clears it,
//! and the operation ends `failed` with the application running.

use actix::prelude::*;
use tracing::Instrument;

use crate::auth::AppKey;
use crate::driver::{ensure_destroyed, ensure_stopped, manual_command, Driver};
use crate::handoff::{self, Handoff, HandoffError};
use crate::op::{
    Kind, Op, OpState, Role, StepState, DESTROYING_HELPER, DESTROYING_SOURCE, STOPPING_HELPER,
};

pub struct Target {
    app_key: AppKey,
    driver: Driver,
}

impl Target {
    pub fn new(app_key: AppKey, driver: Driver) -> Target {
        Target { app_key, driver }
    }
}

impl Actor for Target {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        for op in self.driver.book.running_owned_by(Role::Target) {
            tracing::info!(op_id = %op.id, "resuming clean-up from the journal");
            ctx.spawn(clean_up(self.driver.clone(), op).into_actor(self));
        }
    }
}

impl Handler<Handoff> for Target {
    type Result = Result<(), HandoffError>;

    fn handle(&mut self, h: Handoff, ctx: &mut Context<Self>) -> Self::Result {
        tracing::info!(op_id = %h.signed.op_id, message = "Handoff", from = "http", to = "target", seq = h.signed.seq, "actor message");
        let key = self.app_key.op_key(&h.signed.op_id);
        let mut op = handoff::accept(&h, &key, &self.driver.book)?;
        if op.owner != Role::Target {
            return Err(HandoffError::Bad(
                "a handoff to a MIG must make it the owner".into(),
            ));
        }
        if !op.state.is_running() {
            return Err(HandoffError::Refused(format!(
                "operation {} has already ended",
                op.id
            )));
        }
        op.version += 1;
        self.driver.commit(&mut op).map_err(HandoffError::Journal)?;
        tracing::info!(op_id = %op.id, rolling_back = op.rolling_back, "operation accepted from MigHelper");
        ctx.spawn(clean_up(self.driver.clone(), op).into_actor(self));
        Ok(())
    }
}

async fn clean_up(driver: Driver, mut op: Op) {
    let span = crate::telemetry::op_span(Role::Target, &op);
    async move {
        let plan = op.plan.clone();
        let mut left = Vec::new();
        let mut steps: Vec<(&str, &str, &str, &str)> = Vec::new();
        if op.kind == Kind::Migrate && !op.rolling_back {
            steps.push((
                DESTROYING_SOURCE,
                &plan.source_controller,
                "destroy",
                &plan.source_app,
            ));
        }
        steps.push((
            STOPPING_HELPER,
            &plan.target_controller,
            "stop",
            &plan.helper_app,
        ));
        steps.push((
            DESTROYING_HELPER,
            &plan.target_controller,
            "destroy",
            &plan.helper_app,
        ));

        for (step, controller, verb, app) in steps {
            if op.step(step).state == StepState::Done {
                continue;
            }
            let what = format!("{step} ({app})");
            let r = driver
                .step(
                    &mut op,
                    step,
                    driver.retry(&what, || async {
                        let grid = driver.grid(controller)?;
                        match verb {
                            "stop" => ensure_stopped(grid.as_ref(), app).await,
                            _ => ensure_destroyed(grid.as_ref(), app).await,
                        }
                    }),
                )
                .await;
            if let Err(e) = r {
                left.push(format!(
                    "{app} ({e}): {}",
                    manual_command(controller, verb, app)
                ));
                if step == STOPPING_HELPER {
                    // A helper that would not stop cannot be destroyed either; say both.
                    left.push(format!(
                        "then: {}",
                        manual_command(controller, "destroy", app)
                    ));
                    break;
                }
            }
        }
        if left.is_empty() {
            if op.rolling_back {
                op.end(OpState::RolledBack, None);
            } else {
                op.end(OpState::Succeeded, None);
            }
        } else {
            op.leftovers.extend(left);
            let what = if op.rolling_back {
                "rolled back, but"
            } else {
                "the application runs, but"
            };
            op.end(
                OpState::Failed,
                Some(format!("{what} clean-up left things behind; see leftovers")),
            );
        }
        if let Err(e) = driver.commit(&mut op) {
            tracing::error!(error = %e, "cannot journal the end of the operation");
        }
        tracing::info!(state = ?op.state, "operation ended");
    }
    .instrument(span)
    .await
}
