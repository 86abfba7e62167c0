//! Ports for the servers a test starts.

use std::net::{IpAddr, Ipv4Addr, TcpListener};

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    free_port_on(Ipv4Addr::LOCALHOST)
}

/// A port free on `ip` right now (a test's own 127.0.N.x address).
pub fn free_port_on(ip: impl Into<IpAddr>) -> u16 {
    let ip = ip.into();
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("a free port on {ip}: {e}"))
        .port()
}
