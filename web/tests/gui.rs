//! The GUI in a real headless Chromium: the form, and the monitor page following an operation
//! across three instances on 127.0.60.1/2/3 while the page's own server goes away.

mod common;

use std::time::{Duration, Instant};

use actors::op::{self, Kind, Op, OpState, Role, StepState};
use actors::properties::Mode;
use common::fake_mig::{Instance, Trio, CSRF, PASSWORD, USER};
use common::Browser;
use fantoccini::Locator;
use mig_web::PageContext;
use serde_json::{json, Value};

/// One browser at a time: the machine has two cores, and the timings below are about the page,
/// not about how busy the scheduler is.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const OP_ID: &str = "5f0c1e9a8b7d6c5e4f3a2b1c0d9e8f7a";
const GIB: u64 = 1 << 30;
/// The goal: a step change reaches the page within 250 ms (issue 6); the test's own reading of
/// the page every ~30 ms over WebDriver adds to what it measures. Reported, not asserted.
const SHOWN_WITHIN: Duration = Duration::from_millis(250 + 100);

fn page(mode: Mode) -> PageContext {
    PageContext {
        app_name: Some("shop".into()),
        own_grid: Some(("g1".into(), Some("Los Angeles".into()))),
        unavailable: None,
        mode,
        targets: vec![
            ("g2".into(), Some("Frankfurt".into())),
            ("g3".into(), Some("Singapore".into())),
        ],
        csrf_token: CSRF.into(),
        open: false,
        history: Vec::new(),
    }
}

async fn pause(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

fn all_steps(op: &Op) -> Vec<op::StepId> {
    op.monitors
        .iter()
        .flat_map(|m| m.steps.iter().map(|s| s.name))
        .collect()
}

/// When the script changed what: (time, step, new state), plus ("kill", instance) marks.
type Marks = Vec<(Instant, String, String)>;

/// Publishes copies of the operation to the instances and notes when each step changed state.
struct Player {
    op: Op,
    last: Vec<(String, String)>,
    marks: Marks,
}

impl Player {
    fn new(op: Op) -> Self {
        Player {
            op,
            last: Vec::new(),
            marks: Vec::new(),
        }
    }

    fn publish(&mut self, to: &[&Instance]) {
        for i in to {
            i.set(&self.op);
        }
        let now = Instant::now();
        let states: Vec<(String, String)> = self
            .op
            .monitors
            .iter()
            .flat_map(|m| &m.steps)
            .map(|s| (s.name.to_string(), state_name(s.state).to_string()))
            .collect();
        for (i, s) in states.iter().enumerate() {
            if self.last.get(i) != Some(s) {
                self.marks.push((now, s.0.clone(), s.1.clone()));
            }
        }
        self.last = states;
    }

    async fn kill(&mut self, who: &Instance, name: &str) {
        who.kill().await;
        self.marks
            .push((Instant::now(), "kill".into(), name.to_string()));
    }
}

fn state_name(s: StepState) -> &'static str {
    match s {
        StepState::Pending => "pending",
        StepState::Running => "running",
        StepState::Done => "done",
        StepState::Failed => "failed",
        StepState::RolledBack => "rolled_back",
    }
}

/// Plays an operation into the three instances as the real actors would, with two twists that a
/// page must survive. The source provisions MigHelper and hands over *without* telling the page:
/// it stays up, silent and stale (an older copy that still names itself the owner) while MigHelper
/// stops it, then dies. MigHelper moves the bytes and hands over to the final MIG with a last event
/// saying so; the final MIG cleans up and MigHelper dies. With `fail`, the copy fails at 40 % and
/// MigHelper rolls back.
async fn play(trio: &Trio, op: Op, fail: bool) -> Marks {
    let total = 2 * GIB;
    let (src, hlp, tgt) = (&trio.source, &trio.helper, &trio.target);
    let mut p = Player::new(op);
    p.publish(&[src]);
    p.op.start_step(op::PROVISIONING_HELPER);
    p.publish(&[src]);
    pause(400).await;
    p.op.finish_step(op::PROVISIONING_HELPER, None);
    p.publish(&[src]);
    pause(150).await;

    p.op.owner = Role::Helper;
    p.op.version += 1;
    p.publish(&[hlp]);
    p.op.start_step(op::STOPPING_SOURCE);
    p.publish(&[hlp]);
    pause(1500).await;
    p.kill(src, "source").await; // the source application stopped, and its MIG with it
    p.op.finish_step(op::STOPPING_SOURCE, None);
    p.op.start_step(op::MIGRATING);
    p.publish(&[hlp]);
    for i in 0..=10u64 {
        p.op.set_progress(op::MIGRATING, total * i / 10, total);
        p.publish(&[hlp]);
        if fail && i == 4 {
            p.op.fail_step(
                op::MIGRATING,
                "grid g2's controller (127.0.2.1:2222) closed the SSH connection after 819 MiB; \
                 check that g2 is reachable from g1, then start the migration again",
            );
            p.op.rolling_back = true;
            p.publish(&[hlp]);
            pause(300).await;
            p.op.roll_back_rest(&[op::STOPPING_SOURCE, op::PROVISIONING_HELPER]);
            p.op.leftovers =
                vec!["the partial copy shop-eu on grid g2: ssh g2 app destroy shop-eu".into()];
            p.op.end(
                OpState::RolledBack,
                Some("the copy to grid g2 failed; shop was started again on g1".into()),
            );
            p.publish(&[hlp]);
            return p.marks;
        }
        pause(150).await;
    }
    p.op.finish_step(op::MIGRATING, Some("2.00 GiB moved and verified".into()));
    let third = p.op.monitors[1].steps[2].name;
    p.op.start_step(third);
    p.publish(&[hlp]);
    pause(300).await;
    p.op.finish_step(third, None);
    p.publish(&[hlp]);

    p.op.owner = Role::Target;
    p.op.version += 1;
    // The final MIG journals the handoff; MigHelper's last event names the new owner.
    p.publish(&[tgt, hlp]);
    let cleanup: Vec<op::StepId> = p.op.monitors[2].steps.iter().map(|s| s.name).collect();
    for name in cleanup {
        if name == op::DESTROYING_HELPER {
            p.kill(hlp, "helper").await;
        }
        p.op.start_step(name);
        p.publish(&[tgt]);
        pause(250).await;
        p.op.finish_step(name, None);
        p.publish(&[tgt]);
    }
    p.op.end(OpState::Succeeded, None);
    p.publish(&[tgt]);
    p.marks
}

/// What the test reads from the monitor page at one moment.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    state: String,
    version: i64,
    steps: Vec<(String, String)>,
    progress: String,
    /// The drawn width of the progress bar, e.g. "156px".
    fill: String,
}

const READ_MONITOR: &str = r#"
    const m = document.getElementById('monitor');
    const fig = document.querySelector('[data-step^="migrating"] .figures');
    return {
      state: m.dataset.state || '',
      version: Number(m.dataset.version || -1),
      steps: Array.from(document.querySelectorAll('[data-step]')).map(e => [e.dataset.step, e.dataset.state]),
      progress: fig ? fig.textContent : '',
      fill: fig ? getComputedStyle(fig.previousElementSibling.firstElementChild).width : '',
    };
"#;

fn seen(v: Value) -> Seen {
    Seen {
        state: v["state"].as_str().unwrap().into(),
        version: v["version"].as_i64().unwrap(),
        steps: v["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p[0].as_str().unwrap().to_string(),
                    p[1].as_str().unwrap().to_string(),
                )
            })
            .collect(),
        progress: v["progress"].as_str().unwrap().into(),
        fill: v["fill"].as_str().unwrap().into(),
    }
}

/// Reads the monitor page every few tens of milliseconds until the operation is final, saving a
/// screenshot of the running monitor once the copy is under way.
async fn watch(browser: &Browser, shot: Option<&str>) -> Vec<(Instant, Seen)> {
    let deadline = Instant::now() + Duration::from_secs(25);
    let mut log: Vec<(Instant, Seen)> = Vec::new();
    let mut shot = shot;
    loop {
        let s = seen(browser.js(READ_MONITOR).await);
        let at = Instant::now();
        if let Some(name) = shot {
            if s.progress.contains("(50%)") || s.progress.contains("(60%)") {
                browser.screenshot(name).await;
                shot = None;
            }
        }
        let done = !s.state.is_empty() && s.state != "running";
        if log.last().map(|l| &l.1) != Some(&s) {
            log.push((at, s));
        }
        if done {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "the operation did not end on the page; last seen: {:?}",
            log.last().map(|l| &l.1)
        );
        pause(30).await;
    }
}

fn rank(state: &str) -> u8 {
    match state {
        "pending" => 0,
        "running" => 1,
        _ => 2,
    }
}

/// How long after the script changed a step the page showed it (or a later state of it).
fn latencies(timed: &[(Instant, Seen)], marks: &Marks) -> Vec<(String, String, Duration)> {
    marks
        .iter()
        .filter(|(_, step, state)| step != "kill" && state != "pending")
        .map(|(t, step, state)| {
            let shown = timed
                .iter()
                .find(|(at, s)| {
                    at >= t
                        && s.steps
                            .iter()
                            .any(|x| &x.0 == step && rank(&x.1) >= rank(state))
                })
                .map(|(at, _)| *at - *t)
                .unwrap_or(Duration::MAX);
            (step.clone(), state.clone(), shown)
        })
        .collect()
}

fn mark(marks: &Marks, step: &str, state: &str) -> Instant {
    marks
        .iter()
        .find(|m| m.1 == step && m.2 == state)
        .unwrap_or_else(|| panic!("no mark {step} {state}"))
        .0
}

/// The page never went back: versions only grow and no step returns to an earlier state.
fn assert_never_backwards(log: &[Seen]) {
    for pair in log.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(b.version >= a.version, "version went back: {a:?} -> {b:?}");
        if a.steps.len() == b.steps.len() {
            for (x, y) in a.steps.iter().zip(&b.steps) {
                assert!(
                    rank(&y.1) >= rank(&x.1),
                    "{} went back: {} -> {}",
                    x.0,
                    x.1,
                    y.1
                );
            }
        }
    }
}

/// How the test starts the operation from the form.
#[derive(PartialEq)]
enum Start {
    /// With the mouse, no authentication.
    Mouse,
    /// With the keyboard alone, behind HTTP basic auth.
    KeyboardBehindAuth,
}

const TAB: &str = "\u{e004}";
const ENTER: &str = "\u{e007}";
const DOWN: &str = "\u{e015}";

async fn run_operation(kind: Kind, start: Start, screenshots: bool) {
    let _one = ONE_BROWSER.lock().await;
    let trio = Trio::start().await;
    trio.source.set_page(page(Mode::Both));
    trio.source.set_next_id(OP_ID);
    let browser = Browser::start().await;
    let c = &browser.client;

    if start == Start::KeyboardBehindAuth {
        trio.source.require_auth();
        // The browser answers the server's challenge itself; here the credentials come with
        // the URL, and the page's own request to start the operation must carry them too.
        let authed = trio
            .source
            .url
            .replace("http://", &format!("http://{USER}:{PASSWORD}@"));
        c.goto(&format!("{authed}/")).await.unwrap();
        let mut path = Vec::new();
        browser.keys(TAB).await;
        path.push(browser.focused().await);
        if kind == Kind::Snapshot {
            browser.keys(DOWN).await; // arrows move within the radio group
            path.push(browser.focused().await);
        }
        browser.keys(TAB).await;
        path.push(browser.focused().await);
        browser.keys("shop-eu").await;
        browser.keys(TAB).await;
        path.push(browser.focused().await);
        browser.keys(TAB).await;
        path.push(browser.focused().await);
        // The bandwidth limit is optional: left empty, the MIG's own `max_rate` applies.
        browser.keys(TAB).await;
        path.push(browser.focused().await);
        let mut expected = vec![
            "kind-migrate",
            "target-app",
            "target-grid",
            "max-rate",
            "submit",
        ];
        if kind == Kind::Snapshot {
            expected.insert(1, "kind-snapshot");
        }
        assert_eq!(path, expected, "the form in keyboard order");
    } else {
        c.goto(&format!("{}/", trio.source.url)).await.unwrap();
        let name = c.find(Locator::Id("target-app")).await.unwrap();
        name.send_keys("shop-eu").await.unwrap();
        if kind == Kind::Snapshot {
            browser.click("kind-snapshot").await;
        }
    }
    let label = browser
        .js("return document.getElementById('submit').textContent")
        .await;
    let verb = if kind == Kind::Migrate {
        "Migrate"
    } else {
        "Snapshot"
    };
    assert_eq!(label, json!(format!("{verb} as shop-eu to g2")));
    if screenshots {
        browser.screenshot("form").await;
    }

    if start == Start::KeyboardBehindAuth {
        browser.keys(ENTER).await; // on the focused Start button
    } else {
        browser.click("submit").await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while trio.source.started().is_empty() {
        if Instant::now() > deadline {
            let text = browser.js("return document.body.innerText").await;
            panic!(
                "the form did not start the operation: {} posts, {} refused for want of \
                 credentials; the page says:\n{text}",
                trio.source.posts(),
                trio.source.unauthorized()
            );
        }
        pause(20).await;
    }
    assert_eq!(
        trio.source.started(),
        [json!({"kind": kind.as_str(), "target_app": "shop-eu", "target_grid": "g2"})]
    );

    // The form goes to the monitor page once the server answered.
    browser
        .wait_for(
            "the monitor page",
            Duration::from_secs(5),
            "return document.getElementById('monitor') !== null",
        )
        .await;
    let op = Op::new(OP_ID.into(), kind, trio.plan());
    let names = all_steps(&op);
    let (timed, marks) = tokio::join!(
        watch(&browser, screenshots.then_some("monitor-running")),
        play(&trio, op, false)
    );
    let log: Vec<Seen> = timed.iter().map(|(_, s)| s.clone()).collect();

    // While the stale source still stood, silent and claiming the operation, the page had
    // already moved on to MigHelper's newer copy.
    let killed = mark(&marks, "kill", "source");
    let helper_news = timed
        .iter()
        .find(|(_, s)| {
            s.steps
                .iter()
                .any(|x| x.0 == op::STOPPING_SOURCE && x.1 == "running")
        })
        .map(|(at, _)| *at)
        .expect("the page showed the source being stopped");
    assert!(
        helper_news < killed,
        "the page waited for the stale source to die"
    );

    // Every step change reached the page. How fast is printed, not asserted: on a shared machine
    // a timing bound is a flaky test, and the 250 ms goal (issue 6) is a figure to watch, not a
    // pass/fail line.
    let lat = latencies(&timed, &marks);
    let never: Vec<_> = lat.iter().filter(|(_, _, d)| *d == Duration::MAX).collect();
    assert!(
        never.is_empty(),
        "step changes the page never showed: {never:?}"
    );
    for (step, state, d) in &lat {
        let goal = if *step == op::STOPPING_SOURCE && state == "running" {
            "watchdog"
        } else if *d <= SHOWN_WITHIN {
            "within goal"
        } else {
            "OVER the 250 ms goal"
        };
        eprintln!(
            "page latency {:>6.0} ms  {state:<8} {step}  ({goal})",
            d.as_secs_f64() * 1000.0
        );
    }

    // The page went to the monitor URL the API returned, on the source it was served from.
    let url = c.current_url().await.unwrap();
    assert_eq!(url.path(), format!("/ops/{OP_ID}"));

    let last = log.last().unwrap();
    assert_eq!(last.state, "succeeded", "{log:#?}");
    assert_eq!(
        last.steps.iter().map(|s| s.0.clone()).collect::<Vec<_>>(),
        names,
        "the page shows the kind's monitors and steps in order"
    );
    assert!(last.steps.iter().all(|s| s.1 == "done"), "{last:?}");
    assert_never_backwards(&log);

    // Steps finished in order: whenever a step shows done, every step before it does too.
    for s in &log {
        let first_not_done = s.steps.iter().position(|x| x.1 != "done");
        if let Some(i) = first_not_done {
            assert!(
                s.steps[i..].iter().all(|x| x.1 != "done"),
                "a step finished before an earlier one: {s:?}"
            );
        }
    }
    // Steps started one after another too: the page saw most steps running on their own (a
    // fast step may be missed between two reads, but not most of them).
    let seen_running: std::collections::HashSet<&str> = log
        .iter()
        .flat_map(|s| {
            s.steps
                .iter()
                .filter(|x| x.1 == "running")
                .map(|x| x.0.as_str())
        })
        .collect();
    assert!(
        seen_running.len() * 2 > names.len(),
        "only {seen_running:?} seen running"
    );

    // The copy showed live progress: several byte counts, with a rate and an ETA.
    let figures: Vec<&str> = log
        .iter()
        .map(|s| s.progress.as_str())
        .filter(|p| p.contains("ETA"))
        .collect();
    let distinct: std::collections::BTreeSet<_> = figures.iter().collect();
    assert!(distinct.len() >= 3, "progress seen: {figures:?}");
    assert!(figures
        .iter()
        .all(|f| f.contains(" of 2.00 GiB") && f.contains("/s")));
    assert!(
        last.progress.starts_with("2.00 GiB of 2.00 GiB (100%)"),
        "{}",
        last.progress
    );
    // The bar is drawn, not only the figures (a CSP that blocks inline styles would hide it).
    let widths: std::collections::BTreeSet<&str> = log
        .iter()
        .filter(|s| s.progress.contains("ETA"))
        .map(|s| s.fill.as_str())
        .collect();
    assert!(
        widths.len() >= 3 && !widths.contains("0px"),
        "bar widths: {widths:?}"
    );

    // The page ends on the link to the application's GUI at the final MIG.
    let href = browser
        .wait_for(
            "the target link",
            Duration::from_secs(2),
            "const a = document.getElementById('target-link'); return a && a.getAttribute('href')",
        )
        .await;
    assert_eq!(href, json!(trio.target.url));
    if screenshots {
        browser.screenshot("monitor-finished").await;
    }

    // Reloading the monitor on the final MIG, with source and MigHelper gone, shows it all.
    c.goto(&format!("{}/ops/{OP_ID}", trio.target.url))
        .await
        .unwrap();
    browser
        .wait_for(
            "the reloaded monitor",
            Duration::from_secs(5),
            "return document.getElementById('target-link') !== null",
        )
        .await;
    let reloaded = seen(browser.js(READ_MONITOR).await);
    assert_eq!(reloaded.steps, last.steps);
    if screenshots {
        browser.set_viewport(390, 844).await;
        pause(200).await;
        browser.screenshot("monitor-phone").await;
    }
    browser.close().await;
}

#[actix_web::test]
async fn a_migration_is_followed_from_source_to_mighelper_to_target() {
    run_operation(Kind::Migrate, Start::Mouse, true).await;
}

#[actix_web::test]
async fn a_snapshot_started_by_keyboard_behind_basic_auth_is_followed() {
    run_operation(Kind::Snapshot, Start::KeyboardBehindAuth, false).await;
}

#[actix_web::test]
async fn a_rolled_back_operation_shows_what_failed_and_what_was_undone() {
    let _one = ONE_BROWSER.lock().await;
    let trio = Trio::start().await;
    let op = Op::new(OP_ID.into(), Kind::Migrate, trio.plan());
    trio.source.set(&op);
    let browser = Browser::start().await;
    browser
        .client
        .goto(&format!("{}/ops/{OP_ID}", trio.source.url))
        .await
        .unwrap();
    browser
        .wait_for(
            "the monitor page",
            Duration::from_secs(5),
            "return document.getElementById('monitor') !== null",
        )
        .await;
    let (timed, _) = tokio::join!(watch(&browser, None), play(&trio, op, true));
    let log: Vec<Seen> = timed.into_iter().map(|(_, s)| s).collect();
    assert_never_backwards(&log);
    let last = log.last().unwrap();
    assert_eq!(last.state, "rolled_back");
    let state = |name: op::StepId| {
        last.steps
            .iter()
            .find(|s| s.0 == name)
            .map(|s| s.1.clone())
            .unwrap()
    };
    assert_eq!(state(op::MIGRATING), "failed");
    assert_eq!(state(op::STOPPING_SOURCE), "rolled_back");
    assert_eq!(state(op::DESTROYING_HELPER), "rolled_back");
    // The migrating step got as far as 40 % (819.2 MiB) before it failed, and the page showed it.
    assert!(
        log.iter()
            .any(|s| s.progress.starts_with("819 MiB of 2.00 GiB (39%)")),
        "{log:#?}"
    );

    let failure = browser
        .js(r#"
            const f = document.getElementById('outcome-failure');
            return {
              role: f.getAttribute('role'),
              title: f.querySelector('h2').textContent,
              reason: document.getElementById('failure-reason').textContent,
              error: (document.getElementById('failure-error') || {}).textContent || '',
              undone: Array.from(document.querySelectorAll('#rolled-back li')).map(l => l.textContent),
              leftovers: Array.from(document.querySelectorAll('#leftovers li')).map(l => l.textContent),
              commands: (document.getElementById('leftover-commands') || {}).textContent || '',
              end: document.getElementById('end-state').textContent,
              failedDetail: document.querySelector('.step[data-state="failed"] .detail').textContent,
              link: document.getElementById('target-link'),
              summary: document.getElementById('summary').textContent,
            };
        "#)
        .await;
    assert_eq!(failure["role"], "alert");
    assert_eq!(
        failure["title"],
        format!("Failed at “{}” — rolled back", op::MIGRATING)
    );
    let reason = failure["reason"].as_str().unwrap();
    assert!(
        reason.contains("closed the SSH connection after 819 MiB"),
        "{reason}"
    );
    assert_eq!(failure["failedDetail"].as_str().unwrap(), reason);
    assert!(failure["error"]
        .as_str()
        .unwrap()
        .contains("shop was started again on g1"));
    let undone: Vec<&str> = failure["undone"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(undone.contains(&"provisioning MigHelper on the target grid: undone by the roll-back"));
    assert!(undone.contains(&"stopping the source application: undone by the roll-back"));
    assert!(undone.contains(&"destroying MigHelper: not run: the operation was rolled back"));
    // The public view names what is left over, not the command (it names a controller); the
    // page says where the commands are.
    assert_eq!(
        failure["leftovers"],
        json!(["the partial copy shop-eu on grid g2"])
    );
    assert!(
        failure["commands"].as_str().unwrap().contains(&format!(
            "mig status --url {} --user USER {OP_ID}",
            trio.helper.url
        )),
        "{failure}"
    );
    let text = browser.js("return document.body.innerText").await;
    let text = text.as_str().unwrap();
    assert!(
        !text.contains("ssh g2") && !text.contains("127.0.2.1"),
        "the page shows a controller: {text}"
    );
    assert!(
        reason.contains("grid g2's controller closed the SSH connection")
            || reason.contains("(grid g2's controller)"),
        "{reason}"
    );
    assert_eq!(
        failure["end"],
        "shop runs on grid g1 as before; nothing of it was lost. \
         Part of the attempt is left over: see below."
    );
    assert_eq!(failure["link"], Value::Null, "no success link on a failure");
    assert_eq!(failure["summary"], "Migrate failed and was rolled back.");
    browser.screenshot("monitor-failed").await;
    browser.close().await;
}

/// The form's Check button shows the dry run's list before anything starts; the monitor offers
/// Cancel while a cancel can win, sends it with the page's CSRF token, says who cancelled, and
/// offers no button once the operation is past the cut-over.
#[actix_web::test]
async fn check_lists_the_dry_run_and_cancel_is_offered_only_before_the_cut_over() {
    let _one = ONE_BROWSER.lock().await;
    let trio = Trio::start().await;
    let src = &trio.source;
    src.set_page(page(Mode::Both));
    let browser = Browser::start().await;
    let c = &browser.client;
    c.goto(&format!("{}/", src.url)).await.unwrap();
    c.find(Locator::Id("target-app"))
        .await
        .unwrap()
        .send_keys("shop2")
        .await
        .unwrap();
    browser.click("check").await;
    let list = browser
        .wait_for(
            "the checks",
            Duration::from_secs(5),
            "const b = document.getElementById('checks'); return !b.hidden && \
             Array.from(document.querySelectorAll('#check-list li')).map(l => [l.className, l.dataset.check, l.textContent])",
        )
        .await;
    assert_eq!(
        list[0],
        json!(["ok", "target name", "target name: shop2 is free on grid g2"])
    );
    assert_eq!(list[1][0], "failed");
    assert!(
        list[1][2].as_str().unwrap().contains("free space on it"),
        "{list}"
    );
    assert_eq!(
        (src.dry_runs(), src.started().len()),
        (1, 0),
        "checked, not started"
    );

    let mut op = Op::new(OP_ID.into(), Kind::Migrate, trio.plan());
    op.start_step(op::PROVISIONING_HELPER);
    src.set(&op);
    c.goto(&format!("{}/ops/{OP_ID}", src.url)).await.unwrap();
    browser
        .wait_for(
            "the Cancel button",
            Duration::from_secs(5),
            "return !document.getElementById('cancel-box').hidden",
        )
        .await;
    browser.js("window.confirm = () => true; return true").await;
    browser.click("cancel").await;
    let hint = browser
        .wait_for(
            "the cancel's answer",
            Duration::from_secs(5),
            "const t = document.getElementById('cancel-hint').textContent; return t.startsWith('Cancelled') && t",
        )
        .await;
    assert_eq!(hint, "Cancelled by anonymous; rolling back…");
    assert_eq!(src.cancels(), 1);

    // Another operation past the cut-over: no Cancel button.
    let mut later = Op::new(OP_ID.into(), Kind::Migrate, trio.plan());
    later.owner = Role::Helper;
    later.start_step(op::STARTING_TARGET);
    later.version = 1000;
    src.set(&later);
    c.goto(&format!("{}/ops/{OP_ID}", src.url)).await.unwrap();
    browser
        .wait_for(
            "the page to show the cut-over",
            Duration::from_secs(5),
            "return document.getElementById('monitor').dataset.version === '1000'",
        )
        .await;
    assert_eq!(
        browser
            .js("return document.getElementById('cancel-box').hidden")
            .await,
        true
    );
    browser.close().await;
}

#[actix_web::test]
async fn the_form_refuses_bad_names_and_offers_what_mode_allows() {
    let _one = ONE_BROWSER.lock().await;
    let trio = Trio::start().await;
    let src = &trio.source;
    src.set_page(page(Mode::Both));
    let browser = Browser::start().await;
    let c = &browser.client;
    let home = format!("{}/", src.url);
    c.goto(&home).await.unwrap();

    // Both kinds, migrate first and chosen.
    let kinds = browser
        .js("return Array.from(document.querySelectorAll('input[name=kind]')).map(r => [r.value, r.checked, r.disabled])")
        .await;
    assert_eq!(
        kinds,
        json!([["migrate", true, false], ["snapshot", false, false]])
    );
    let grids = browser
        .js("return Array.from(document.querySelectorAll('#target-grid option')).map(o => [o.value, o.textContent])")
        .await;
    assert_eq!(
        grids,
        json!([["g2", "g2 (Frankfurt)"], ["g3", "g3 (Singapore)"]])
    );
    assert_eq!(
        browser
            .js("return document.getElementById('own-grid').textContent")
            .await,
        "g1 (Los Angeles)"
    );

    // A bad name is refused as it is typed and on submit, and no request leaves the browser.
    let name = c.find(Locator::Id("target-app")).await.unwrap();
    name.send_keys("9lives").await.unwrap();
    let error = browser
        .js("return [document.getElementById('target-app-error').textContent, document.getElementById('target-app').getAttribute('aria-invalid')]")
        .await;
    assert_eq!(error, json!(["The name must start with a letter.", "true"]));
    browser.click("submit").await;
    name.send_keys("\u{E007}").await.unwrap(); // Enter submits the form too
    name.clear().await.unwrap();
    browser.click("submit").await;
    let empty = browser
        .js("return [document.getElementById('target-app-error').textContent, document.activeElement.id]")
        .await;
    assert_eq!(
        empty,
        json!([
            "Enter the name the application will have on the target grid.",
            "target-app"
        ])
    );
    name.send_keys("shop eu").await.unwrap();
    browser.click("submit").await;
    pause(300).await;
    assert_eq!(src.posts(), 0, "a bad name must not reach the server");

    // The page's rule is the dialect's, name by name.
    for candidate in [
        "a",
        "shop-eu_2",
        "Z9",
        "9lives",
        "-shop",
        "_shop",
        "shop eu",
        "shop.eu",
        "shop;rm",
        "shöp",
        "$(reboot)",
        &"a".repeat(64),
        &"a".repeat(65),
    ] {
        let verdict = browser
            .client
            .execute(
                "const i = document.getElementById('target-app'); i.value = arguments[0]; \
                 i.dispatchEvent(new Event('input')); return i.getAttribute('aria-invalid')",
                vec![json!(candidate)],
            )
            .await
            .unwrap();
        let ok = dialect::AppName::new(candidate).is_ok();
        assert_eq!(
            verdict,
            json!(if ok { "false" } else { "true" }),
            "{candidate:?}"
        );
    }
    assert_eq!(src.posts(), 0);

    // The token goes with the request: a page holding a wrong one gets the server's refusal,
    // shown as words.
    let mut wrong = page(Mode::Both);
    wrong.csrf_token = "forged".into();
    src.set_page(wrong);
    c.goto(&home).await.unwrap();
    c.find(Locator::Id("target-app"))
        .await
        .unwrap()
        .send_keys("shop2")
        .await
        .unwrap();
    browser.click("submit").await;
    let shown = browser
        .wait_for(
            "the refusal",
            Duration::from_secs(5),
            "const e = document.getElementById('form-error'); return !e.hidden && e.textContent",
        )
        .await;
    assert_eq!(shown, "Not allowed: missing or wrong CSRF token");
    assert_eq!(src.posts(), 1);
    assert!(src.started().is_empty());

    // One kind only: shown, checked and fixed.
    for (mode, kind) in [(Mode::Migrate, "migrate"), (Mode::Snapshot, "snapshot")] {
        src.set_page(page(mode));
        c.goto(&home).await.unwrap();
        let kinds = browser
            .js("return Array.from(document.querySelectorAll('input[name=kind]')).map(r => [r.value, r.checked, r.disabled])")
            .await;
        assert_eq!(kinds, json!([[kind, true, true]]));
        let fixed = browser
            .js("return document.getElementById('mode-fixed').textContent")
            .await;
        assert!(fixed.as_str().unwrap().contains(&format!("mode = {kind}")));
    }

    // Hostile names from grid.info or the properties are shown as text, never as markup.
    let evil = "<img src=x onerror=\"document.title='pwned'\">";
    let mut hostile = page(Mode::Both);
    hostile.app_name = Some(evil.into());
    hostile.targets = vec![("g2".into(), Some(evil.into()))];
    src.set_page(hostile);
    c.goto(&home).await.unwrap();
    let shown = browser
        .js("return [document.getElementById('app-name').textContent, document.querySelectorAll('img').length, document.title, document.querySelector('#target-grid option').textContent]")
        .await;
    assert_eq!(
        shown,
        json!([evil, 0, format!("MIG · {evil}"), format!("g2 ({evil})")])
    );

    // MIG cannot tell its grid: the page says why and offers nothing.
    let mut lost = page(Mode::Both);
    lost.own_grid = None;
    lost.unavailable =
        Some("no MIG_ip in /config/grid.info matches this MIG's address 10.0.0.9:8080".into());
    src.set_page(lost);
    c.goto(&home).await.unwrap();
    let shown = browser
        .js("return [document.getElementById('unavailable').textContent, document.querySelectorAll('form, input, select, button').length]")
        .await;
    assert!(shown[0]
        .as_str()
        .unwrap()
        .contains("no MIG_ip in /config/grid.info matches this MIG's address 10.0.0.9:8080"));
    assert_eq!(shown[1], 0);
    browser.screenshot("unavailable").await;
    browser.close().await;
}

#[actix_web::test]
async fn what_comes_over_the_network_is_shown_as_text_and_never_linked_as_script() {
    let _one = ONE_BROWSER.lock().await;
    let trio = Trio::start().await;
    let evil = "<img src=x onerror=\"document.title='pwned'\">";
    let mut plan = trio.plan();
    plan.final_mig_url = "javascript:document.title='pwned'".into();
    plan.target_app = evil.into();
    let mut op = Op::new(OP_ID.into(), Kind::Migrate, plan);
    op.owner = Role::Target;
    for name in all_steps(&op) {
        op.start_step(name);
        op.finish_step(name, Some(evil.into()));
    }
    op.leftovers = vec![evil.into()];
    op.end(OpState::Succeeded, None);
    trio.target.set(&op);

    let browser = Browser::start().await;
    let c = &browser.client;
    c.goto(&format!("{}/ops/{OP_ID}", trio.target.url))
        .await
        .unwrap();
    browser
        .wait_for(
            "the finished operation",
            Duration::from_secs(5),
            "return document.getElementById('monitor').dataset.state === 'succeeded'",
        )
        .await;
    let shown = browser
        .js(r#"return {
            imgs: document.querySelectorAll('img').length,
            link: document.getElementById('target-link'),
            noLink: document.getElementById('no-link').textContent,
            detail: document.querySelector('.step .detail').textContent,
            title: document.title,
        }"#)
        .await;
    assert_eq!(shown["imgs"], 0);
    assert_eq!(shown["link"], Value::Null, "no javascript: link");
    assert!(shown["noLink"]
        .as_str()
        .unwrap()
        .contains("not an http(s) URL"));
    assert_eq!(shown["detail"], evil);
    assert_eq!(shown["title"], "Done · MIG operation 5f0c1e9a");

    // An id nobody knows: the page says it is looking rather than showing nothing.
    c.goto(&format!(
        "{}/ops/00000000000000000000000000000000",
        trio.target.url
    ))
    .await
    .unwrap();
    browser
        .wait_for(
            "the page to say it is looking",
            Duration::from_secs(3),
            "return document.getElementById('summary').textContent.startsWith('Looking for operation 00000000')",
        )
        .await;
    browser.close().await;
}

#[actix_web::test]
async fn a_stalled_copy_says_so_instead_of_promising_an_end() {
    let _one = ONE_BROWSER.lock().await;
    let trio = Trio::start().await;
    let mut op = Op::new(OP_ID.into(), Kind::Migrate, trio.plan());
    op.owner = Role::Helper;
    op.finish_step(op::PROVISIONING_HELPER, None);
    op.finish_step(op::STOPPING_SOURCE, None);
    op.start_step(op::MIGRATING);
    op.set_progress(op::MIGRATING, 0, 2 * GIB);
    trio.helper.set(&op);
    let browser = Browser::start().await;
    browser
        .client
        .goto(&format!("{}/ops/{OP_ID}", trio.helper.url))
        .await
        .unwrap();
    let figures = "const f = document.querySelector('[data-step^=\"migrating\"] .figures'); \
                   return f && f.textContent";
    browser
        .wait_for("the copy", Duration::from_secs(5), figures)
        .await;
    for i in 1..=4 {
        pause(200).await;
        op.set_progress(op::MIGRATING, GIB * i / 4, 2 * GIB);
        trio.helper.set(&op);
    }
    let moving = browser
        .wait_for(
            "a rate",
            Duration::from_secs(2),
            "const f = document.querySelector('[data-step^=\"migrating\"] .figures'); \
             return f && f.textContent.includes('(50%)') && f.textContent",
        )
        .await;
    assert!(moving.as_str().unwrap().contains("ETA"), "{moving}");
    // Then nothing moves: within a few seconds the page stops promising an end.
    let stalled = browser
        .wait_for(
            "the stall",
            Duration::from_secs(8),
            "const f = document.querySelector('[data-step^=\"migrating\"] .figures'); \
             return f && f.textContent.includes('no progress for') && f.textContent",
        )
        .await;
    let stalled = stalled.as_str().unwrap();
    assert!(stalled.starts_with("1.00 GiB of 2.00 GiB (50%) · no progress for "));
    assert!(!stalled.contains("ETA"), "{stalled}");
    browser.close().await;
}

/// During a roll-back after the handoff to the final MIG, the re-started source drives the
/// operation: the page follows it there and links its timeline (monitor.js once had a second
/// `ownerUrl` that forgot this and pointed at the final MIG).
#[actix_web::test]
async fn a_roll_back_after_the_handoff_is_followed_at_the_source() {
    let _one = ONE_BROWSER.lock().await;
    let trio = Trio::start().await;
    let mut op = Op::new(OP_ID.into(), Kind::Migrate, trio.plan());
    for name in [op::PROVISIONING_HELPER, op::STOPPING_SOURCE, op::MIGRATING] {
        op.finish_step(name, None);
    }
    op.fail_step(op::STARTING_TARGET, "the target application did not start");
    op.owner = Role::Target;
    op.rolling_back = true;
    op.version += 1;
    // MigHelper still holds the copy it handed over; the final MIG has none (the handoff went to
    // the source); the source drives the roll-back.
    let mut handed = op.clone();
    handed.owner = Role::Helper;
    handed.rolling_back = false;
    handed.version -= 1;
    trio.helper.set(&handed);
    trio.source.set(&op);
    let browser = Browser::start().await;
    browser
        .client
        .goto(&format!("{}/ops/{OP_ID}", trio.helper.url))
        .await
        .unwrap();
    let following = browser
        .wait_for(
            "the page to follow the source",
            Duration::from_secs(8),
            "const f = document.getElementById('following').textContent; \
             return f.startsWith('Live from the source MIG') && f",
        )
        .await;
    assert!(
        following.as_str().unwrap().contains(&trio.source.url[7..]),
        "{following}"
    );
    let href = browser
        .js("const a = document.getElementById('trace-link'); return a && a.getAttribute('href')")
        .await;
    assert_eq!(
        href,
        json!(format!("{}/ops/{OP_ID}/trace", trio.source.url))
    );

    op.roll_back_rest(&[op::STOPPING_SOURCE, op::PROVISIONING_HELPER]);
    op.end(OpState::RolledBack, None);
    trio.source.set(&op);
    browser
        .wait_for(
            "the end",
            Duration::from_secs(5),
            "return document.getElementById('monitor').dataset.state === 'rolled_back'",
        )
        .await;
    let href = browser
        .js("return document.getElementById('trace-link').getAttribute('href')")
        .await;
    assert_eq!(
        href,
        json!(format!("{}/ops/{OP_ID}/trace", trio.source.url))
    );
    browser.close().await;
}
