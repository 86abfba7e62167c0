//! **Target**, in the MIG of the application that runs at the end: the target MIG after a migrate
//! (Target Application Monitor: destroying the source application, stopping MigHelper, destroying
//! MigHelper), or the re-started source MIG after a snapshot or a roll-back (Re-Start Source
//! Application Monitor: stopping MigHelper, destroying MigHelper).
//!
//! This is after the cut-over: the application runs, so nothing is undone. Each clean-up step
//! retries with back-off (a permanent error, such as a refused key, at once); one that still
//! fails is recorded with the exact command that clears it, and the operation ends `failed` with
//! the application running.
//!
//! A handoff is taken only when it is signed for this application and this transition, and its
//! plan names this application as the one that runs at the end: a handoff captured on its way
//! elsewhere cannot make this MIG destroy its own application.

use actix::prelude::*;
use tracing::Instrument;

use crate::auth::AppKey;
use crate::handoff::{self, Handoff, HandoffError, SignedStatus, StatusQuery};
use crate::op::{
    Kind, Op, OpState, Role, StepId, StepState, DESTROYING_HELPER, DESTROYING_SOURCE,
    STOPPING_HELPER,
};
use crate::runner::{ensure_destroyed, ensure_stopped, leftover, StepError, StepRunner};

pub struct Target {
    app_key: AppKey,
    /// The application this MIG lives in (`app_name`); without it no handoff can be checked.
    app_name: Option<String>,
    runner: StepRunner,
}

impl Target {
    pub fn new(app_key: AppKey, app_name: Option<String>, runner: StepRunner) -> Target {
        Target {
            app_key,
            app_name,
            runner,
        }
    }
}

impl Actor for Target {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        for op in self.runner.book.running_owned_by(Role::Target) {
            tracing::info!(op_id = %op.id, "resuming clean-up from the journal");
            ctx.spawn(clean_up(self.runner.clone(), op).into_actor(self));
        }
    }
}

impl Handler<StatusQuery> for Target {
    type Result = Option<SignedStatus>;

    fn handle(&mut self, q: StatusQuery, _ctx: &mut Context<Self>) -> Self::Result {
        let app = self.app_name.as_deref()?;
        let key = self.app_key.op_key(&q.op_id);
        Some(handoff::answer_status(
            &self.runner.book,
            &key,
            (Role::Target, app),
            &q,
        ))
    }
}

impl Handler<Handoff> for Target {
    type Result = Result<(), HandoffError>;

    fn handle(&mut self, h: Handoff, ctx: &mut Context<Self>) -> Self::Result {
        tracing::info!(op_id = %h.signed.op_id, message = "Handoff", from = "http", to = "target", seq = h.signed.seq, "actor message");
        let Some(app) = self.app_name.clone() else {
            return Err(HandoffError::Refused(
                "app_name is not set, so this MIG cannot tell whether a handoff is for its application".into(),
            ));
        };
        let key = self.app_key.op_key(&h.signed.op_id);
        let already = self
            .runner
            .book
            .get(&h.signed.op_id)
            .is_some_and(|o| o.owner == Role::Target && o.state.is_running());
        let mut op = handoff::accept(&h, &key, (Role::Target, &app), &self.runner.book)?;
        if op.owner != Role::Target {
            return Err(HandoffError::Bad(
                "a handoff to a MIG must make it the owner".into(),
            ));
        }
        let runs_here = match (op.kind, op.rolling_back) {
            (Kind::Migrate, false) => &op.plan.target_app,
            _ => &op.plan.source_app,
        };
        if *runs_here != app {
            return Err(HandoffError::Bad(format!(
                "the plan ends with application {runs_here} running, but this MIG is in {app}"
            )));
        }
        if already {
            // A sender that did not hear the first answer sent again: the clean-up already runs,
            // and its copy of the operation stays the one journalled.
            tracing::info!(op_id = %op.id, seq = op.seq, "handoff of an operation this MIG already owns; acknowledged again");
            return Ok(());
        }
        op.version += 1;
        self.runner.commit(&mut op).map_err(HandoffError::Journal)?;
        tracing::info!(op_id = %op.id, rolling_back = op.rolling_back, "operation accepted from MigHelper");
        ctx.spawn(clean_up(self.runner.clone(), op).into_actor(self));
        Ok(())
    }
}

/// What a clean-up step does to an application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Stop,
    Destroy,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Action::Stop => "stop",
            Action::Destroy => "destroy",
        }
    }
}

/// One clean-up step: which step, on which controller, doing what, to which application.
struct CleanUp<'a> {
    step: StepId,
    controller: &'a str,
    action: Action,
    app: &'a str,
}

async fn clean_up(runner: StepRunner, mut op: Op) {
    let span = crate::telemetry::op_span(Role::Target, &op);
    async move {
        runner.faults.hold(crate::faults::HOLD_CLEAN_UP).await;
        let plan = op.plan.clone();
        let mut left = Vec::new();
        let mut steps: Vec<CleanUp> = Vec::new();
        if op.kind == Kind::Migrate && !op.rolling_back {
            steps.push(CleanUp {
                step: DESTROYING_SOURCE,
                controller: &plan.source_controller,
                action: Action::Destroy,
                app: &plan.source_app,
            });
        }
        steps.push(CleanUp {
            step: STOPPING_HELPER,
            controller: &plan.target_controller,
            action: Action::Stop,
            app: &plan.helper_app,
        });
        steps.push(CleanUp {
            step: DESTROYING_HELPER,
            controller: &plan.target_controller,
            action: Action::Destroy,
            app: &plan.helper_app,
        });

        // Every grid the clean-up will touch, logged in to at once: the second grid's login then
        // overlaps the first grid's steps instead of following them.
        let mut grids: Vec<&str> = Vec::new();
        for c in steps
            .iter()
            .filter(|c| op.step(c.step).state != StepState::Done)
        {
            if !grids.contains(&c.controller) {
                grids.push(c.controller);
            }
        }
        runner.warm_up(grids);

        for c in steps {
            if op.step(c.step).state == StepState::Done {
                continue;
            }
            let what = format!("{} ({})", c.step, c.app);
            let r = runner
                .step(
                    &mut op,
                    c.step,
                    runner.retry(&what, || async {
                        let grid = runner.grid(c.controller)?;
                        match c.action {
                            Action::Stop => ensure_stopped(grid.as_ref(), c.app).await,
                            Action::Destroy => ensure_destroyed(grid.as_ref(), c.app).await,
                        }
                    }),
                )
                .await;
            if let Err(StepError { message: e, .. }) = r {
                left.push(leftover(
                    format_args!("{} ({e})", c.app),
                    c.controller,
                    c.action.verb(),
                    c.app,
                ));
                if c.step == STOPPING_HELPER {
                    // A helper that would not stop cannot be destroyed either; say both.
                    left.push(leftover("then", c.controller, "destroy", c.app));
                    break;
                }
            }
        }
        if left.is_empty() {
            if op.rolling_back {
                let state = op.undone_state();
                op.end(state, None);
            } else {
                op.end(OpState::Succeeded, None);
            }
        } else {
            for l in left {
                op.leave(l);
            }
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
        if let Err(e) = runner.commit(&mut op) {
            tracing::error!(error = %e, "cannot journal the end of the operation");
        }
        tracing::info!(state = ?op.state, "operation ended");
    }
    .instrument(span)
    .await
}
