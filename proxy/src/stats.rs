//! Live counters per pass-through port, read by the mon terminal.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// Live counters of the proxy, per listening port, shared with whoever exports them (the mon
/// terminal). Updated with relaxed atomics on the data path; read with [`ProxyStats::snapshot`].
#[derive(Debug, Default)]
pub struct ProxyStats {
    ports: Mutex<Vec<Arc<PortCounters>>>,
}

/// One port's counters, as plain data.
///
/// `bytes_in` is what clients sent (client → aux), `bytes_out` what they received (aux → client).
/// `total` counts every accepted connection, `refused` those closed without relaying because of
/// aux (unset, refusing or too slow), `refused_per_client` those reset because their client
/// address already held `max_connections_per_client`, `active` those relaying now.
/// `limit_reached` counts the times this port's listener found all `max_connections` live and
/// stopped accepting (new connections then wait in the backlog; they are not refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PortStats {
    pub port: u16,
    pub upstream_port: u16,
    pub active: u64,
    pub total: u64,
    pub refused: u64,
    pub refused_per_client: u64,
    pub limit_reached: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[derive(Debug)]
pub(crate) struct PortCounters {
    pub(crate) port: u16,
    pub(crate) upstream_port: u16,
    pub(crate) active: AtomicU64,
    pub(crate) total: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) refused_per_client: AtomicU64,
    pub(crate) limit_reached: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
}

impl ProxyStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// The counters of every port, in the order the ports were bound.
    pub fn snapshot(&self) -> Vec<PortStats> {
        let ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        ports
            .iter()
            .map(|c| PortStats {
                port: c.port,
                upstream_port: c.upstream_port,
                active: c.active.load(Ordering::Relaxed),
                total: c.total.load(Ordering::Relaxed),
                refused: c.refused.load(Ordering::Relaxed),
                refused_per_client: c.refused_per_client.load(Ordering::Relaxed),
                limit_reached: c.limit_reached.load(Ordering::Relaxed),
                bytes_in: c.bytes_in.load(Ordering::Relaxed),
                bytes_out: c.bytes_out.load(Ordering::Relaxed),
            })
            .collect()
    }

    pub(crate) fn register(&self, port: u16, upstream_port: u16) -> Arc<PortCounters> {
        let c = Arc::new(PortCounters {
            port,
            upstream_port,
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            refused_per_client: AtomicU64::new(0),
            limit_reached: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        });
        self.ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(c.clone());
        c
    }
}
