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

use std::time::Duration;

use actix::prelude::*;
use dialect::AppState;
use tracing::Instrument;

use crate::auth::OpKey;
use crate::cancel::{self, Cancel, CancelError, Gate, GateState};
use crate::controller::GridController;
use crate::faults;
use crate::handoff::{self, Handoff, HandoffError, SignedStatus, StatusQuery};
use crate::op::{
    Cancelled, Kind, Op, OpState, Role, StepId, StepState, DESTROYING_HELPER, MIGRATING,
    PRECOPYING, RESTARTING_SOURCE, STARTING_TARGET, STOPPING_HELPER, STOPPING_SOURCE,
};
use crate::runner::{
    app_state, destroy_if_ours, ensure_running, ensure_stopped, helper_leftover, leftover,
    StepError, StepRunner, BACKOFF,
};

mod copy;

pub use crate::units::human_bytes;
use copy::{copy, precopy_tried};

/// How often progress reaches the op book (and so the page).
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

pub struct MigHelper {
    op_id: String,
    key: OpKey,
    runner: StepRunner,
    busy: bool,
    /// Where a cancel meets the cut-over (see [`crate::cancel`]).
    gate: Gate,
}

impl MigHelper {
    /// A helper for one operation: it accepts handoffs for `op_id` signed with `key` only.
    pub fn new(op_id: String, key: OpKey, runner: StepRunner) -> MigHelper {
        MigHelper {
            op_id,
            key,
            runner,
            busy: false,
            gate: Gate::new(GateState::Open),
        }
    }

    fn run(&mut self, op: Op, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        self.busy = true;
        let (runner, key, gate) = (self.runner.clone(), self.key.clone(), self.gate.clone());
        ctx.spawn(
            run(runner, key, gate, op)
                .into_actor(self)
                .map(|(), act, _| act.busy = false),
        );
    }
}

impl Actor for MigHelper {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(op) = self
            .runner
            .book
            .running_owned_by(Role::Helper)
            .into_iter()
            .find(|op| op.id == self.op_id)
        {
            tracing::info!(op_id = %op.id, "resuming from the journal");
            self.gate = Gate::of(&op);
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
            handoff::answer_status(&self.runner.book, &self.key, (Role::Helper, &me), &q)
        })
    }
}

impl Handler<Cancel> for MigHelper {
    type Result = Result<Cancelled, CancelError>;

    /// Decided by the gate alone, against the step that starts the target (see [`crate::cancel`]).
    fn handle(&mut self, c: Cancel, _ctx: &mut Context<Self>) -> Self::Result {
        tracing::info!(op_id = %c.op_id, message = "Cancel", from = "http", to = "mig_helper", "actor message");
        let op = self
            .runner
            .book
            .get(&c.op_id)
            .filter(|_| c.op_id == self.op_id)
            .ok_or_else(|| {
                CancelError::NotFound(format!("MigHelper has no operation {}", c.op_id))
            })?;
        if !op.state.is_running() || op.owner != Role::Helper {
            return Err(cancel::too_late(&op));
        }
        match self.gate.cancel(c.by) {
            Ok(by) => {
                tracing::warn!(op_id = %op.id, %by, "cancel accepted before the cut-over; rolling back");
                Ok(by)
            }
            Err(GateState::CutOver) => Err(cancel::past_cut_over(&op)),
            Err(_) => Err(CancelError::Conflict(format!(
                "operation {} is already being rolled back",
                op.id
            ))),
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
        let me = crate::op::helper_app_name(&self.op_id);
        let mut op = handoff::accept(&h, &self.key, (Role::Helper, &me), &self.runner.book)?;
        if op.owner != Role::Helper {
            return Err(HandoffError::Bad(
                "a handoff to MigHelper must make it the owner".into(),
            ));
        }
        op.version += 1;
        self.runner.commit(&mut op).map_err(HandoffError::Journal)?;
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

async fn run(runner: StepRunner, key: OpKey, gate: Gate, mut op: Op) {
    let span = crate::telemetry::op_span(Role::Helper, &op);
    async move {
        // A helper restarted during a roll-back goes on with the roll-back: the journal's forward
        // steps would copy and start the target of an operation that is being undone.
        if op.rolling_back || op.cancelled.is_some() {
            tracing::info!("resuming the roll-back");
        } else {
            match steps(&runner, &gate, &mut op).await {
                Ok(()) => {
                    let url = op.plan.final_mig_url.clone();
                    match runner.hand_off(&url, &key, &mut op, Role::Target).await {
                        Ok(next) => {
                            // The cut-over: from here the MIG that runs owns the operation.
                            op = next;
                            if let Err(e) = runner.commit(&mut op) {
                                tracing::error!(error = %e, "handed over, but cannot journal it");
                            }
                        }
                        Err(e) => hold(&runner, op, &e.message).await,
                    }
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "rolling back"),
            }
        }
        gate.rolling_back();
        // A cancel that won while a step was failing still names the end state.
        if op.cancelled.is_none() {
            op.cancelled = gate.cancelled();
        }
        roll_back(&runner, &key, op).await;
    }
    .instrument(span)
    .await
}

/// The application runs (the target after a migrate, the source again after a snapshot), but its
/// MIG did not confirm that it took the operation. It may have: undoing anything now could
/// destroy the only copy it is about to keep. So nothing is undone; the operation ends here, held
/// for an operator, with what to check and the commands that finish it.
async fn hold(runner: &StepRunner, mut op: Op, why: &str) {
    let plan = op.plan.clone();
    let (app, grid) = match op.kind {
        Kind::Migrate => (&plan.target_app, &plan.target_grid),
        Kind::Snapshot => (&plan.source_app, &plan.source_grid),
    };
    tracing::error!(error = %why, "the application runs, but its MIG did not confirm the handoff; holding the operation for an operator");
    if op.kind == Kind::Migrate {
        op.leave(leftover(
            format_args!(
                "source application {} on grid {} is stopped and kept; once you have checked that {} runs on grid {} with its data, and that its MIG does not show this operation as running",
                plan.source_app, plan.source_grid, plan.target_app, plan.target_grid,
            ),
            &plan.source_controller,
            "destroy",
            &plan.source_app,
        ));
    }
    op.leave(helper_leftover(&plan));
    end_failed(
        runner,
        &mut op,
        format!(
            "held for an operator: {app} runs on grid {grid}, but its MIG did not confirm that it took the operation ({why}); nothing was destroyed. Open {app}'s MIG page for this operation: if it shows it, it finishes by itself; if not, finish with the leftovers' commands"
        ),
        "the held operation",
    );
}

/// Ends `op` failed with `why` and journals it; a journal that fails is logged, naming `what`
/// could not be journalled (the operation's end is all that is left to do).
fn end_failed(runner: &StepRunner, op: &mut Op, why: String, what: &str) {
    op.end(OpState::Failed, Some(why));
    if let Err(e) = runner.commit(op) {
        tracing::error!(error = %e, "cannot journal {what}");
    }
}

/// A cancel won before the cut-over: the step it interrupted is marked undone, the cancel
/// journalled, and the error returned rolls the operation back as a failure would.
fn interrupted(runner: &StepRunner, op: &mut Op, by: Cancelled) -> StepError {
    tracing::warn!(%by, "cancelled before the cut-over; rolling back");
    op.version += 1;
    let now = crate::op::now();
    for s in op.monitors.iter_mut().flat_map(|m| &mut m.steps) {
        if s.state == StepState::Running {
            s.state = StepState::RolledBack;
            s.ended_at = Some(now.clone());
            s.detail = Some(format!("interrupted: {by}"));
        }
    }
    op.trace("step", by.to_string(), None, None);
    op.cancelled = Some(by.clone());
    if let Err(e) = runner.commit(op) {
        tracing::error!(error = %e, "cannot journal the cancel");
    }
    StepError::permanent(by.to_string())
}

/// Ends `step` with what its work returned and journals it; an error fails the step and is
/// returned, so the caller rolls back.
fn conclude(
    runner: &StepRunner,
    op: &mut Op,
    step: StepId,
    result: Result<String, StepError>,
) -> Result<(), StepError> {
    match result {
        Ok(detail) => op.finish_step(step, Some(detail)),
        Err(e) => {
            op.fail_step(step, &e.message);
            runner.commit(op)?;
            return Err(e);
        }
    }
    runner.commit(op)?;
    Ok(())
}

/// The monitor's steps, skipping those the journal says are done. A cancel stops them between
/// steps and during the copy; the cut-over passes the gate first.
async fn steps(runner: &StepRunner, gate: &Gate, op: &mut Op) -> Result<(), StepError> {
    let plan = op.plan.clone();
    let src = runner.grid(&plan.source_controller)?;
    let dst = runner.grid(&plan.target_controller)?;
    // The source grid's first command comes after the pre-copy: log in to it meanwhile.
    runner.warm_up([plan.source_controller.as_str()]);
    let todo = |op: &Op, s: StepId| op.step(s).state != StepState::Done;

    if op.has_step(PRECOPYING) && todo(op, PRECOPYING) {
        op.start_step(PRECOPYING);
        runner.commit(op)?;
        // A cancel drops the pre-copy where it is, as it does the copy: the source still runs,
        // and the roll-back destroys the staged copy. Waiting for a long pre-copy to end first
        // kept a cancel that had been accepted from taking effect for as long.
        let result = tokio::select! {
            r = precopy_tried(runner, gate, op, dst.as_ref(), &plan) => Some(r),
            _ = gate.wait_cancelled() => None,
        };
        let Some(result) = result else {
            let by = gate.cancelled().expect("the gate says cancelled");
            return Err(interrupted(runner, op, by));
        };
        conclude(runner, op, PRECOPYING, result)?;
    }
    if op.has_step(PRECOPYING) && todo(op, STOPPING_SOURCE) {
        runner.faults.hold(faults::HOLD_PRECOPIED).await;
    }
    if todo(op, STOPPING_SOURCE) {
        tokio::select! {
            () = runner.faults.hold(faults::HOLD_STOP_SOURCE) => {}
            _ = gate.wait_cancelled() => {}
        }
    }
    if let Some(by) = gate.cancelled() {
        return Err(interrupted(runner, op, by));
    }
    if todo(op, STOPPING_SOURCE) {
        runner
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
        runner.commit(op)?;
        let mut copied = Err(StepError::from(String::new()));
        for (attempt, wait) in waits.enumerate() {
            if attempt > 0 {
                let e = copied.as_ref().err().cloned().unwrap_or_default();
                tracing::warn!(attempt, error = %e, "the resumed copy failed; trying again in {wait} s");
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
            if let Some(by) = gate.cancelled() {
                return Err(interrupted(runner, op, by));
            }
            // A cancel drops the copy where it is (the grid aborts an import whose session
            // ends); the roll-back then destroys whatever of the target this operation made.
            let attempt = tokio::select! {
                r = copy(runner, op, src.as_ref(), dst.as_ref(), &plan) => Some(r),
                _ = gate.wait_cancelled() => None,
            };
            let Some(attempt) = attempt else {
                let by = gate.cancelled().expect("the gate says cancelled");
                return Err(interrupted(runner, op, by));
            };
            copied = attempt;
            if copied.as_ref().map_or_else(|e| e.permanent, |_| true) {
                break;
            }
        }
        conclude(runner, op, MIGRATING, copied)?;
    }
    let last = last_step(op.kind);
    runner.faults.hold(faults::HOLD_START_TARGET).await;
    // The cut-over: from here no cancel can win, and a cancel that came first stops it.
    if let Err(by) = gate.pass() {
        return Err(interrupted(runner, op, by));
    }
    if todo(op, last) {
        match op.kind {
            Kind::Migrate => {
                runner
                    .step(op, last, async {
                        source_still_stopped(src.as_ref(), &plan).await?;
                        ensure_running(dst.as_ref(), &plan.target_app)
                            .await
                            .map_err(|e| e.context("the target application did not start"))
                    })
                    .await?
            }
            Kind::Snapshot => {
                runner
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

/// The last look before the target starts: the source must not run. The verify saw it stopped,
/// but a MigHelper resumed from its journal may come here much later, and an operator may have
/// started the source meanwhile; starting the target then would make two running copies. An absent
/// source is no reason to stop: the target is then the only copy.
async fn source_still_stopped(
    src: &dyn GridController,
    plan: &crate::op::Plan,
) -> Result<(), StepError> {
    match app_state(src, &plan.source_app).await? {
        None | Some(AppState::Stopped) | Some(AppState::Failed) => Ok(()),
        Some(AppState::Stopping) => Err(StepError::from(format!(
            "source application {} on grid {} is still stopping",
            plan.source_app, plan.source_grid
        ))),
        Some(state) => Err(StepError::permanent(format!(
            "source application {} on grid {} is {state} again, so the target was not started",
            plan.source_app, plan.source_grid
        ))),
    }
}

/// Before the cut-over, undo: destroy the (partial) target if this operation made it, start the
/// source again, and hand the operation to the source MIG, which destroys this helper.
///
/// Once the target's start was sent, the target may run even though the step failed (its answer
/// lost with its grid). Then the source starts again only after the target is known to be gone:
/// a target grid that does not answer leaves both for an operator, never two running copies.
async fn roll_back(runner: &StepRunner, key: &OpKey, mut op: Op) {
    let plan = op.plan.clone();
    let target_may_run = op.kind == Kind::Migrate
        && op.has_step(STARTING_TARGET)
        && op.step(STARTING_TARGET).state != StepState::Pending;
    let undone: Vec<StepId> = [
        PRECOPYING,
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
    let failed = match &op.cancelled {
        Some(by) => by.to_string(),
        None => failed,
    };
    op.rolling_back = true;
    op.error = Some(crate::op::bounded(&failed));
    if let Err(e) = runner.commit(&mut op) {
        tracing::error!(error = %e, "cannot journal the start of the roll-back");
    }

    let target_gone = runner
        .retry("destroying the partial target", || async {
            let dst = runner.grid(&plan.target_controller)?;
            destroy_if_ours(dst.as_ref(), &plan.target_app, &op.id).await
        })
        .await;

    match &target_gone {
        Ok(Some(other)) => op.trace("step", format!("roll-back: {other}"), None, None),
        Ok(None) => {}
        Err(e) => op.leave(leftover(
            format_args!(
                "partial target {} on grid {} ({e})",
                plan.target_app, plan.target_grid
            ),
            &plan.target_controller,
            "destroy",
            &plan.target_app,
        )),
    }
    if target_may_run && target_gone.is_err() {
        tracing::error!("the target may run and its grid does not answer; holding the roll-back for an operator");
        op.leave(leftover(
            format_args!(
                "source application {} on grid {} is stopped and kept: start it once {} on grid {} is destroyed (or, if {} runs there with its data, destroy the source instead)",
                plan.source_app, plan.source_grid, plan.target_app, plan.target_grid, plan.target_app,
            ),
            &plan.source_controller,
            "start",
            &plan.source_app,
        ));
        op.leave(helper_leftover(&plan));
        // Nothing was undone: the steps that ran stay done (the source is stopped, the copy made).
        op.roll_back_rest(&[]);
        end_failed(
            runner,
            &mut op,
            format!(
                "held for an operator: {failed}; {} on grid {} may be running (its start was sent and its grid has not answered since), so the source was not started again. Finish with the leftovers' commands",
                plan.target_app, plan.target_grid
            ),
            "the held roll-back",
        );
        return;
    }
    op.roll_back_rest(&undone);
    // The source MIG runs these two when it takes the operation back.
    for s in [STOPPING_HELPER, DESTROYING_HELPER] {
        let st = op.step_mut(s);
        st.state = StepState::Pending;
        st.detail = None;
    }
    let source_up = runner
        .retry("re-starting the source application", || async {
            let src = runner.grid(&plan.source_controller)?;
            ensure_running(src.as_ref(), &plan.source_app).await
        })
        .await;
    match source_up {
        Ok(()) => {
            let url = plan.source_mig_url.clone();
            match runner.hand_off(&url, key, &mut op, Role::Target).await {
                Ok(mut next) => {
                    if let Err(e) = runner.commit(&mut next) {
                        tracing::error!(error = %e, "handed the roll-back over, but cannot journal it");
                    }
                    return;
                }
                Err(e) => op.leave(leftover(
                    format_args!(
                        "the source MIG did not take the roll-back ({e}), so MigHelper {} is left on grid {}",
                        plan.helper_app, plan.target_grid,
                    ),
                    &plan.target_controller,
                    "destroy",
                    &plan.helper_app,
                )),
            }
        }
        Err(e) => {
            op.leave(leftover(
                format_args!(
                    "source application {} could not be started again on grid {} ({e})",
                    plan.source_app, plan.source_grid,
                ),
                &plan.source_controller,
                "start",
                &plan.source_app,
            ));
            op.leave(helper_leftover(&plan));
        }
    }
    end_failed(
        runner,
        &mut op,
        format!("{failed}; the roll-back did not finish"),
        "the end of the roll-back",
    );
}
