//! The `mon` terminal's `/metrics`: Prometheus text from the `metrics` facade. The actors record
//! operation and step metrics as they journal (see `actors::book`); this module adds what is read
//! at scrape time: the pass-through counters, the process's own resources and build info.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use proxy::ProxyStats;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Step durations run from well under a second (stopping MigHelper) to an hour (a large copy).
const STEP_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Installs the process-wide recorder (once; later calls return the same handle).
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("mig_step_duration_seconds".into()),
                STEP_BUCKETS,
            )
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder can only be there in a test binary that installed ours already.
        let _ = metrics::set_global_recorder(recorder);
        metrics::describe_counter!(
            "mig_operations_started_total",
            "Operations started by this MIG, by kind."
        );
        metrics::describe_counter!(
            "mig_operations_ended_total",
            "Operations this instance ended, by kind and final state."
        );
        metrics::describe_histogram!(
            "mig_step_duration_seconds",
            metrics::Unit::Seconds,
            "Duration of each finished step, by step name and state."
        );
        metrics::describe_counter!(
            "mig_migrated_bytes_total",
            metrics::Unit::Bytes,
            "Bytes copied by finished migrating steps."
        );
        metrics::describe_gauge!(
            "mig_migration_rate_bytes_per_second",
            "Copy rate of the migration in progress (0 when none)."
        );
        metrics::describe_counter!(
            "mig_proxy_connections_refused_total",
            "Pass-through connections reset without relaying, by port and reason: aux (unset, \
             refusing or too slow) or per_client (the client address held max_connections_per_client)."
        );
        metrics::describe_counter!(
            "mig_proxy_limit_reached_total",
            "Times a pass-through port stopped accepting because max_connections were live \
             (new connections then wait in the backlog)."
        );
        metrics::describe_gauge!(
            "mig_proxy_path",
            "1 for the path pass-through bytes take (sockmap, splice or copy; property proxy_path), 0 for the others."
        );
        metrics::describe_counter!(
            "mig_webhook_attempts_total",
            "Webhook delivery attempts, by result: delivered (2xx) or failed (retried with back-off)."
        );
        metrics::describe_counter!(
            "mig_webhook_gave_up_total",
            "Webhook deliveries abandoned after the last retry."
        );
        handle
    })
}

/// Renders every metric, refreshing the scrape-time ones first.
pub fn render(proxy: Option<&ProxyStats>) -> String {
    let handle = install();
    if let Some(stats) = proxy {
        for p in stats.snapshot() {
            let port = p.port.to_string();
            metrics::gauge!("mig_proxy_connections_active", "port" => port.clone())
                .set(p.active as f64);
            metrics::counter!("mig_proxy_connections_total", "port" => port.clone())
                .absolute(p.total);
            metrics::counter!("mig_proxy_connections_refused_total", "port" => port.clone(), "reason" => "aux")
                .absolute(p.refused);
            metrics::counter!("mig_proxy_connections_refused_total", "port" => port.clone(), "reason" => "per_client")
                .absolute(p.refused_per_client);
            metrics::counter!("mig_proxy_limit_reached_total", "port" => port.clone())
                .absolute(p.limit_reached);
            metrics::counter!("mig_proxy_bytes_total", "port" => port.clone(), "direction" => "in")
                .absolute(p.bytes_in);
            metrics::counter!("mig_proxy_bytes_total", "port" => port, "direction" => "out")
                .absolute(p.bytes_out);
        }
        for (path, value) in stats.path_gauge() {
            metrics::gauge!("mig_proxy_path", "path" => path).set(value);
        }
    }
    let me = process_stats();
    metrics::gauge!("mig_process_resident_memory_bytes").set(me.rss_bytes as f64);
    metrics::gauge!("mig_process_cpu_seconds").set(me.cpu_seconds);
    metrics::gauge!("mig_process_open_fds").set(me.open_fds as f64);
    metrics::gauge!("mig_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    handle.run_upkeep();
    handle.render()
}

#[derive(Debug, Default)]
struct ProcessStats {
    rss_bytes: u64,
    cpu_seconds: f64,
    open_fds: usize,
}

/// Reads this process's resources from /proc. Written by hand: three numbers from two files do not
/// justify a procfs crate; off Linux they stay 0.
fn process_stats() -> ProcessStats {
    let mut s = ProcessStats::default();
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        s.rss_bytes = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024);
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may hold spaces) start after the last ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, r)| r)
            .split_whitespace()
            .collect();
        // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
            .sum();
        // The kernel's USER_HZ is 100 on every Linux architecture MIG runs on.
        s.cpu_seconds = ticks as f64 / 100.0;
    }
    s.open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_stats_are_read() {
        let s = process_stats();
        assert!(s.rss_bytes > 1 << 20, "{s:?}");
        assert!(s.open_fds >= 3, "{s:?}");
    }
}

#[cfg(test)]
mod wiring_tests {
    use actors::book::OpBook;
    use actors::journal::Journal;
    use actors::op::{self, Kind, Op, OpState, Plan};

    #[test]
    fn what_the_actors_journal_shows_in_metrics() {
        super::install();
        let dir = tempfile::tempdir().unwrap();
        let book = OpBook::open(Journal::open(dir.path()).unwrap()).unwrap();
        let plan: Plan = serde_json::from_value(serde_json::json!({
            "source_grid": "g1", "target_grid": "g2", "source_app": "a", "target_app": "b",
            "source_controller": "h:1", "target_controller": "h:2", "source_mig_url": "x",
            "helper_url": "y", "final_mig_url": "z", "helper_app": "m", "helper_config": [],
            "target_app_config": []}))
        .unwrap();
        let mut o = Op::new(op::new_id(), Kind::Snapshot, plan);
        book.commit(&o).unwrap();
        o.start_step(op::PROVISIONING_HELPER);
        book.commit(&o).unwrap();
        o.finish_step(op::PROVISIONING_HELPER, None);
        book.commit(&o).unwrap();
        o.end(OpState::RolledBack, None);
        book.commit(&o).unwrap();
        let text = super::render(None);
        assert!(
            text.contains(r#"mig_operations_started_total{kind="snapshot"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"mig_operations_ended_total{kind="snapshot",state="rolled_back"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"mig_step_duration_seconds_count{step="provisioning MigHelper on the target grid",state="done"} 1"#),
            "{text}"
        );
    }
}
