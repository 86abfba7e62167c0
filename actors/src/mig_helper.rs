//! **MigHelper**, in `mig helper` on the target grid: the middle of the operation. Stops the source
//! application, has the target grid pull it over SSH, starts the target (migrate) or re-starts the
//! source (snapshot), and hands the operation to the MIG of the application that now runs.
//!
//! Everything before that handoff is accepted is before the cut-over: a failure rolls back (partial
//! target destroyed, source running again) and hands the operation to the source MIG, which
//! destroys this helper. Each step first reads the real state, so a restarted helper resumes from
//! its journal by running the unfinished step again.

use std::time::{Duration, Instant};

use actix::prelude::*;
use tracing::Instrument;

use crate::auth::OpKey;
use crate::driver::{
    ensure_destroyed, ensure_running, ensure_stopped, manual_command, Driver, BACKOFF,
};
use crate::handoff::{self, Handoff, HandoffError};
use crate::op::{
    Kind, Op, OpState, Role, StepState, DESTROYING_HELPER, MIGRATING, RESTARTING_SOURCE,
    STARTING_TARGET, STOPPING_HELPER, STOPPING_SOURCE,
};

/// How often progress reaches the op book (and so the page).
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

pub struct MigHelper {
    op_id: String,
    key: OpKey,
    driver: Driver,
    busy: bool,
}

impl MigHelper {
    /// A helper for one operation: it accepts handoffs for `op_id` signed with `key` only.
    pub fn new(op_id: String, key: OpKey, driver: Driver) -> MigHelper {
        MigHelper {
            op_id,
            key,
            driver,
            busy: false,
        }
    }

    fn run(&mut self, op: Op, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        self.busy = true;
        let (driver, key) = (self.driver.clone(), self.key.clone());
        ctx.spawn(
            run(driver, key, op)
                .into_actor(self)
                .map(|(), act, _| act.busy = false),
        );
    }
}

impl Actor for MigHelper {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(op) = self
            .driver
            .book
            .running_owned_by(Role::Helper)
            .into_iter()
            .find(|op| op.id == self.op_id)
        {
            tracing::info!(op_id = %op.id, "resuming from the journal");
            self.run(op, ctx);
        }
    }
}

impl Handler<Handoff> for MigHelper {
    type Result = Result<(), HandoffError>;

    fn handle(&mut self, h: Handoff, ctx: &mut Context<Self>) -> Self::Result {
        tracing::info!(op_id = %h.signed.op_id, message = "Handoff", from = "http", to = "mig_helper", seq = h.signed.seq, "actor message");
        if h.signed.op_id != self.op_id {
            return Err(HandoffError::Auth(
                crate::auth::HandoffAuthError::BadSignature,
            ));
        }
        let mut op = handoff::accept(&h, &self.key, &self.driver.book)?;
        if op.owner != Role::Helper {
            return Err(HandoffError::Bad(
                "a handoff to MigHelper must make it the owner".into(),
            ));
        }
        op.version += 1;
        self.driver.commit(&mut op).map_err(HandoffError::Journal)?;
        tracing::info!(op_id = %op.id, "operation accepted from the source MIG");
        self.run(op, ctx);
        Ok(())
    }
}

/// The last step of this monitor, by kind.
fn last_step(kind: Kind) -> &'static str {
    match kind {
        Kind::Migrate => STARTING_TARGET,
        Kind::Snapshot => RESTARTING_SOURCE,
    }
}

async fn run(driver: Driver, key: OpKey, mut op: Op) {
    let span = crate::telemetry::op_span(Role::Helper, &op);
    async move {
        // A helper restarted during a roll-back goes on with the roll-back: the journal's forward
        // steps would copy and start the target of an operation that is being undone.
        if op.rolling_back {
            tracing::info!("resuming the roll-back");
        } else {
            match steps(&driver, &mut op).await {
                Ok(()) => {
                    let mut next = op.clone();
                    next.owner = Role::Target;
                    match driver.hand_off(&op.plan.final_mig_url, &key, &mut next).await {
                        Ok(()) => {
                            // The cut-over: from here the MIG that runs owns the operation.
                            op = next;
                            let _ = driver.commit(&mut op);
                            return;
                        }
                        Err(e) => {
                            let step = last_step(op.kind);
                            op.fail_step(step, &format!("the application started, but its MIG did not take the operation: {e}"));
                            let _ = driver.commit(&mut op);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "rolling back"),
            }
        }
        roll_back(&driver, &key, op).await;
    }
    .instrument(span)
    .await
}

/// The monitor's steps, skipping those the journal says are done.
async fn steps(driver: &Driver, op: &mut Op) -> Result<(), String> {
    let plan = op.plan.clone();
    let src = driver.grid(&plan.source_controller)?;
    let dst = driver.grid(&plan.target_controller)?;
    let todo = |op: &Op, s: &str| op.step(s).state != StepState::Done;

    if todo(op, STOPPING_SOURCE) {
        driver
            .step(
                op,
                STOPPING_SOURCE,
                ensure_stopped(src.as_ref(), &plan.source_app),
            )
            .await?;
    }
    if todo(op, MIGRATING) {
        // The journal says a copy was running: this helper was killed or restarted during it.
        // The import it started may still run on the target controller (a controller need not
        // end it when its SSH session goes), holding the target's name until it ends; so a
        // resumed copy tries again with back-off instead of rolling back at the first refusal.
        let resumed = op.step(MIGRATING).state == StepState::Running;
        let retries: &[u64] = if resumed { &BACKOFF } else { &[] };
        let waits = std::iter::once(0).chain(retries.iter().copied());
        op.start_step(MIGRATING);
        driver.commit(op)?;
        let mut copied = Err(String::new());
        for (attempt, wait) in waits.enumerate() {
            if attempt > 0 {
                let e = copied.as_ref().err().cloned().unwrap_or_default();
                tracing::warn!(attempt, error = %e, "the resumed copy failed; trying again in {wait} s");
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
            copied = copy(&driver.book, op, dst.as_ref(), &plan).await;
            if copied.is_ok() {
                break;
            }
        }
        match copied {
            Ok(()) => op.finish_step(MIGRATING, None),
            Err(e) => {
                op.fail_step(MIGRATING, &e);
                driver.commit(op)?;
                return Err(e);
            }
        }
        driver.commit(op)?;
    }
    let last = last_step(op.kind);
    if todo(op, last) {
        match op.kind {
            Kind::Migrate => {
                driver
                    .step(op, last, async {
                        ensure_running(dst.as_ref(), &plan.target_app)
                            .await
                            .map_err(|e| format!("the target application did not start: {e}"))
                    })
                    .await?
            }
            Kind::Snapshot => {
                driver
                    .step(op, last, async {
                        ensure_running(src.as_ref(), &plan.source_app)
                            .await
                            .map_err(|e| format!("the source application did not start again: {e}"))
                    })
                    .await?
            }
        }
    }
    Ok(())
}

/// One attempt at the copy: a target left by an interrupted copy is partial, so it goes first;
/// then the target grid pulls the application, its progress published as it goes.
async fn copy(
    book: &crate::book::OpBook,
    op: &mut Op,
    dst: &dyn crate::controller::GridController,
    plan: &crate::op::Plan,
) -> Result<(), String> {
    ensure_destroyed(dst, &plan.target_app).await?;
    let mut last = Instant::now() - PROGRESS_EVERY;
    let mut progress = |done: u64, total: u64| {
        op.set_progress(MIGRATING, done, total);
        if last.elapsed() >= PROGRESS_EVERY || done == total {
            last = Instant::now();
            book.publish(op.clone());
        }
    };
    let remote: dialect::Controller = plan.source_controller.parse().map_err(|e| format!("{e}"))?;
    dst.migrate_import(
        &remote,
        &plan.source_app,
        &plan.target_app,
        &plan.target_app_config,
        Default::default(),
        &mut progress,
    )
    .await
    .map_err(|e| format!("copy from grid {} failed: {e}", plan.source_grid))
}

/// Before the cut-over, undo: destroy the (partial) target, start the source again, and hand the
/// operation to the source MIG, which destroys this helper.
async fn roll_back(driver: &Driver, key: &OpKey, mut op: Op) {
    let plan = op.plan.clone();
    let undone: Vec<&str> = [
        STOPPING_SOURCE,
        MIGRATING,
        STARTING_TARGET,
        RESTARTING_SOURCE,
    ]
    .into_iter()
    .filter(|s| op.has_step(s) && op.step(s).state == StepState::Done)
    .collect();
    let failed = op
        .monitors
        .iter()
        .flat_map(|m| &m.steps)
        .find(|s| s.state == StepState::Failed)
        .map(|s| {
            format!(
                "{} failed: {}",
                s.name,
                s.detail.clone().unwrap_or_default()
            )
        })
        .unwrap_or_else(|| "MigHelper failed".into());
    op.rolling_back = true;
    op.error = Some(failed.clone());
    let _ = driver.commit(&mut op);

    let target_gone = driver
        .retry("destroying the partial target", || async {
            let dst = driver.grid(&plan.target_controller)?;
            ensure_destroyed(dst.as_ref(), &plan.target_app).await
        })
        .await;
    let source_up = driver
        .retry("re-starting the source application", || async {
            let src = driver.grid(&plan.source_controller)?;
            ensure_running(src.as_ref(), &plan.source_app).await
        })
        .await;

    op.roll_back_rest(&undone);
    // The source MIG runs these two when it takes the operation back.
    for s in [STOPPING_HELPER, DESTROYING_HELPER] {
        let st = op.step_mut(s);
        st.state = StepState::Pending;
        st.detail = None;
    }
    if let Err(e) = &target_gone {
        op.leftovers.push(format!(
            "partial target {} on grid {} ({e}): {}",
            plan.target_app,
            plan.target_grid,
            manual_command(&plan.target_controller, "destroy", &plan.target_app)
        ));
    }
    match source_up {
        Ok(()) => {
            let mut next = op.clone();
            next.owner = Role::Target;
            if driver
                .hand_off(&plan.source_mig_url, key, &mut next)
                .await
                .is_ok()
            {
                let _ = driver.commit(&mut next);
                return;
            }
            op.leftovers.push(format!(
                "the source MIG did not take the roll-back, so MigHelper {} is left on grid {}: {}",
                plan.helper_app,
                plan.target_grid,
                manual_command(&plan.target_controller, "destroy", &plan.helper_app)
            ));
        }
        Err(e) => {
            op.leftovers.push(format!(
                "source application {} could not be started again on grid {} ({e}): {}",
                plan.source_app,
                plan.source_grid,
                manual_command(&plan.source_controller, "start", &plan.source_app)
            ));
            op.leftovers.push(format!(
                "MigHelper {} on grid {}: {}",
                plan.helper_app,
                plan.target_grid,
                manual_command(&plan.target_controller, "destroy", &plan.helper_app)
            ));
        }
    }
    op.end(
        OpState::Failed,
        Some(format!("{failed}; the roll-back did not finish")),
    );
    let _ = driver.commit(&mut op);
}
