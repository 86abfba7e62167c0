//! Values the tests of several crates share (feature `test-support`, re-exported by the
//! `testkit` crate; the unit tests in this crate call it directly).

use dialect::AppState;

use crate::memory_lab::MemoryLab;
use crate::op::Plan;

/// A migration of `shop` on g1 to `shop2` on g2, at the addresses of a two-grid lab of base 0.
/// A test that needs another field sets it on the returned value.
pub fn sample_plan() -> Plan {
    Plan {
        source_grid: "g1".into(),
        target_grid: "g2".into(),
        source_app: "shop".into(),
        target_app: "shop2".into(),
        source_controller: "127.0.1.1:2222".into(),
        target_controller: "127.0.2.1:2222".into(),
        source_mig_url: "http://127.0.1.10:8080".into(),
        helper_url: "http://127.0.2.20:8080".into(),
        final_mig_url: "http://127.0.2.10:8080".into(),
        helper_app: "mighelper-01234567".into(),
        helper_config: vec![("in_ip".into(), "127.0.2.20".into())],
        target_app_config: vec![],
        max_rate: None,
        precopy: false,
    }
}

/// In-memory grids for [`sample_plan`]: `shop` (demoapp) running on g1 with `data` in its volume
/// `data`, and g2 at `target_controller`, empty.
pub fn shop_lab(target_controller: &str, data: &[u8]) -> MemoryLab {
    let lab = MemoryLab::new();
    lab.grid("127.0.1.1:2222").put_app(
        "shop",
        "demoapp",
        AppState::Running,
        &[],
        &[("data", data)],
    );
    lab.grid(target_controller);
    lab
}
