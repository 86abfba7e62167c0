//! Quantities as people read them, for the monitor, the timeline and the CLI alike.

/// `1.00 GiB`, `51 MiB`, `512 B`: bytes as the monitor shows them.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u >= 2 {
        format!("{v:.2} {}", UNITS[u])
    } else {
        format!("{v:.0} {}", UNITS[u])
    }
}
