use super::*;

pub fn sample_op() -> Op {
    Op::new(new_id(), Kind::Migrate, plan())
}

pub fn plan() -> Plan {
    crate::test_support::sample_plan()
}

#[test]
fn monitors_and_steps_are_the_designed_ones() {
    let op = Op::new(new_id(), Kind::Migrate, plan());
    let names: Vec<_> = op
        .monitors
        .iter()
        .map(|m| (m.name.as_str(), m.grid.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            (SOURCE_MONITOR, "g1"),
            (HELPER_MONITOR, "g2"),
            (TARGET_MONITOR, "g2")
        ]
    );
    let op = Op::new(new_id(), Kind::Snapshot, plan());
    assert_eq!(op.monitors[2].name, RESTART_MONITOR);
    assert_eq!(op.monitors[2].grid, "g1");
    assert_eq!(op.monitors[1].steps[2].name, RESTARTING_SOURCE);
    assert!(!op.has_step(DESTROYING_SOURCE));
}

#[test]
fn the_json_has_the_api_shape() {
    let mut op = Op::new(new_id(), Kind::Migrate, plan());
    op.start_step(MIGRATING);
    op.set_progress(MIGRATING, 10, 100);
    let v = serde_json::to_value(&op).unwrap();
    assert_eq!(v["kind"], "migrate");
    assert_eq!(v["state"], "running");
    assert_eq!(v["error"], serde_json::Value::Null);
    let step = &v["monitors"][1]["steps"][1];
    assert_eq!(step["state"], "running");
    assert_eq!(step["bytes_done"], 10);
    assert_eq!(step["bytes_total"], 100);
    assert!(step["started_at"].as_str().unwrap().ends_with('Z'));
    let back: Op = serde_json::from_value(v).unwrap();
    assert_eq!(back, op);
}

#[test]
fn roll_back_marks_undone_and_unrun_steps() {
    let mut op = Op::new(new_id(), Kind::Migrate, plan());
    op.finish_step(PROVISIONING_HELPER, None);
    op.finish_step(STOPPING_SOURCE, None);
    op.start_step(MIGRATING);
    op.fail_step(MIGRATING, "copy failed");
    op.roll_back_rest(&[STOPPING_SOURCE]);
    assert_eq!(op.step(PROVISIONING_HELPER).state, StepState::Done);
    assert_eq!(op.step(STOPPING_SOURCE).state, StepState::RolledBack);
    assert_eq!(op.step(MIGRATING).state, StepState::Failed);
    assert_eq!(op.step(STARTING_TARGET).state, StepState::RolledBack);
}

#[test]
fn steps_leave_a_bounded_timeline_named_by_instance() {
    let mut op = Op::new(new_id(), Kind::Migrate, plan());
    assert_eq!(op.trace_id.len(), 32);
    op.start_step(PROVISIONING_HELPER);
    op.finish_step(PROVISIONING_HELPER, None);
    op.owner = Role::Helper;
    op.start_step(MIGRATING);
    op.fail_step(MIGRATING, "boom");
    let t: Vec<_> = op
        .trace
        .iter()
        .map(|e| (e.instance.as_str(), e.what.as_str()))
        .collect();
    assert_eq!(
        t[0],
        (
            "source MIG (g1)",
            "provisioning MigHelper on the target grid: started"
        )
    );
    assert_eq!(t[3].0, "MigHelper (g2)");
    assert_eq!(op.trace[3].error.as_deref(), Some("boom"));
    assert!(op.trace[1].millis.is_some());
    for i in 0..(MAX_TRACE * 2) {
        op.trace("command", format!("app list #{i}"), Some(1), None);
    }
    assert_eq!(op.trace.len(), MAX_TRACE);
    assert_eq!(
        op.trace.iter().filter(|e| e.kind == "step").count(),
        4,
        "steps are kept"
    );
    let tp = op.traceparent();
    assert!(
        tp.starts_with(&format!("00-{}-", op.trace_id)) && tp.ends_with("-01"),
        "{tp}"
    );
}

#[test]
fn ids_are_128_random_bits() {
    let (a, b) = (new_id(), new_id());
    assert!(valid_id(&a) && valid_id(&b) && a != b);
    assert!(!valid_id("../../etc/passwd") && !valid_id(&a.to_uppercase()));
}

#[test]
fn a_controllers_16_mib_of_stderr_is_kept_to_a_few_kib_everywhere() {
    let huge = format!("{}é", "x".repeat(16 << 20));
    let mut op = sample_op();
    op.start_step(MIGRATING);
    op.fail_step(MIGRATING, &huge);
    op.trace("command", "app list".into(), None, Some(huge.clone()));
    op.leave(huge.clone());
    op.end(OpState::Failed, Some(huge.clone()));
    let d = op.step(MIGRATING).detail.as_deref().unwrap();
    assert!(
        d.len() <= MAX_TEXT + 40 && d.ends_with("bytes more"),
        "{}",
        d.len()
    );
    assert!(op.error.as_ref().unwrap().len() <= MAX_TEXT + 40);
    assert!(op.leftovers[0].len() <= MAX_TEXT + 40);
    let json = serde_json::to_vec(&op).unwrap();
    assert!(
        json.len() < 64 * 1024,
        "a handoff stays small: {}",
        json.len()
    );
    assert_eq!(bounded("short"), "short");
}

#[test]
fn unknown_step_names_do_not_parse_and_a_wrong_shape_is_refused() {
    let op = sample_op();
    let mut v = serde_json::to_value(&op).unwrap();
    v["monitors"][1]["steps"][0]["name"] = "rm -rf /".into();
    assert!(serde_json::from_value::<Op>(v).is_err());

    let mut op = sample_op();
    op.plan.helper_app = helper_app_name(&op.id);
    assert_eq!(op.check_shape(), Ok(()));
    let mut missing = op.clone();
    missing.monitors[2].steps.pop();
    assert!(missing.check_shape().unwrap_err().contains("steps"));
    let mut other_kind = op.clone();
    other_kind.kind = Kind::Snapshot;
    assert!(other_kind.check_shape().is_err());
    let mut other_helper = op.clone();
    other_helper.plan.helper_app = "mighelper-00000000".into();
    assert!(other_helper
        .check_shape()
        .unwrap_err()
        .contains("MigHelper"));
    assert_eq!(
        serde_json::to_value(STOPPING_SOURCE).unwrap(),
        "stopping the source application"
    );
}
