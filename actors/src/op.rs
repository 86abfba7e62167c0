//! The operation model: one migrate or snapshot, its plan, and the monitors and steps the GUI shows.
//!
//! Plain data with serde, shared by the actors, the API, the journal and the handoff. Step and
//! monitor names exist once, as constants (in `op/names.rs`, re-exported here); they are what a
//! person reads on the page.

use serde::{Deserialize, Serialize};

mod names;
pub use names::*;

/// The template MIG provisions on the target grid for one operation.
pub const HELPER_TEMPLATE: &str = "MigHelper";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Migrate,
    Snapshot,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Migrate => "migrate",
            Kind::Snapshot => "snapshot",
        }
    }

    /// The steps of each monitor, in the order they run.
    pub fn monitors(self) -> [(&'static str, &'static [StepId]); 3] {
        match self {
            Kind::Migrate => [
                (SOURCE_MONITOR, &[PROVISIONING_HELPER]),
                (
                    HELPER_MONITOR,
                    &[STOPPING_SOURCE, MIGRATING, STARTING_TARGET],
                ),
                (
                    TARGET_MONITOR,
                    &[DESTROYING_SOURCE, STOPPING_HELPER, DESTROYING_HELPER],
                ),
            ],
            Kind::Snapshot => [
                (SOURCE_MONITOR, &[PROVISIONING_HELPER]),
                (
                    HELPER_MONITOR,
                    &[STOPPING_SOURCE, MIGRATING, RESTARTING_SOURCE],
                ),
                (RESTART_MONITOR, &[STOPPING_HELPER, DESTROYING_HELPER]),
            ],
        }
    }

    /// The steps of each monitor for a plan: the seed's, with MigHelper's pre-copy first when
    /// the plan asks for it.
    pub fn monitors_for(self, precopy: bool) -> Vec<(&'static str, Vec<StepId>)> {
        self.monitors()
            .iter()
            .map(|(name, steps)| {
                let mut v = steps.to_vec();
                if precopy && *name == HELPER_MONITOR {
                    v.insert(0, PRECOPYING);
                }
                (*name, v)
            })
            .collect()
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "migrate" => Ok(Kind::Migrate),
            "snapshot" => Ok(Kind::Snapshot),
            other => Err(format!(
                "unknown operation {other:?}: use migrate or snapshot"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpState {
    Running,
    Succeeded,
    Failed,
    RolledBack,
    /// Rolled back because a person cancelled it before the cut-over.
    Cancelled,
}

impl OpState {
    pub fn is_running(self) -> bool {
        self == OpState::Running
    }

    pub fn is_final(self) -> bool {
        !self.is_running()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Pending,
    Running,
    Done,
    Failed,
    RolledBack,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub name: StepId,
    pub state: StepState,
    /// RFC 3339, UTC.
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    /// What happened, in words a person can act on (the reason of a failure, what was undone).
    pub detail: Option<String>,
    pub bytes_done: Option<u64>,
    pub bytes_total: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Monitor {
    pub name: String,
    /// The grid the monitor's actor runs on.
    pub grid: String,
    pub steps: Vec<Step>,
}

/// Who drives the operation now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Source,
    Helper,
    Target,
}

impl Role {
    /// The role that hands the operation to this one.
    pub fn previous(self) -> Option<Role> {
        match self {
            Role::Source => None,
            Role::Helper => Some(Role::Source),
            Role::Target => Some(Role::Helper),
        }
    }

    /// The actor's name in log lines and spans.
    pub fn actor(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Helper => "mig_helper",
            Role::Target => "target",
        }
    }
}

/// Everything an instance needs to play its part, fixed when the operation starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub source_grid: String,
    pub target_grid: String,
    pub source_app: String,
    pub target_app: String,
    /// `[user@]host[:port]` of each grid's controller.
    pub source_controller: String,
    pub target_controller: String,
    /// Where the page follows the operation: source MIG, then MigHelper, then the MIG of the
    /// application that runs at the end (the target for a migrate, the source for a snapshot).
    pub source_mig_url: String,
    pub helper_url: String,
    pub final_mig_url: String,
    /// The MigHelper application on the target grid, and its properties (MigHelper_config).
    pub helper_app: String,
    pub helper_config: Vec<(String, String)>,
    /// The target grid's app_config, applied to the copy.
    pub target_app_config: Vec<(String, String)>,
    /// The most bytes per second the copy may move (`max_rate`); `None`: no limit. Absent in
    /// records written before the limit existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rate: Option<u64>,

    /// `precopy = on`: MigHelper pre-copies the data while the source runs, then moves only
    /// what changed once it is stopped. Absent (a plan from before it): off.
    #[serde(default)]
    pub precopy: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub id: String,
    pub kind: Kind,
    pub state: OpState,
    /// Why the operation failed or was rolled back.
    pub error: Option<String>,
    pub monitors: Vec<Monitor>,
    pub plan: Plan,
    pub owner: Role,
    /// True once a failure before the cut-over has turned the operation into a roll-back.
    pub rolling_back: bool,
    /// What is left over after a failure, each with the command that clears it.
    pub leftovers: Vec<String>,
    /// Bumped on every change, so a reader can tell the newer of two copies.
    pub version: u64,
    /// The sequence number of the last handoff; each handoff signs a higher one.
    pub seq: u64,
    /// Who cancelled the operation and when, once a cancel has won over the cut-over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled: Option<Cancelled>,
    /// The W3C trace id every instance's spans and `traceparent` headers carry for this operation.
    #[serde(default)]
    pub trace_id: String,
    /// The operation's own timeline across every instance: steps, handoffs, grid commands. It
    /// travels with each handoff, so the last instance can show all of it; bounded by [`MAX_TRACE`].
    #[serde(default)]
    pub trace: Vec<TraceEvent>,
}

/// Who cancelled an operation: the GUI user (`anonymous` when the MIG asks for no credentials),
/// the client's address, and when (RFC 3339, UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancelled {
    pub user: String,
    pub from: String,
    pub at: String,
}

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cancelled by {} from {} at {}",
            self.user, self.from, self.at
        )
    }
}

/// The most trace events an operation carries; past it the oldest command events are dropped
/// (steps and handoffs are kept), so a handoff stays small.
pub const MAX_TRACE: usize = 400;

/// One event of an operation's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceEvent {
    /// RFC 3339, UTC.
    pub at: String,
    /// Which instance: `source MIG`, `MigHelper` or `target MIG`, with its grid.
    pub instance: String,
    /// `step`, `handoff` or `command`.
    pub kind: String,
    /// What happened: `<step> started`, `handoff to <url>`, `app stop shop`, …
    pub what: String,
    /// How long it took, for what has a duration.
    pub millis: Option<u64>,
    /// Its outcome when it failed.
    pub error: Option<String>,
}

/// How long a finished step took, in seconds.
pub fn duration(step: &Step) -> Option<f64> {
    let start = humantime::parse_rfc3339(step.started_at.as_deref()?).ok()?;
    let end = humantime::parse_rfc3339(step.ended_at.as_deref()?).ok()?;
    Some(end.duration_since(start).ok()?.as_secs_f64())
}

/// Bytes per second of a migrating step in progress.
pub fn copy_rate(op: &Op) -> Option<f64> {
    let s = op
        .monitors
        .iter()
        .flat_map(|m| &m.steps)
        .find(|s| s.name == MIGRATING)?;
    if s.state != StepState::Running {
        return None;
    }
    let start = humantime::parse_rfc3339(s.started_at.as_deref()?).ok()?;
    let secs = std::time::SystemTime::now()
        .duration_since(start)
        .ok()?
        .as_secs_f64();
    (secs > 0.0).then(|| s.bytes_done.unwrap_or(0) as f64 / secs)
}

/// The most bytes of one error or detail text an operation keeps. A controller's stderr can be
/// megabytes; kept whole it would swell the journal and the next handoff past the receiver's
/// body limit, and then the roll-back itself could not be handed over.
pub const MAX_TEXT: usize = 4096;

/// `text`, cut to at most [`MAX_TEXT`] bytes (on a character boundary) with how much was left out.
pub fn bounded(text: &str) -> String {
    if text.len() <= MAX_TEXT {
        return text.to_string();
    }
    let mut end = MAX_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… {} bytes more", &text[..end], text.len() - end)
}

/// The name of the MigHelper application of operation `op_id`: derived from the id, so MigHelper
/// knows its own name (to check that a handoff is addressed to it) without being told.
pub fn helper_app_name(op_id: &str) -> String {
    format!("mighelper-{}", op_id.get(..8).unwrap_or(op_id))
}

/// Now, as RFC 3339 with milliseconds.
pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// A fresh operation id: 128 random bits, as 32 hex digits.
pub fn new_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Checks that `id` looks like one of ours before it is used as a file name or a key.
pub fn valid_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Op {
    pub fn new(id: String, kind: Kind, plan: Plan) -> Op {
        let grids = [&plan.source_grid, &plan.target_grid, &{
            match kind {
                Kind::Migrate => plan.target_grid.clone(),
                Kind::Snapshot => plan.source_grid.clone(),
            }
        }];
        let monitors = kind
            .monitors_for(plan.precopy)
            .iter()
            .zip(grids)
            .map(|((name, steps), grid)| Monitor {
                name: name.to_string(),
                grid: grid.clone(),
                steps: steps
                    .iter()
                    .map(|s| Step {
                        name: *s,
                        state: StepState::Pending,
                        started_at: None,
                        ended_at: None,
                        detail: None,
                        bytes_done: None,
                        bytes_total: None,
                    })
                    .collect(),
            })
            .collect();
        Op {
            id,
            kind,
            state: OpState::Running,
            error: None,
            monitors,
            plan,
            owner: Role::Source,
            rolling_back: false,
            leftovers: Vec::new(),
            cancelled: None,
            version: 0,
            seq: 0,
            trace_id: format!("{:032x}", rand::random::<u128>()),
            trace: Vec::new(),
        }
    }

    /// Checks that an operation that arrived from outside (a handoff, a journal file) has the
    /// monitors and steps its kind has, in order, and a plan that names MigHelper as
    /// [`helper_app_name`] does: the actors look steps up by name and rely on this.
    pub fn check_shape(&self) -> Result<(), String> {
        if !valid_id(&self.id) {
            return Err("the operation id is not 32 lowercase hex digits".into());
        }
        let want = self.kind.monitors_for(self.plan.precopy);
        let same = self.monitors.len() == want.len()
            && self.monitors.iter().zip(&want).all(|(m, (name, steps))| {
                m.name == *name
                    && m.steps.len() == steps.len()
                    && m.steps.iter().zip(steps).all(|(s, id)| s.name == *id)
            });
        if !same {
            return Err(format!(
                "the monitors and steps are not those of a {} operation",
                self.kind.as_str()
            ));
        }
        if self.plan.helper_app != helper_app_name(&self.id) {
            return Err(format!(
                "the plan names MigHelper {:?}; this operation's is {}",
                self.plan.helper_app,
                helper_app_name(&self.id)
            ));
        }
        Ok(())
    }

    /// The first 8 hex digits, used in the MigHelper's name.
    pub fn short_id(&self) -> &str {
        &self.id[..8]
    }

    pub fn step(&self, name: StepId) -> &Step {
        self.monitors
            .iter()
            .flat_map(|m| &m.steps)
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no step {name:?} in a {} operation", self.kind.as_str()))
    }

    pub fn step_mut(&mut self, name: StepId) -> &mut Step {
        self.version += 1;
        let kind = self.kind.as_str();
        self.monitors
            .iter_mut()
            .flat_map(|m| &mut m.steps)
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no step {name:?} in a {kind} operation"))
    }

    pub fn has_step(&self, name: StepId) -> bool {
        self.monitors
            .iter()
            .flat_map(|m| &m.steps)
            .any(|s| s.name == name)
    }

    /// The instance that drives the operation now, as the trace names it.
    pub fn instance(&self) -> String {
        match self.owner {
            Role::Source => format!("source MIG ({})", self.plan.source_grid),
            Role::Helper => format!("MigHelper ({})", self.plan.target_grid),
            Role::Target if self.rolling_back || self.kind == Kind::Snapshot => {
                format!("re-started source MIG ({})", self.plan.source_grid)
            }
            Role::Target => format!("target MIG ({})", self.plan.target_grid),
        }
    }

    /// Adds an event to the timeline, by the instance that drives the operation now.
    pub fn trace(&mut self, kind: &str, what: String, millis: Option<u64>, error: Option<String>) {
        self.trace_at(now(), kind, what, millis, error);
    }

    /// Adds an event that happened at `at` (RFC 3339 UTC, which sorts as text), keeping the
    /// timeline in time order: a grid command is recorded when its step commits, after it ran.
    pub fn trace_at(
        &mut self,
        at: String,
        kind: &str,
        what: String,
        millis: Option<u64>,
        error: Option<String>,
    ) {
        let event = TraceEvent {
            at,
            instance: self.instance(),
            kind: kind.to_string(),
            what: bounded(&what),
            millis,
            error: error.as_deref().map(bounded),
        };
        let i = self.trace.partition_point(|e| e.at <= event.at);
        self.trace.insert(i, event);
        if self.trace.len() > MAX_TRACE {
            if let Some(i) = self.trace.iter().position(|e| e.kind == "command") {
                self.trace.remove(i);
            } else {
                self.trace.remove(0);
            }
        }
    }

    pub fn start_step(&mut self, name: StepId) {
        self.trace("step", format!("{name}: started"), None, None);
        let s = self.step_mut(name);
        s.state = StepState::Running;
        if s.started_at.is_none() {
            s.started_at = Some(now());
        }
        s.ended_at = None;
    }

    pub fn finish_step(&mut self, name: StepId, detail: Option<String>) {
        let took = self.step_millis(name);
        self.trace("step", format!("{name}: done"), took, None);
        let s = self.step_mut(name);
        s.state = StepState::Done;
        s.ended_at = Some(now());
        if let Some(d) = detail {
            s.detail = Some(bounded(&d));
        }
    }

    pub fn fail_step(&mut self, name: StepId, reason: &str) {
        let took = self.step_millis(name);
        self.trace(
            "step",
            format!("{name}: failed"),
            took,
            Some(reason.to_string()),
        );
        let s = self.step_mut(name);
        s.state = StepState::Failed;
        s.ended_at = Some(now());
        s.detail = Some(bounded(reason));
    }

    fn step_millis(&self, name: StepId) -> Option<u64> {
        let start = humantime::parse_rfc3339(self.step(name).started_at.as_deref()?).ok()?;
        let ms = std::time::SystemTime::now()
            .duration_since(start)
            .ok()?
            .as_millis();
        u64::try_from(ms).ok()
    }

    /// The id of the span in which `role` drives this operation (16 hex digits, never zero):
    /// derived from the trace id, so each instance can name its own span and the one it continues
    /// (see [`crate::telemetry`]).
    pub fn span_id(&self, role: Role) -> String {
        let h = blake3::hash(format!("{}/{}", self.trace_id, role.actor()).as_bytes());
        let id = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
        format!("{:016x}", id.max(1))
    }

    /// The `traceparent` header of a call made for the operation while it passes to its owner
    /// (a handoff to it, or asking it whether it took one): the sender's span is the parent.
    pub fn traceparent(&self) -> String {
        let sender = self.owner.previous().unwrap_or(self.owner);
        format!("00-{}-{}-01", self.trace_id, self.span_id(sender))
    }

    pub fn set_progress(&mut self, name: StepId, done: u64, total: u64) {
        let s = self.step_mut(name);
        s.bytes_done = Some(done);
        s.bytes_total = Some(total);
    }

    /// Marks every step that did not finish as rolled back: those that ran were undone, those
    /// that never ran will not.
    pub fn roll_back_rest(&mut self, undone: &[StepId]) {
        self.version += 1;
        for s in self.monitors.iter_mut().flat_map(|m| &mut m.steps) {
            match s.state {
                StepState::Done if undone.contains(&s.name) => {
                    s.state = StepState::RolledBack;
                    s.detail = Some("undone by the roll-back".into());
                }
                StepState::Pending | StepState::Running => {
                    s.state = StepState::RolledBack;
                    s.detail = Some("not run: the operation was rolled back".into());
                }
                _ => {}
            }
        }
    }

    /// Records something left over, with the command that clears it (bounded like every text).
    pub fn leave(&mut self, what: String) {
        self.version += 1;
        self.leftovers.push(bounded(&what));
    }

    pub fn end(&mut self, state: OpState, error: Option<String>) {
        self.version += 1;
        self.state = state;
        if let Some(e) = error {
            self.error = Some(bounded(&e));
        }
    }

    /// The state an operation that was undone before the cut-over ends in: `cancelled` when a
    /// person cancelled it, `rolled_back` when a step failed.
    pub fn undone_state(&self) -> OpState {
        if self.cancelled.is_some() {
            OpState::Cancelled
        } else {
            OpState::RolledBack
        }
    }

    /// The grid where the application runs once the operation is past its cut-over.
    pub fn runs_on_after_cut_over(&self) -> &str {
        match self.kind {
            Kind::Migrate => &self.plan.target_grid,
            Kind::Snapshot => &self.plan.source_grid,
        }
    }

    /// The name of the monitor that runs last (Target, or Re-Start Source).
    pub fn last_monitor(&self) -> &str {
        &self.monitors[2].name
    }
}

#[cfg(test)]
pub(crate) mod tests;
