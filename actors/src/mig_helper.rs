//! **MigHelper**, in `mig helper` on the target grid: the middle of the operation. Stops the source
//! application, has the target grid pull it over SSH, starts the target (migrate) or re-starts the
//! source (snapshot), and hands the operation to the MIG of the application that now runs.
//!
//! Everything before the target starts is before the cut-over: a failure rolls back (the partial
//! target destroyed, if it carries this operation's mark; source running again) and hands the
//! operation to the source MIG, which destroys this helper. Once the target has started, its MIG
//! may take the operation at any moment, so MigHelper never destroys it again: a handoff it
//! cannot confirm holds the operation for an operator. The copy is compared with the source,
//! volume by volume, before the target starts. Each step first reads the real state, so a
//! restarted helper resumes from its journal by running the unfinished step again.

use std::time::{Duration, Instant};

use actix::prelude::*;
use tracing::Instrument;

use crate::auth::OpKey;
use crate::driver::{
    destroy_if_ours, ensure_running, ensure_stopped, helper_leftover, manual_command, Driver,
    StepError, BACKOFF, MARK,
};
use crate::faults;
use crate::handoff::{self, Handoff, HandoffError, SignedStatus, StatusQuery};
use crate::op::{
    Kind, Op, OpState, Role, StepId, StepState, DESTROYING_HELPER, MIGRATING, RESTARTING_SOURCE,
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

impl Handler<StatusQuery> for MigHelper {
    type Result = Option<SignedStatus>;

    /// Answers only for its own operation: it holds no key for any other.
    fn handle(&mut self, q: StatusQuery, _ctx: &mut Context<Self>) -> Self::Result {
        (q.op_id == self.op_id).then(|| {
            let me = crate::op::helper_app_name(&self.op_id);
            handoff::answer_status(&self.driver.book, &self.key, (Role::Helper, &me), &q)
        })
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
        let me = crate::op::helper_app_name(&self.op_id);
        let mut op = handoff::accept(&h, &self.key, (Role::Helper, &me), &self.driver.book)?;
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
fn last_step(kind: Kind) -> StepId {
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
                    let url = op.plan.final_mig_url.clone();
                    match driver.hand_off(&url, &key, &mut op, Role::Target).await {
                        Ok(next) => {
                            // The cut-over: from here the MIG that runs owns the operation.
                            op = next;
                            if let Err(e) = driver.commit(&mut op) {
                                tracing::error!(error = %e, "handed over, but cannot journal it");
                            }
                        }
                        Err(e) => hold(&driver, op, &e.message).await,
                    }
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "rolling back"),
            }
        }
        roll_back(&driver, &key, op).await;
    }
    .instrument(span)
    .await
}

/// The application runs (the target after a migrate, the source again after a snapshot), but its
/// MIG did not confirm that it took the operation. It may have: undoing anything now could
/// destroy the only copy it is about to keep. So nothing is undone; the operation ends here, held
/// for an operator, with what to check and the commands that finish it.
async fn hold(driver: &Driver, mut op: Op, why: &str) {
    let plan = op.plan.clone();
    let (app, grid) = match op.kind {
        Kind::Migrate => (&plan.target_app, &plan.target_grid),
        Kind::Snapshot => (&plan.source_app, &plan.source_grid),
    };
    tracing::error!(error = %why, "the application runs, but its MIG did not confirm the handoff; holding the operation for an operator");
    if op.kind == Kind::Migrate {
        op.leave(format!(
            "source application {} on grid {} is stopped and kept; once you have checked that {} runs on grid {} with its data, and that its MIG does not show this operation as running: {}",
            plan.source_app,
            plan.source_grid,
            plan.target_app,
            plan.target_grid,
            manual_command(&plan.source_controller, "destroy", &plan.source_app)
        ));
    }
    op.leave(helper_leftover(&plan));
    op.end(
        OpState::Failed,
        Some(format!(
            "held for an operator: {app} runs on grid {grid}, but its MIG did not confirm that it took the operation ({why}); nothing was destroyed. Open {app}'s MIG page for this operation: if it shows it, it finishes by itself; if not, finish with the leftovers' commands"
        )),
    );
    if let Err(e) = driver.commit(&mut op) {
        tracing::error!(error = %e, "cannot journal the held operation");
    }
}

/// The monitor's steps, skipping those the journal says are done.
async fn steps(driver: &Driver, op: &mut Op) -> Result<(), StepError> {
    let plan = op.plan.clone();
    let src = driver.grid(&plan.source_controller)?;
    let dst = driver.grid(&plan.target_controller)?;
    let todo = |op: &Op, s: StepId| op.step(s).state != StepState::Done;

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
        let mut copied = Err(StepError::from(String::new()));
        for (attempt, wait) in waits.enumerate() {
            if attempt > 0 {
                let e = copied.as_ref().err().cloned().unwrap_or_default();
                tracing::warn!(attempt, error = %e, "the resumed copy failed; trying again in {wait} s");
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
            copied = copy(driver, op, src.as_ref(), dst.as_ref(), &plan).await;
            if copied.as_ref().map_or_else(|e| e.permanent, |_| true) {
                break;
            }
        }
        match copied {
            Ok(detail) => op.finish_step(MIGRATING, Some(detail)),
            Err(e) => {
                op.fail_step(MIGRATING, &e.message);
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
                            .map_err(|e| e.context("the target application did not start"))
                    })
                    .await?
            }
            Kind::Snapshot => {
                driver
                    .step(op, last, async {
                        ensure_running(src.as_ref(), &plan.source_app)
                            .await
                            .map_err(|e| e.context("the source application did not start again"))
                    })
                    .await?
            }
        }
    }
    Ok(())
}

/// One attempt at the copy: a target left by an interrupted copy of this operation is partial,
/// so it goes first (an application of that name that this operation did not make fails the
/// copy and is left alone); then the target grid pulls the application, marked as this
/// operation's, its progress published as it goes; then every volume's checksum is compared on
/// both grids (the source is stopped, so it is stable). Returns the step's detail.
async fn copy(
    driver: &Driver,
    op: &mut Op,
    src: &dyn crate::controller::GridController,
    dst: &dyn crate::controller::GridController,
    plan: &crate::op::Plan,
) -> Result<String, StepError> {
    driver.faults.hold(faults::HOLD_COPY).await;
    if let Some(taken) = destroy_if_ours(dst, &plan.target_app, &op.id).await? {
        return Err(StepError::permanent(format!(
            "the target name is taken: {taken}"
        )));
    }
    let mut props = plan.target_app_config.clone();
    props.push((MARK.to_string(), op.id.clone()));
    let book = &driver.book;
    let mut last = Instant::now() - PROGRESS_EVERY;
    let mut progress = |done: u64, total: u64| {
        op.set_progress(MIGRATING, done, total);
        if last.elapsed() >= PROGRESS_EVERY || done == total {
            last = Instant::now();
            book.publish(op.clone());
        }
    };
    let remote: dialect::Controller = plan
        .source_controller
        .parse()
        .map_err(|e| StepError::permanent(format!("{e}")))?;
    dst.migrate_import(
        &remote,
        &plan.source_app,
        &plan.target_app,
        &props,
        Default::default(),
        &mut progress,
    )
    .await
    .map_err(|e| {
        StepError::from(e).context(format!("copy from grid {} failed", plan.source_grid))
    })?;
    driver.faults.hold(faults::HOLD_VERIFY).await;
    verify(src, &plan.source_app, dst, &plan.target_app).await
}

/// Compares every volume's checksum of the source with the copy's. A difference is permanent: the
/// copy is not the application, and it must not start.
async fn verify(
    src: &dyn crate::controller::GridController,
    source_app: &str,
    dst: &dyn crate::controller::GridController,
    target_app: &str,
) -> Result<String, StepError> {
    let (a, b) = tokio::join!(src.checksum(source_app), dst.checksum(target_app));
    let (mut a, mut b) = (a?, b?);
    // The source's checksums stand for it only while it stays stopped. Read after them, so a
    // start by hand (an operator, a script) before they were taken is seen: such a source may
    // take writes the copy never gets, and starting the copy too would run two (issue 14).
    match crate::driver::app_state(src, source_app).await? {
        Some(dialect::AppState::Stopped) => {}
        other => {
            let now = other.map_or("gone".to_string(), |s| s.to_string());
            return Err(StepError::permanent(format!(
                "the source application {source_app} was started by someone during the copy (it is {now}); the copy will not be started"
            )));
        }
    }
    a.sort_by(|x, y| x.volume.cmp(&y.volume));
    b.sort_by(|x, y| x.volume.cmp(&y.volume));
    if a != b {
        let differ: Vec<String> = a
            .iter()
            .filter(|v| !b.contains(v))
            .map(|v| v.volume.clone())
            .chain(
                b.iter()
                    .filter(|w| !a.iter().any(|v| v.volume == w.volume))
                    .map(|w| w.volume.clone()),
            )
            .collect();
        return Err(StepError::permanent(format!(
            "the copy differs from the source after the transfer (volumes: {}); it will not be started",
            differ.join(", ")
        )));
    }
    Ok(format!(
        "verified {} volume{}, blake3 equal",
        a.len(),
        if a.len() == 1 { "" } else { "s" }
    ))
}

/// Before the cut-over, undo: destroy the (partial) target if this operation made it, start the
/// source again, and hand the operation to the source MIG, which destroys this helper.
async fn roll_back(driver: &Driver, key: &OpKey, mut op: Op) {
    let plan = op.plan.clone();
    let undone: Vec<StepId> = [
        STOPPING_SOURCE,
        MIGRATING,
        STARTING_TARGET,
        RESTARTING_SOURCE,
    ]
    .into_iter()
    .filter(|s| op.has_step(*s) && op.step(*s).state == StepState::Done)
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
    op.error = Some(crate::op::bounded(&failed));
    if let Err(e) = driver.commit(&mut op) {
        tracing::error!(error = %e, "cannot journal the start of the roll-back");
    }

    let target_gone = driver
        .retry("destroying the partial target", || async {
            let dst = driver.grid(&plan.target_controller)?;
            destroy_if_ours(dst.as_ref(), &plan.target_app, &op.id).await
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
    match &target_gone {
        Ok(Some(other)) => op.trace("step", format!("roll-back: {other}"), None, None),
        Ok(None) => {}
        Err(e) => op.leave(format!(
            "partial target {} on grid {} ({e}): {}",
            plan.target_app,
            plan.target_grid,
            manual_command(&plan.target_controller, "destroy", &plan.target_app)
        )),
    }
    match source_up {
        Ok(()) => {
            let url = plan.source_mig_url.clone();
            match driver.hand_off(&url, key, &mut op, Role::Target).await {
                Ok(mut next) => {
                    if let Err(e) = driver.commit(&mut next) {
                        tracing::error!(error = %e, "handed the roll-back over, but cannot journal it");
                    }
                    return;
                }
                Err(e) => op.leave(format!(
                    "the source MIG did not take the roll-back ({e}), so MigHelper {} is left on grid {}: {}",
                    plan.helper_app,
                    plan.target_grid,
                    manual_command(&plan.target_controller, "destroy", &plan.helper_app)
                )),
            }
        }
        Err(e) => {
            op.leave(format!(
                "source application {} could not be started again on grid {} ({e}): {}",
                plan.source_app,
                plan.source_grid,
                manual_command(&plan.source_controller, "start", &plan.source_app)
            ));
            op.leave(helper_leftover(&plan));
        }
    }
    op.end(
        OpState::Failed,
        Some(format!("{failed}; the roll-back did not finish")),
    );
    if let Err(e) = driver.commit(&mut op) {
        tracing::error!(error = %e, "cannot journal the end of the roll-back");
    }
}
