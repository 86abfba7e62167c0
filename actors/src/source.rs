//! **Source**, in the source MIG: checks a new operation before anything changes, then runs the
//! Source Application Monitor's one step, "provisioning MigHelper on the target grid", and hands
//! the operation to MigHelper.
//!
//! A failure here rolls back at once (MigHelper destroyed if it was made); the source application
//! has not been touched yet.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;
use tracing::Instrument;

use crate::auth::{AppKey, GuiCredentials};
use crate::cancel::{Cancel, CancelError, Gate, GateState};
use crate::dry_run::Check;
use crate::grid_info::{Grid, GridInfo};
use crate::handoff::HelperEnv;
use crate::op::{
    self, Cancelled, Kind, Op, OpState, Plan, Role, HELPER_TEMPLATE, PROVISIONING_HELPER,
};
use crate::properties::Mode;
use crate::runner::{destroy_if_ours, StepError, StepRunner, MARK};

/// The port MigHelper's API listens on (its template's `port_no`).
pub const HELPER_PORT: u16 = 8080;

/// What the Source knows of where it runs. Built once at start-up.
pub struct SourceConfig {
    pub mode: Mode,
    /// The application MIG lives in, as its grid names it; `None`: operations are off.
    pub app_name: Option<String>,
    /// grid.info and the id of the grid MIG runs on, or why MIG cannot offer operations.
    pub site: Result<(GridInfo, String), String>,
    pub app_key: AppKey,
    /// The application's private key and pinned host keys, handed to MigHelper in `env`.
    pub private_key: String,
    pub known_hosts: String,
    /// The `otlp_endpoint` property, passed on to MigHelper.
    pub otlp_endpoint: Option<String>,
    /// The `precopy` property: operations pre-copy the data while the source runs.
    pub precopy: bool,
    /// The GUI credentials, which MigHelper checks (by a MAC of the password) before a cancel.
    pub gui: Option<GuiCredentials>,
}

pub struct Source {
    cfg: Arc<SourceConfig>,
    runner: StepRunner,
    /// The gate of each operation this Source drives: a cancel against the handoff to MigHelper.
    gates: HashMap<String, Gate>,
}

impl Source {
    pub fn new(cfg: SourceConfig, runner: StepRunner) -> Source {
        Source {
            cfg: Arc::new(cfg),
            runner,
            gates: HashMap::new(),
        }
    }

    fn provision(&mut self, op: Op, ctx: &mut Context<Self>) {
        let gate = Gate::of(&op);
        let id = op.id.clone();
        self.gates.insert(id.clone(), gate.clone());
        ctx.spawn(
            provision(self.cfg.clone(), self.runner.clone(), gate, op)
                .into_actor(self)
                .map(move |(), act, _| {
                    act.gates.remove(&id);
                }),
        );
    }
}

impl Handler<Cancel> for Source {
    type Result = Result<Cancelled, CancelError>;

    /// Before the handoff to MigHelper a cancel wins (the provisioning in flight ends, then
    /// MigHelper is destroyed); once the handoff has begun, the cancel is for MigHelper.
    fn handle(&mut self, c: Cancel, _ctx: &mut Context<Self>) -> Self::Result {
        tracing::info!(op_id = %c.op_id, message = "Cancel", from = "http", to = "source", "actor message");
        let Some(gate) = self.gates.get(&c.op_id) else {
            return Err(CancelError::Moved);
        };
        match gate.cancel(c.by) {
            Ok(by) => Ok(by),
            Err(GateState::CutOver) => Err(CancelError::Moved),
            Err(_) => Err(CancelError::Conflict(format!(
                "operation {} is already being rolled back",
                c.op_id
            ))),
        }
    }
}

impl Actor for Source {
    type Context = Context<Self>;

    /// Picks up an operation this MIG was provisioning when it stopped: provisioning is
    /// idempotent, so it simply runs again.
    fn started(&mut self, ctx: &mut Context<Self>) {
        for op in self.runner.book.running_owned_by(Role::Source) {
            tracing::info!(op_id = %op.id, "resuming provisioning from the journal");
            self.provision(op, ctx);
        }
    }
}

/// `POST /api/v1/ops`.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<Started, StartError>")]
pub struct StartOp {
    pub kind: String,
    pub target_app: String,
    pub target_grid: String,
    /// The copy's bandwidth limit in bytes per second (already checked); `None`: no limit.
    pub max_rate: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Started {
    pub id: String,
}

/// `POST /api/v1/ops` with `"dry_run": true`: every check of [`crate::dry_run`], nothing changed.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<Vec<Check>, StartError>")]
pub struct DryRun {
    pub kind: String,
    pub target_app: String,
    pub target_grid: String,
}

/// Why an operation was not started. Nothing has changed on any grid in any of these cases.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("operation {id} is still running; wait for it to end")]
    Busy { id: String },
    #[error("operations are not offered here: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Grid(String),
    #[error("cannot journal the operation: {0}")]
    Journal(String),
    /// A check of the dry run failed; the list says which and what to fix.
    #[error("a check failed, so nothing was started: {}", crate::dry_run::failures(.0))]
    Checks(Vec<Check>),
}

impl StartError {
    pub fn status(&self) -> u16 {
        match self {
            StartError::Invalid(_) => 400,
            StartError::Forbidden(_) => 403,
            StartError::Busy { .. } => 409,
            StartError::Unavailable(_) => 503,
            StartError::Grid(_) => 502,
            StartError::Journal(_) => 500,
            StartError::Checks(_) => 412,
        }
    }
}

impl Handler<StartOp> for Source {
    // Atomic: the checks and the creation of the operation happen as one, so two requests cannot
    // both pass the "nothing is running" check.
    type Result = AtomicResponse<Self, Result<Started, StartError>>;

    fn handle(&mut self, msg: StartOp, _ctx: &mut Context<Self>) -> Self::Result {
        tracing::info!(message = "StartOp", from = "http", to = "source", kind = %msg.kind, target_grid = %msg.target_grid, "actor message");
        let cfg = self.cfg.clone();
        let runner = self.runner.clone();
        let checked = check_request(&cfg, &runner, &msg, false);
        AtomicResponse::new(Box::pin(
            async move {
                let (kind, plan) = checked?;
                check_grids(&runner, &plan).await?;
                // The dry run's checks, every time: a start that one of them would refuse
                // changes nothing.
                let checks = crate::dry_run::run(&runner, cfg.mode, kind, &plan).await;
                if checks.iter().any(|c| !c.ok) {
                    return Err(StartError::Checks(checks));
                }
                let mut op = Op::new(op::new_id(), kind, plan);
                op.plan.helper_app = op::helper_app_name(&op.id);
                runner
                    .commit(&mut op)
                    .map_err(StartError::Journal)?;
                tracing::info!(op_id = %op.id, kind = kind.as_str(), target_grid = %op.plan.target_grid,
                    target_app = %op.plan.target_app, "operation started");
                Ok(op)
            }
            .into_actor(self)
            .map(|res: Result<Op, StartError>, act, ctx| {
                let op = res?;
                let id = op.id.clone();
                act.provision(op, ctx);
                Ok(Started { id })
            }),
        ))
    }
}

impl Handler<DryRun> for Source {
    type Result = ResponseFuture<Result<Vec<Check>, StartError>>;

    fn handle(&mut self, msg: DryRun, _ctx: &mut Context<Self>) -> Self::Result {
        tracing::info!(message = "DryRun", from = "http", to = "source", kind = %msg.kind, target_grid = %msg.target_grid, "actor message");
        let (cfg, runner) = (self.cfg.clone(), self.runner.clone());
        let start = StartOp {
            kind: msg.kind,
            target_app: msg.target_app,
            target_grid: msg.target_grid,
            // Checks do not depend on the limit.
            max_rate: None,
        };
        let checked = check_request(&cfg, &runner, &start, true);
        Box::pin(async move {
            let (kind, plan) = checked?;
            Ok(crate::dry_run::run(&runner, cfg.mode, kind, &plan).await)
        })
    }
}

/// The checks that need no grid: kind, mode, names, grids, one at a time. A bad request is
/// refused here, before any SSH connection. A dry run reports the mode as one of its checks, and
/// runs while another operation does.
fn check_request(
    cfg: &SourceConfig,
    runner: &StepRunner,
    msg: &StartOp,
    dry_run: bool,
) -> Result<(Kind, Plan), StartError> {
    let kind: Kind = msg.kind.parse().map_err(StartError::Invalid)?;
    if !dry_run && !cfg.mode.allows(kind.as_str()) {
        return Err(StartError::Forbidden(format!(
            "this MIG's mode does not allow {}",
            kind.as_str()
        )));
    }
    let (gi, own_id) = cfg
        .site
        .as_ref()
        .map_err(|why| StartError::Unavailable(why.clone()))?;
    let app = cfg.app_name.clone().ok_or_else(|| {
        StartError::Unavailable(
            "app_name is not set, so MIG does not know which application it is".into(),
        )
    })?;
    dialect::AppName::new(&msg.target_app)
        .map_err(|e| StartError::Invalid(format!("target_app: {e}")))?;
    let target: &Grid = gi.get(&msg.target_grid).ok_or_else(|| {
        StartError::Invalid(format!(
            "target_grid: no grid {:?} in grid.info",
            msg.target_grid
        ))
    })?;
    if target.id == *own_id {
        return Err(StartError::Invalid(format!(
            "target_grid: {} is the grid this application runs on; pick another",
            target.id
        )));
    }
    if let Some(running) = runner.book.any_running().filter(|_| !dry_run) {
        return Err(StartError::Busy { id: running.id });
    }
    let source = gi.get(own_id).expect("own grid is in grid.info");
    let final_grid = match kind {
        Kind::Migrate => target,
        Kind::Snapshot => source,
    };
    let helper_ip = target
        .mighelper("in_ip")
        .expect("grid.info checks MigHelper_config has in_ip");
    Ok((
        kind,
        Plan {
            source_grid: source.id.clone(),
            target_grid: target.id.clone(),
            source_app: app,
            target_app: msg.target_app.clone(),
            source_controller: source.controller.to_string(),
            target_controller: target.controller.to_string(),
            source_mig_url: format!("http://{}", source.mig_ip),
            helper_url: format!("http://{helper_ip}:{HELPER_PORT}"),
            final_mig_url: format!("http://{}", final_grid.mig_ip),
            helper_app: String::new(),
            helper_config: target.mighelper_config.clone(),
            target_app_config: target.app_config.clone(),
            max_rate: msg.max_rate,

            precopy: cfg.precopy,
        },
    ))
}

/// The checks that need the grids: both controllers answer (with pinned keys), the source
/// application exists here, the target name is free there.
async fn check_grids(runner: &StepRunner, plan: &Plan) -> Result<(), StartError> {
    let grid = |c: &str| runner.grid(c).map_err(StartError::Grid);
    let (src, dst) = (
        grid(&plan.source_controller)?,
        grid(&plan.target_controller)?,
    );
    let (src_apps, dst_apps) = tokio::join!(src.list(), dst.list());
    let src_apps =
        src_apps.map_err(|e| StartError::Grid(format!("source grid {}: {e}", plan.source_grid)))?;
    let dst_apps =
        dst_apps.map_err(|e| StartError::Grid(format!("target grid {}: {e}", plan.target_grid)))?;
    if !src_apps.iter().any(|a| a.name == plan.source_app) {
        return Err(StartError::Unavailable(format!(
            "grid {} has no application {} (is app_name right?)",
            plan.source_grid, plan.source_app
        )));
    }
    if dst_apps.iter().any(|a| a.name == plan.target_app) {
        return Err(StartError::Invalid(format!(
            "target_app: grid {} already has an application {}; pick another name",
            plan.target_grid, plan.target_app
        )));
    }
    Ok(())
}

/// "provisioning MigHelper on the target grid", then the handoff to MigHelper; on failure, the
/// roll-back (MigHelper destroyed).
async fn provision(cfg: Arc<SourceConfig>, runner: StepRunner, gate: Gate, mut op: Op) {
    let span = crate::telemetry::op_span(Role::Source, &op);
    async move {
        let k_op = cfg.app_key.op_key(&op.id);
        let op_id = op.id.clone();
        let env = HelperEnv {
            op_id: op.id.clone(),
            k_op: k_op.to_hex(),
            private_key: cfg.private_key.clone(),
            known_hosts: cfg.known_hosts.clone(),
            otlp_endpoint: cfg.otlp_endpoint.clone(),
            gui: cfg.gui.as_ref().map(|g| g.for_helper(&k_op)),
        };
        let plan = op.plan.clone();
        let provisioned = runner
            .step(&mut op, PROVISIONING_HELPER, async {
                let target = runner.grid(&plan.target_controller)?;
                if crate::runner::app_state(target.as_ref(), &plan.helper_app).await?.is_none() {
                    let mut props = plan.helper_config.clone();
                    props.push(("env".into(), env.encode()));
                    props.push((MARK.into(), op_id.clone()));
                    target
                        .provision(HELPER_TEMPLATE, &plan.helper_app, &props)
                        .await
                        .map_err(|e| StepError::from(e).context(format!("cannot provision MigHelper on grid {}", plan.target_grid)))?;
                }
                Ok(())
            })
            .await;
        // The point of no return here is the handoff: once it is sent, MigHelper may own the
        // operation. A cancel that came first stops it.
        let provisioned = match provisioned.map(|()| gate.pass()) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(by)) => {
                tracing::warn!(%by, "cancelled before the handoff to MigHelper; rolling back");
                op.trace("step", by.to_string(), None, None);
                op.cancelled = Some(by);
                Err(())
            }
            Err(_) => {
                // A cancel that won meanwhile still names the end state.
                gate.rolling_back();
                op.cancelled = gate.cancelled();
                Err(())
            }
        };
        if provisioned.is_ok() {
            match runner.hand_off(&plan.helper_url, &k_op, &mut op, Role::Helper).await {
                Ok(next) => {
                    op = next;
                    if let Err(e) = runner.commit(&mut op) {
                        tracing::error!(error = %e, "handed off, but cannot journal it");
                    }
                    return;
                }
                Err(e) if !e.not_taken => {
                    // MigHelper may own the operation (and may have stopped the source): it
                    // finishes or rolls back by itself, so nothing here may undo it.
                    tracing::error!(error = %e, "MigHelper did not confirm the handoff; leaving the operation to it");
                    op.fail_step(PROVISIONING_HELPER, &format!("MigHelper did not confirm that it took the operation: {e}"));
                    op.end(OpState::Failed, Some(format!("held for an operator: MigHelper {} on grid {} did not confirm that it took the operation ({e}); nothing was undone. Open its page at {}/ops/{} to follow it", plan.helper_app, plan.target_grid, plan.helper_url, op.id)));
                    if let Err(e) = runner.commit(&mut op) {
                        tracing::error!(error = %e, "cannot journal the held operation");
                    }
                    return;
                }
                Err(e) => op.fail_step(PROVISIONING_HELPER, &format!("MigHelper did not take the operation: {e}")),
            }
        }
        // Roll back: the source was never touched; only MigHelper may exist.
        let reason = op.step(PROVISIONING_HELPER).detail.clone().unwrap_or_default();
        let cleanup = runner
            .retry("destroying MigHelper", || async {
                let target = runner.grid(&plan.target_controller)?;
                match destroy_if_ours(target.as_ref(), &plan.helper_app, &op_id).await? {
                    None => Ok(()),
                    Some(other) => Err(StepError::permanent(other)),
                }
            })
            .await;
        let reason = match op.cancelled.clone() {
            Some(by) => {
                let undone = (op.step(PROVISIONING_HELPER).state == crate::op::StepState::Done)
                    .then_some(PROVISIONING_HELPER);
                op.roll_back_rest(undone.as_slice());
                by.to_string()
            }
            None => {
                op.roll_back_rest(&[]);
                format!("{PROVISIONING_HELPER} failed: {reason}")
            }
        };
        match cleanup {
            Ok(()) => {
                let state = op.undone_state();
                op.end(state, Some(reason));
            }
            Err(e) => {
                op.leave(crate::runner::helper_leftover(&plan));
                op.end(
                    OpState::Failed,
                    Some(format!("{reason}; MigHelper could not be destroyed: {e}")),
                );
            }
        }
        if let Err(e) = runner.commit(&mut op) {
            tracing::error!(error = %e, "cannot journal the roll-back");
        }
        tracing::warn!(state = ?op.state, "operation ended before the handoff");
    }
    .instrument(span)
    .await
}
