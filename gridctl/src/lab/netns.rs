//! `gridctl lab up --netns`: each grid in a network namespace of its own behind a router.

use super::*;

/// With `--netns`, grid n's addresses are 198.18.(B+n).x (the benchmarking range of RFC 2544,
/// so that they collide with no real network) instead of loopback ones.
pub const NETNS_PREFIX: [u8; 2] = [198, 18];

/// The network namespaces of a `--netns` lab, so that tests can cut, partition and slow the
/// links between grids with nftables and tc, as real networks fail. Grid n's namespace holds its
/// addresses on `eth0`, a veth link to the router namespace (`gN` there, 198.18.(B+n).254); the
/// router forwards between the grids and to the caller's namespace over a second veth link
/// (`uplink` in the router, 198.19.B.1; `glHASH` in the caller's, 198.19.B.2, with a route to each
/// grid). Names are derived from the lab directory, so two labs never share one; they are listed
/// in `DIR/netns` (`router NAME`, `gN NAME`) for `lab down` and for tests.
pub struct Netns {
    tag: String,
    base: u8,
}

impl Netns {
    pub(super) fn new(dir: &Path, base: u8) -> Netns {
        // FNV-1a of the directory: short, stable, and distinct for distinct labs.
        let mut h: u32 = 0x811c_9dc5;
        for b in dir.as_os_str().as_encoded_bytes() {
            h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
        }
        Netns {
            tag: format!("{h:08x}"),
            base,
        }
    }

    pub fn router(&self) -> String {
        format!("gridlab-{}-r", self.tag)
    }

    pub fn grid(&self, n: u8) -> String {
        format!("gridlab-{}-g{n}", self.tag)
    }

    /// The caller's end of the router's uplink.
    pub(super) fn uplink(&self) -> String {
        format!("gl{}", self.tag)
    }

    pub(super) fn exists(name: &str) -> bool {
        Path::new("/run/netns").join(name).exists()
    }

    /// Makes the router and grid namespaces and their links, unless they are there already.
    pub(super) fn make(&self, grids: &[Grid]) -> Result<()> {
        let r = self.router();
        let b = self.base;
        if !Netns::exists(&r) {
            ip(&["netns", "add", &r])?;
            ip(&["-n", &r, "link", "set", "lo", "up"])?;
            let up = self.uplink();
            ip(&[
                "link", "add", "name", &up, "type", "veth", "peer", "name", "uplink", "netns", &r,
            ])?;
            ip(&["addr", "add", &format!("198.19.{b}.2/24"), "dev", &up])?;
            ip(&["link", "set", &up, "up"])?;
            ip(&[
                "-n",
                &r,
                "addr",
                "add",
                &format!("198.19.{b}.1/24"),
                "dev",
                "uplink",
            ])?;
            ip(&["-n", &r, "link", "set", "uplink", "up"])?;
            run(&[
                "ip",
                "netns",
                "exec",
                &r,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])?;
        }
        for g in grids {
            let ns = self.grid(g.n);
            if Netns::exists(&ns) {
                continue;
            }
            let dev = g.name();
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", &r, "link", "add", "name", &dev, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ])?;
            ip(&[
                "-n",
                &r,
                "addr",
                "add",
                &format!("{}/24", g.ip(254)),
                "dev",
                &dev,
            ])?;
            ip(&["-n", &r, "link", "set", &dev, "up"])?;
            for host in [1, 10, 11, 20, 21] {
                ip(&[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{}/24", g.ip(host)),
                    "dev",
                    "eth0",
                ])?;
            }
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &g.ip(254).to_string(),
            ])?;
            let net = format!("{}/24", g.ip(0));
            // `replace`: a route left by an earlier lab of the same base goes.
            ip(&["route", "replace", &net, "via", &format!("198.19.{b}.1")])?;
        }
        Ok(())
    }

    /// `DIR/netns`: which namespace is which.
    pub(super) fn listing(&self, grids: &[Grid]) -> String {
        let mut s = format!("router {}\n", self.router());
        for g in grids {
            s.push_str(&format!("{} {}\n", g.name(), self.grid(g.n)));
        }
        s
    }
}

/// `ip ARGS`, failing with its stderr.
pub(super) fn ip(args: &[&str]) -> Result<()> {
    let mut all = vec!["ip"];
    all.extend_from_slice(args);
    run(&all)
}

pub(super) fn run(argv: &[&str]) -> Result<()> {
    let out = Proc::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!(
                "running {} (is iproute2 installed? see scripts/setup)",
                argv[0]
            )
        })?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
