//! The `Host` check of the GUI port: a request must name MIG by one of the names it answers to.
//!
//! A page on another site can make an operator's browser talk to MIG through DNS rebinding: its
//! own name (`evil.example`) is made to resolve to MIG's address, so the browser treats MIG's
//! answers as the page's own origin, and the page can read the form's CSRF token and start an
//! operation. The browser still sends `Host: evil.example`, so MIG refuses every request whose
//! `Host` is not one of its own names with 421 (Misdirected Request).
//!
//! The names MIG answers to: the `listen` address; the address the connection arrived at, when
//! written as an address (which covers `listen = 0.0.0.0`: any of the machine's addresses); the
//! host of every `MIG_ip` in grid.info (the plan's URLs, which the other MIG instances and the
//! monitor page use, are built from them); `localhost` and the loopback addresses when MIG listens
//! on loopback or on every address, or the connection arrived on loopback; and `allowed_hosts`.

use std::net::{IpAddr, SocketAddr};

use actors::grid_info::GridInfo;
use actors::properties::{split_host_port, AllowedHost, Properties};

/// The local address of a GUI connection, recorded when it is accepted (see `server::run`).
#[derive(Debug, Clone, Copy)]
pub struct LocalAddr(pub SocketAddr);

/// The names this MIG answers to; see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct HostCheck {
    /// `None` when MIG listens on every address.
    listen: Option<IpAddr>,
    /// Whether `localhost` and the loopback addresses are names of this MIG whatever the
    /// connection.
    loopback: bool,
    /// The hosts of the `MIG_ip`s in grid.info, lowercase.
    mig_ips: Vec<String>,
    allowed: Vec<AllowedHost>,
}

impl HostCheck {
    pub fn new(props: &Properties, grid_info: Option<&GridInfo>) -> HostCheck {
        let listen = (!props.listen.is_unspecified()).then_some(props.listen);
        HostCheck {
            listen,
            loopback: listen.is_none_or(|l| l.is_loopback()),
            mig_ips: grid_info
                .iter()
                .flat_map(|gi| &gi.grids)
                .map(|g| g.mig_ip.host.to_ascii_lowercase())
                .collect(),
            allowed: props.allowed_hosts.clone(),
        }
    }

    /// Checks a request's `Host` header (`None`: the request has none, as an HTTP/1.0 client may
    /// send; a browser always sends one) that arrived at local address `local`. The error is the
    /// body of the 421 answer.
    pub fn check(&self, host_header: Option<&str>, local: Option<IpAddr>) -> Result<(), String> {
        let Some(raw) = host_header else {
            return Ok(());
        };
        let Some((host, port)) = split_host_port(raw.trim()) else {
            return Err(format!(
                "the Host header {raw:?} is not a host name or address"
            ));
        };
        let ip = host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
        let local = local.map(|l| l.to_canonical());
        let own_address = ip.is_some() && (ip == self.listen || ip == local);
        let loopback = (self.loopback || local.is_some_and(|l| l.is_loopback()))
            && (host == "localhost" || ip.is_some_and(|ip| ip.is_loopback()));
        let in_grid_info = self.mig_ips.contains(&host);
        let allowed = self
            .allowed
            .iter()
            .any(|a| a.host == host && a.port.is_none_or(|p| p == port.unwrap_or(80)));
        if own_address || loopback || in_grid_info || allowed {
            return Ok(());
        }
        Err(format!(
            "this MIG does not answer to the name {host:?} (Host: {raw}). If that is a name of \
             this MIG, add it to the allowed_hosts property (e.g. allowed_hosts = \"{host}\") and \
             restart MIG; requests naming another host are refused so that a page on another \
             site cannot drive MIG through the operator's browser (DNS rebinding)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(sets: &[&str], grid_info: Option<&GridInfo>) -> HostCheck {
        let dir = tempfile::tempdir().unwrap();
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let props = actors::properties::load(dir.path(), std::iter::empty(), &sets).unwrap();
        HostCheck::new(&props, grid_info)
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn own_addresses_loopback_names_and_allowed_hosts_pass_others_do_not() {
        let every = check(&["allowed_hosts=MIG.example.net,tunnel:9000"], None);
        let local = ip("10.0.1.10");
        for ok in [
            "10.0.1.10:8080",
            "10.0.1.10",
            "localhost:8080",
            "127.0.0.1:8080",
            "[::1]:8080",
            "mig.example.net",
            "Mig.Example.Net.:8080",
            "tunnel:9000",
        ] {
            assert_eq!(every.check(Some(ok), local), Ok(()), "{ok}");
        }
        assert_eq!(every.check(None, local), Ok(()));
        for bad in [
            "evil.example",
            "evil.example:8080",
            "10.0.1.11:8080",
            "tunnel:80",
            "tunnel",
        ] {
            let e = every.check(Some(bad), local).unwrap_err();
            assert!(e.contains("allowed_hosts"), "{bad}: {e}");
        }
        assert!(every
            .check(Some("evil.example:8080"), local)
            .unwrap_err()
            .contains("\"evil.example\""));
        assert!(every.check(Some("a b"), local).is_err());

        // Listening on one outside address: loopback names only on a loopback connection.
        let one = check(&["listen=10.0.1.10"], None);
        assert_eq!(one.check(Some("10.0.1.10:8080"), None), Ok(()));
        assert!(one.check(Some("localhost"), local).is_err());
        assert_eq!(one.check(Some("localhost"), ip("127.0.0.1")), Ok(()));
        // An IPv4 connection to an IPv6 socket.
        assert_eq!(one.check(Some("10.0.1.10"), ip("::ffff:10.0.1.10")), Ok(()));
    }

    #[test]
    fn every_mig_ip_of_grid_info_passes() {
        let gi = actors::grid_info::parse(
            std::path::Path::new("grid.info"),
            b"grid g1:\n{\n  controller = 10.0.0.5\n  MIG_ip = mig1.example:8080\n  \
              MigHelper_config = \"in_ip=10.0.1.20 out_ip=10.0.1.21 netmask=255.255.255.0 gateway=10.0.1.1\"\n}\n\
              grid g2:\n{\n  controller = 10.0.0.6\n  MIG_ip = 10.0.2.10:8080\n  \
              MigHelper_config = \"in_ip=10.0.2.20 out_ip=10.0.2.21 netmask=255.255.255.0 gateway=10.0.2.1\"\n}\n",
        )
        .unwrap();
        let c = check(&[], Some(&gi));
        assert_eq!(c.check(Some("MIG1.example:8080"), ip("10.0.1.10")), Ok(()));
        assert_eq!(c.check(Some("10.0.2.10:8080"), ip("10.0.1.10")), Ok(()));
        assert!(c.check(Some("mig3.example"), ip("10.0.1.10")).is_err());
    }
}
