//! The public view of an operation: what anyone holding its id may read, cross-origin and without
//! credentials (`GET /api/v1/ops/{id}`, its live stream, its timeline).
//!
//! The operation's full record ([`Op`]) names the grid controllers (`user@host:port`), the target
//! grid's `app_config` and MigHelper's properties, the commands that clear leftovers, and the
//! controllers' own error output. None of that is needed to follow the operation, and MigHelper,
//! which has no credentials, serves its operation to anyone with the id. So the public routes
//! serve [`OpView`]: exactly what the monitor page (`web/assets/monitor.js`) and the CLI follower use,
//! with free text (step details, the error, the timeline) passed through [`Redactor`]. The full
//! record stays behind the GUI credentials (`GET /api/v1/ops/{id}/record`).
//!
//! It lives beside the route table ([`super`]) so the server, the CLI client and the test fake
//! read and write one wire format (the `mig-web` crate re-exports it as `mig_web::view`).

use crate::op::{Cancelled, Kind, Monitor, Op, OpState, Plan, Role, TraceEvent};
use serde::{Deserialize, Serialize};

/// The longest free text (a step's detail, the error, a leftover) the public view carries, in
/// characters: enough for a reason a person can act on, not for a dump of a controller's output.
pub const MAX_TEXT: usize = 300;

/// What the page says instead of a controller's own output (its stderr, or output MIG could not
/// parse), which may quote the application's configuration.
pub const OUTPUT_WITHHELD: &str = "(the controller's output is in the full record)";

/// The plan, as far as following the operation needs it: names, grids, and the three instances'
/// URLs the page follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanView {
    pub source_grid: String,
    pub target_grid: String,
    pub source_app: String,
    pub target_app: String,
    pub source_mig_url: String,
    pub helper_url: String,
    pub final_mig_url: String,
    /// The copy's bandwidth limit in bytes per second, shown beside the rate; `None`: no limit.
    #[serde(default)]
    pub max_rate: Option<u64>,
}

/// An operation as the public routes serve it. The JSON keeps the API's shape (`id`, `kind`,
/// `state`, `error`, `monitors`, …) so the page and scripts read it as before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpView {
    pub id: String,
    pub kind: Kind,
    pub state: OpState,
    /// Why the operation failed or was rolled back (redacted, bounded).
    pub error: Option<String>,
    /// The monitors and steps, each step's detail redacted and bounded.
    pub monitors: Vec<Monitor>,
    pub plan: PlanView,
    pub owner: Role,
    pub rolling_back: bool,
    /// What is left over after a failure, each without the command that clears it (the full
    /// record has those).
    pub leftovers: Vec<String>,
    /// The page keeps the copy with the highest version.
    pub version: u64,
    /// Correlates the operation's spans; a random id, nothing else.
    pub trace_id: String,
    /// Who cancelled the operation and when (the page says so, and hides its Cancel button).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled: Option<Cancelled>,
}

/// An operation's timeline as the public routes serve it, every event redacted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceView {
    pub id: String,
    pub kind: Kind,
    pub state: OpState,
    pub trace_id: String,
    pub events: Vec<TraceEvent>,
}

impl OpView {
    /// The public view of `op`.
    pub fn of(op: &Op) -> OpView {
        let r = Redactor::new(&op.plan);
        let p = &op.plan;
        let mut monitors = op.monitors.clone();
        for s in monitors.iter_mut().flat_map(|m| &mut m.steps) {
            s.detail = s.detail.as_deref().map(|d| r.text(d));
        }
        OpView {
            id: op.id.clone(),
            kind: op.kind,
            state: op.state,
            error: op.error.as_deref().map(|e| r.text(e)),
            monitors,
            plan: PlanView {
                source_grid: p.source_grid.clone(),
                target_grid: p.target_grid.clone(),
                source_app: p.source_app.clone(),
                target_app: p.target_app.clone(),
                source_mig_url: p.source_mig_url.clone(),
                helper_url: p.helper_url.clone(),
                final_mig_url: p.final_mig_url.clone(),
                max_rate: p.max_rate,
            },
            owner: op.owner,
            rolling_back: op.rolling_back,
            leftovers: op.leftovers.iter().map(|l| r.leftover(l)).collect(),
            version: op.version,
            trace_id: op.trace_id.clone(),
            cancelled: op.cancelled.clone(),
        }
    }

    /// The URL of the instance that drives the operation now (during a roll-back after the
    /// handoff to the final MIG, the re-started source's).
    pub fn owner_url(&self) -> &str {
        let p = &self.plan;
        match self.owner {
            Role::Source => &p.source_mig_url,
            Role::Helper => &p.helper_url,
            Role::Target if self.rolling_back => &p.source_mig_url,
            Role::Target => &p.final_mig_url,
        }
    }
}

impl TraceView {
    /// The public timeline of `op`: grid commands keep their verb and application, but the
    /// controller they ran on is named by its grid.
    pub fn of(op: &Op) -> TraceView {
        let r = Redactor::new(&op.plan);
        TraceView {
            id: op.id.clone(),
            kind: op.kind,
            state: op.state,
            trace_id: op.trace_id.clone(),
            events: op
                .trace
                .iter()
                .map(|e| TraceEvent {
                    what: r.text(&e.what),
                    error: e.error.as_deref().map(|x| r.text(x)),
                    ..e.clone()
                })
                .collect(),
        }
    }
}

/// One line of this instance's history (`GET /api/v1/ops`, and the list on the form page): what
/// ran, where to, how it ended, when and for how long, and where to read more.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpSummary {
    pub id: String,
    pub kind: Kind,
    pub state: OpState,
    pub source_grid: String,
    pub source_app: String,
    pub target_grid: String,
    pub target_app: String,
    /// RFC 3339, UTC: the first thing the operation did, as far as this instance knows it.
    pub started_at: Option<String>,
    /// RFC 3339, UTC: when it ended (`None` while it runs).
    pub ended_at: Option<String>,
    /// Seconds from start to end, or to now while it runs.
    pub duration_secs: Option<f64>,
    /// Bytes the copy moved, once it has moved any.
    pub bytes: Option<u64>,
    pub max_rate: Option<u64>,
    /// Why it failed or was rolled back (redacted as in the public view).
    pub error: Option<String>,
    /// The monitor page and the timeline on this instance.
    pub monitor_url: String,
    pub trace_url: String,
}

impl OpSummary {
    pub fn of(op: &Op) -> OpSummary {
        let steps = op.monitors.iter().flat_map(|m| &m.steps);
        // RFC 3339 in UTC with a fixed format sorts as text.
        let started_at = steps
            .clone()
            .filter_map(|s| s.started_at.clone())
            .chain(op.trace.first().map(|e| e.at.clone()))
            .min();
        let ended_at = op.state.is_final().then(|| {
            steps
                .clone()
                .filter_map(|s| s.ended_at.clone())
                .chain(op.trace.last().map(|e| e.at.clone()))
                .max()
        });
        let ended_at = ended_at.flatten();
        let at = |t: &Option<String>| t.as_deref().and_then(|t| humantime::parse_rfc3339(t).ok());
        let end = if op.state.is_final() {
            at(&ended_at)
        } else {
            Some(std::time::SystemTime::now())
        };
        let duration_secs = match (at(&started_at), end) {
            (Some(a), Some(b)) => b.duration_since(a).ok().map(|d| d.as_secs_f64()),
            _ => None,
        };
        let bytes = steps
            .clone()
            .find(|s| s.name == crate::op::MIGRATING)
            .and_then(|s| s.bytes_done);
        let r = Redactor::new(&op.plan);
        let p = &op.plan;
        OpSummary {
            id: op.id.clone(),
            kind: op.kind,
            state: op.state,
            source_grid: p.source_grid.clone(),
            source_app: p.source_app.clone(),
            target_grid: p.target_grid.clone(),
            target_app: p.target_app.clone(),
            started_at,
            ended_at,
            duration_secs,
            bytes,
            max_rate: p.max_rate,
            error: op.error.as_deref().map(|e| r.text(e)),
            monitor_url: super::MONITOR_PAGE.for_op(&op.id),
            trace_url: super::TRACE_PAGE.for_op(&op.id),
        }
    }

    /// The operations of `ops`, newest first, at most `limit` of them.
    pub fn history(ops: &[Op], limit: usize) -> Vec<OpSummary> {
        let mut all: Vec<OpSummary> = ops.iter().map(OpSummary::of).collect();
        all.sort_by(|a, b| b.started_at.cmp(&a.started_at).then(a.id.cmp(&b.id)));
        all.truncate(limit);
        all
    }
}

/// Takes what the public must not read out of a free text written for the full record.
pub struct Redactor {
    /// (what to find, what to put instead), longest first.
    needles: Vec<(String, String)>,
}

/// The forms a controller address takes in messages: as written in grid.info
/// (`user@host:port`), `user@host`, `host:port` and the bare host.
fn controller_forms(controller: &str) -> Vec<String> {
    let (user, host_port) = match controller.rsplit_once('@') {
        Some((u, hp)) => (Some(u), hp),
        None => (None, controller),
    };
    let host = if let Some(rest) = host_port.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else if host_port.matches(':').count() == 1 {
        host_port.split(':').next().unwrap_or(host_port)
    } else {
        host_port
    };
    let mut forms = vec![controller.to_string(), host_port.to_string()];
    if let Some(u) = user {
        forms.push(format!("{u}@{host}"));
    }
    // `manual_command` writes `root@host` when grid.info names no user.
    forms.push(format!("root@{host}"));
    // A bare name without a dot (`g1` in an ssh config) would blank out ordinary words.
    if host.contains(['.', ':']) {
        forms.push(host.to_string());
    }
    forms.retain(|f| !f.is_empty());
    forms
}

impl Redactor {
    pub fn new(plan: &Plan) -> Redactor {
        let mut needles = Vec::new();
        for (controller, grid) in [
            (&plan.source_controller, &plan.source_grid),
            (&plan.target_controller, &plan.target_grid),
        ] {
            for form in controller_forms(controller) {
                needles.push((form, format!("grid {grid}'s controller")));
            }
        }
        // Property values the grids' configuration holds. Short values (`on`, `1`) are no
        // secret and would blank out ordinary words; values the page shows anyway (MigHelper's
        // address is in its URL) stay.
        let public = [&plan.source_mig_url, &plan.helper_url, &plan.final_mig_url];
        for (_, value) in plan.target_app_config.iter().chain(&plan.helper_config) {
            if value.chars().count() >= 4 && !public.iter().any(|u| u.contains(value.as_str())) {
                needles.push((value.clone(), "…".into()));
            }
        }
        needles.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));
        needles.dedup_by(|a, b| a.0 == b.0);
        Redactor { needles }
    }

    /// `text` without controller addresses, configuration values or a controller's own output,
    /// and at most [`MAX_TEXT`] characters.
    pub fn text(&self, text: &str) -> String {
        bound(&replace_all(&without_output(text), &self.needles))
    }

    /// A leftover without the command that clears it: the leftovers read
    /// `what is left (why): ssh … app VERB NAME`.
    pub fn leftover(&self, leftover: &str) -> String {
        let what = match leftover.rfind(": ssh ") {
            Some(i) => &leftover[..i],
            None => leftover,
        };
        self.text(what)
    }
}

/// Whether the match of `len` bytes at `i` in `text` stands alone, not inside a longer name:
/// `127.0.1.1` in `127.0.1.10` or `x.127.0.1.1` does not. A `.` or `:` after it that ends a
/// sentence or a label is not part of a name.
fn stands_alone(text: &str, i: usize, len: usize) -> bool {
    let before = text[..i].chars().next_back();
    let mut after = text[i + len..].chars();
    let (next, then) = (after.next(), after.next());
    let continues = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '@');
    let before_ok = !before.is_some_and(|c| continues(c) || c == '.');
    let after_ok = match next {
        None => true,
        Some('.' | ':') => !then.is_some_and(|c| c.is_ascii_alphanumeric()),
        Some(c) => !continues(c),
    };
    before_ok && after_ok
}

/// `text` with every needle that stands alone replaced, in one pass (the longest needle wins at
/// each place, and a replacement is never searched again).
fn replace_all(text: &str, needles: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    'scan: while i < text.len() {
        for (needle, instead) in needles {
            if text[i..].starts_with(needle.as_str()) && stands_alone(text, i, needle.len()) {
                out.push_str(instead);
                i += needle.len();
                continue 'scan;
            }
        }
        let c = text[i..].chars().next().expect("i is on a char boundary");
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// Cuts a controller's own output (stderr after `exited with code N:`, or output it could not
/// parse) out of an error text; what MIG wrote around it stays.
fn without_output(text: &str) -> String {
    const MARKERS: [&str; 3] = [
        "` exited with code ",
        "` was killed by signal ",
        "cannot parse the output of `",
    ];
    let mut out = text.to_string();
    for m in MARKERS {
        let Some(i) = out.find(m) else { continue };
        let head = i + m.len();
        // The status (`1`, `KILL`) or the command, then `: output`.
        let tail = &out[head..];
        let stop = if m.starts_with("cannot parse") {
            tail.find("`: ").map(|j| j + 1)
        } else {
            let j = tail
                .find(|c: char| !c.is_ascii_alphanumeric())
                .unwrap_or(tail.len());
            tail[j..].starts_with(": ").then_some(j)
        };
        if let Some(j) = stop {
            out = format!("{} {OUTPUT_WITHHELD}", &out[..head + j]);
        }
    }
    out
}

fn bound(text: &str) -> String {
    if text.chars().count() <= MAX_TEXT {
        return text.to_string();
    }
    let mut s: String = text.chars().take(MAX_TEXT - 1).collect();
    s.push('…');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{new_id, Op, StepState};

    fn plan() -> Plan {
        let mut p = crate::test_support::sample_plan();
        p.source_controller = "admin@127.0.1.1:2222".into();
        p.helper_config.push(("gateway".into(), "10.77.0.1".into()));
        p.target_app_config = vec![("db_password".into(), "hunter2-xyz".into())];
        p
    }

    #[test]
    fn the_public_view_and_the_history_carry_the_limit_and_redact_the_error() {
        let mut p = plan();
        p.max_rate = Some(8 << 20);
        let mut op = Op::new(new_id(), Kind::Migrate, p);
        assert_eq!(OpView::of(&op).plan.max_rate, Some(8 << 20));
        op.start_step(crate::op::PROVISIONING_HELPER);
        op.end(
            OpState::Failed,
            Some("db_password=hunter2-xyz refused".into()),
        );
        let s = OpSummary::of(&op);
        assert_eq!(s.max_rate, Some(8 << 20));
        assert_eq!(s.target_app, "shop2");
        assert!(!s.error.unwrap().contains("hunter2-xyz"));
        assert!(s.ended_at.is_some() && s.duration_secs.is_some());
        assert_eq!(s.trace_url, format!("/ops/{}/trace", op.id));
        // Records written before the limit existed read as no limit.
        let mut v = serde_json::to_value(&op).unwrap();
        v["plan"].as_object_mut().unwrap().remove("max_rate");
        let old: Op = serde_json::from_value(v).unwrap();
        assert_eq!(old.plan.max_rate, None);
    }

    #[test]
    fn controllers_config_values_and_controller_output_are_taken_out() {
        let r = Redactor::new(&plan());
        assert_eq!(
            r.text(
                "grid controller admin@127.0.1.1:2222: `app stop shop` exited with code 1: \
                    component web: db_password=hunter2-xyz refused"
            ),
            format!(
                "grid controller grid g1's controller: `app stop shop` exited with code 1 \
                     {OUTPUT_WITHHELD}"
            )
        );
        assert_eq!(
            r.text("app migrate admin@127.0.1.1:2222 shop .name=shop2 --import on 127.0.2.1:2222"),
            "app migrate grid g1's controller shop .name=shop2 --import on grid g2's controller"
        );
        // Other forms of the same address, and a longer address left alone.
        assert_eq!(
            r.text("ssh admin@127.0.1.1 or root@127.0.2.1; host 127.0.1.1. MIG at 127.0.1.10"),
            "ssh grid g1's controller or grid g2's controller; host grid g1's controller. MIG at 127.0.1.10"
        );
        assert_eq!(
            r.text("gateway 10.77.0.1 said hunter2-xyz; MigHelper at http://127.0.2.20:8080"),
            "gateway … said …; MigHelper at http://127.0.2.20:8080"
        );
        assert_eq!(
            r.text("grid controller 127.0.2.1:2222: cannot parse the output of `app info shop2`: line 3: hunter2"),
            format!("grid controller grid g2's controller: cannot parse the output of `app info shop2` {OUTPUT_WITHHELD}")
        );
        assert_eq!(
            r.text("`app start x` exited with code 1 (no stderr)"),
            "`app start x` exited with code 1 (no stderr)"
        );
        let long = "x".repeat(5000);
        assert_eq!(r.text(&long).chars().count(), MAX_TEXT);
    }

    #[test]
    fn the_view_has_what_the_page_follows_and_nothing_of_the_plan_else() {
        let mut op = Op::new(new_id(), crate::op::Kind::Migrate, plan());
        op.start_step(crate::op::MIGRATING);
        op.fail_step(
            crate::op::MIGRATING,
            "grid controller 127.0.2.1:2222: `app migrate` exited with code 3: secret stderr",
        );
        op.leftovers.push(
            "MigHelper mighelper-01234567 on grid g2: ssh -p 2222 root@127.0.2.1 app destroy mighelper-01234567".into(),
        );
        op.trace(
            "command",
            "app list on admin@127.0.1.1:2222".into(),
            Some(3),
            Some(
                "grid controller admin@127.0.1.1:2222: `app list` exited with code 1: boom".into(),
            ),
        );
        let view = OpView::of(&op);
        let json = serde_json::to_string(&view).unwrap();
        let trace = serde_json::to_string(&TraceView::of(&op)).unwrap();
        // (`127.0.1.10` is the source MIG's URL, which the page follows.)
        for leak in [
            "127.0.1.1:",
            "127.0.2.1:",
            "@127",
            "admin@",
            "hunter2",
            "10.77",
            "secret stderr",
            "boom",
            "ssh -p",
        ] {
            assert!(!json.contains(leak), "{leak} in {json}");
            assert!(!trace.contains(leak), "{leak} in {trace}");
        }
        assert_eq!(view.leftovers, ["MigHelper mighelper-01234567 on grid g2"]);
        assert_eq!(view.monitors[1].steps[1].state, StepState::Failed);
        assert_eq!(view.plan.helper_url, "http://127.0.2.20:8080");
        assert!(
            trace.contains("app list on grid g1's controller"),
            "{trace}"
        );
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        for key in [
            "id",
            "kind",
            "state",
            "error",
            "monitors",
            "plan",
            "owner",
            "rolling_back",
            "leftovers",
            "version",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
        assert!(v["plan"].get("source_controller").is_none() && v.get("seq").is_none());
        assert!(v.get("trace").is_none());
    }

    #[test]
    fn the_owner_during_a_roll_back_after_the_handoff_is_the_source() {
        let mut op = Op::new(new_id(), crate::op::Kind::Migrate, plan());
        op.owner = Role::Target;
        assert_eq!(OpView::of(&op).owner_url(), "http://127.0.2.10:8080");
        op.rolling_back = true;
        assert_eq!(OpView::of(&op).owner_url(), "http://127.0.1.10:8080");
    }
}
