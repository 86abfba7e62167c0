//! The GUI over a real lab in a real headless Chromium: a person fills the form on the source
//! MIG's page, presses Submit, and the page follows the operation to MigHelper and on to the MIG
//! that runs at the end, while the page's own server goes away.

mod common;

use std::sync::atomic::AtomicU8;
use std::time::{Duration, Instant};

use common::lab::Lab;
use fantoccini::Locator;
use serde_json::Value;
use testkit::browser::Browser;

/// This binary's labs: 240..=249 (tests/migrate.rs and tests/failures.rs hold 200..=239).
static BASES: AtomicU8 = AtomicU8::new(240);

const READ_MONITOR: &str = r#"
    const m = document.getElementById('monitor');
    const fig = document.querySelector('[data-step^="migrating"] .figures');
    const link = document.getElementById('target-link');
    return {
      state: m ? (m.dataset.state || '') : '',
      steps: Array.from(document.querySelectorAll('[data-step]')).map(e => [e.dataset.step, e.dataset.state]),
      monitors: Array.from(document.querySelectorAll('#monitors h2')).map(e => e.textContent.trim()),
      progress: fig ? fig.textContent : '',
      link: link ? link.getAttribute('href') : '',
      text: document.body.innerText,
    };
"#;

/// Fills the form and submits; returns when the monitor page has loaded.
async fn submit(b: &Browser, url: &str, kind: &str, name: &str, grid: &str) {
    b.client.goto(url).await.unwrap();
    b.wait_for(
        "the form",
        Duration::from_secs(10),
        "return document.getElementById('op-form')",
    )
    .await;
    let c = &b.client;
    if let Ok(radio) = c.find(Locator::Id(&format!("kind-{kind}"))).await {
        if radio.is_enabled().await.unwrap_or(false) {
            radio.click().await.unwrap();
        }
    }
    c.find(Locator::Id("target-app"))
        .await
        .unwrap()
        .send_keys(name)
        .await
        .unwrap();
    b.js(&format!("const s = document.getElementById('target-grid'); s.value = '{grid}'; s.dispatchEvent(new Event('change')); return s.value")).await;
    b.click("submit").await;
    b.wait_for(
        "the monitor page",
        Duration::from_secs(15),
        "return location.pathname.startsWith('/ops/')",
    )
    .await;
}

/// Reads the monitor until the operation is final; returns every distinct reading.
async fn follow(b: &Browser) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut seen: Vec<Value> = Vec::new();
    loop {
        let v = b.js(READ_MONITOR).await;
        let state = v["state"].as_str().unwrap_or_default().to_string();
        let mut key = v.clone();
        key["text"] = Value::Null;
        if seen.last().map(|l| {
            let mut l = l.clone();
            l["text"] = Value::Null;
            l
        }) != Some(key)
        {
            seen.push(v.clone());
        }
        if !state.is_empty() && state != "running" {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "the page never showed an end; last: {}",
            v["text"]
        );
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

/// The order in which steps first showed as done.
fn done_order(seen: &[Value]) -> Vec<String> {
    let mut order = Vec::new();
    for v in seen {
        for s in v["steps"].as_array().unwrap() {
            let name = s[0].as_str().unwrap().to_string();
            if s[1] == "done" && !order.contains(&name) {
                order.push(name);
            }
        }
    }
    order
}

#[actix_rt::test]
async fn a_person_migrates_and_snapshots_from_the_page_and_follows_it_to_the_end() {
    let lab = Lab::up(2, &BASES);
    lab.provision_demo(1, "shop");
    let b = Browser::start().await;

    // Migrate g1 -> g2 from the source MIG's page.
    submit(
        &b,
        &format!("{}/", lab.mig_url(1)),
        "migrate",
        "shop2",
        "g2",
    )
    .await;
    let seen = follow(&b).await;
    let last = seen.last().unwrap();
    assert_eq!(last["state"], "succeeded", "{}", last["text"]);
    assert_eq!(
        last["monitors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap())
            .collect::<Vec<_>>(),
        [
            "Source Application Monitor",
            "MigHelper Application Monitor",
            "Target Application Monitor"
        ]
    );
    assert_eq!(
        done_order(&seen),
        [
            "provisioning MigHelper on the target grid",
            "stopping the source application",
            "migrating the source application to the target grid as the target application",
            "starting the target application",
            "destroying the source application",
            "stopping MigHelper",
            "destroying MigHelper",
        ],
        "steps finished out of order on the page"
    );
    assert!(
        seen.iter()
            .any(|v| v["progress"].as_str().unwrap_or_default().contains('/')),
        "the migrating step never showed bytes done / total"
    );
    assert_eq!(
        last["link"],
        lab.mig_url(2),
        "the page ends on the target's GUI"
    );
    b.screenshot("lab-migrate-finished").await;

    // The timeline, linked from the monitor, renders the whole operation.
    let href = b
        .wait_for(
            "the timeline link",
            Duration::from_secs(5),
            "const a = document.getElementById('trace-link'); return a && a.href",
        )
        .await;
    b.client.goto(href.as_str().unwrap()).await.unwrap();
    let rows = b
        .wait_for("the timeline", Duration::from_secs(5), "return Array.from(document.querySelectorAll('table.timeline tbody tr')).map(r => r.dataset.instance)")
        .await;
    let rows: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for instance in ["source MIG (g1)", "MigHelper (g2)", "target MIG (g2)"] {
        assert!(
            rows.contains(&instance),
            "{instance} missing from the timeline: {rows:?}"
        );
    }
    b.screenshot("lab-timeline").await;
    assert_eq!(lab.apps(2), [("shop2".to_string(), "running".to_string())]);

    // Snapshot g2 -> g1 from the target's page; the page follows it back to the same MIG.
    submit(
        &b,
        &format!("{}/", lab.mig_url(2)),
        "snapshot",
        "shop3",
        "g1",
    )
    .await;
    let seen = follow(&b).await;
    let last = seen.last().unwrap();
    assert_eq!(last["state"], "succeeded", "{}", last["text"]);
    assert!(last["monitors"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m == "Re-Start Source Application Monitor"));
    assert_eq!(lab.apps(1), [("shop3".to_string(), "stopped".to_string())]);
    b.close().await;
}

#[actix_rt::test]
async fn a_forced_failure_shows_the_failed_step_and_the_rollback() {
    let lab = Lab::up(2, &BASES);
    let g2_web = format!("web_ip={}", lab.ip(2, 11));
    lab.edit_grid_info(&g2_web, "web_ip=192.0.2.1");
    lab.provision_demo(1, "shop");
    let b = Browser::start().await;
    submit(
        &b,
        &format!("{}/", lab.mig_url(1)),
        "migrate",
        "shop2",
        "g2",
    )
    .await;
    let seen = follow(&b).await;
    let last = seen.last().unwrap();
    assert_eq!(last["state"], "rolled_back", "{}", last["text"]);
    let steps = last["steps"].as_array().unwrap();
    let state_of = |n: &str| {
        steps
            .iter()
            .find(|s| s[0] == n)
            .map(|s| s[1].as_str().unwrap().to_string())
    };
    assert_eq!(
        state_of("starting the target application").as_deref(),
        Some("failed")
    );
    assert_eq!(
        state_of("stopping the source application").as_deref(),
        Some("rolled_back")
    );
    let text = last["text"].as_str().unwrap();
    assert!(
        text.contains("did not start"),
        "the reason is shown:\n{text}"
    );
    b.screenshot("lab-rollback").await;
    assert_eq!(lab.apps(1), [("shop".to_string(), "running".to_string())]);
    b.close().await;
}
