//! What MIG learns about where it runs before it serves anything: the start-up checks.
//!
//! `mig check` prints every problem found here and exits 2; `mig serve` logs the same problems but
//! keeps running with operations switched off, because MIG sits in the application's data path and a
//! broken grid.info must not take the application's pass-through traffic down with it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use actors::grid_info::{self, Grid, GridInfo};
use actors::keys;
use actors::properties::Properties;

/// The name of the start-up script on the config volume.
pub const RC_LOCAL: &str = ".rc.local";

/// Everything the start-up checks found.
#[derive(Debug)]
pub struct Site {
    pub props: Properties,
    /// grid.info, when it parsed.
    pub grid_info: Option<GridInfo>,
    /// The id of the grid MIG runs on, or why it cannot tell.
    pub own_grid: Result<String, String>,
    /// Problems that stop operations (and make `mig check` exit 2), one line each.
    pub problems: Vec<String>,
}

impl Site {
    /// Runs every check that has no side effect. Never fails: what is wrong is in `problems`.
    pub fn inspect(props: Properties) -> Site {
        let mut problems = Vec::new();

        let grid_info = match grid_info::load(&props.grid_info_file) {
            Ok(gi) => Some(gi),
            Err(diags) => {
                problems.extend(diags.iter().map(ToString::to_string));
                None
            }
        };

        if let Err(e) = keys::check_private_key(&props.private_key_file) {
            problems.push(e.to_string());
        }

        if let Err(e) = check_known_hosts(&props.known_hosts_file) {
            problems.push(e);
        }

        if let Err(e) = check_rc_local(&props.config_dir) {
            problems.push(e);
        }

        if props.state_dir.exists() && !props.state_dir.is_dir() {
            problems.push(format!(
                "{}: state_dir is not a directory",
                props.state_dir.display()
            ));
        }

        let own_grid = match &grid_info {
            None => Err(format!(
                "grid.info ({}) has problems, so MIG cannot tell which grid it runs on",
                props.grid_info_file.display()
            )),
            Some(gi) => own_grid(&props, gi).map(|g| g.id.clone()),
        };
        // A `grid` property that names no grid is a configuration mistake; an address that matches
        // no MIG_ip is the normal state of a freshly provisioned copy and only switches operations off.
        if let (Some(id), Err(why), Some(_)) = (&props.grid, &own_grid, &grid_info) {
            problems.push(format!("grid = {id:?}: {why}"));
        }

        Site {
            props,
            grid_info,
            own_grid,
            problems,
        }
    }

    /// Why operations are not offered, if they are not.
    pub fn operations_unavailable(&self) -> Option<String> {
        if let Some(p) = self.problems.first() {
            let more = self.problems.len() - 1;
            return Some(if more > 0 {
                format!("{p} (and {more} more problem(s): run `mig check`)")
            } else {
                p.clone()
            });
        }
        self.own_grid.as_ref().err().cloned()
    }

    /// The grid MIG runs on, when known.
    pub fn own(&self) -> Option<&Grid> {
        let id = self.own_grid.as_ref().ok()?;
        self.grid_info.as_ref()?.get(id)
    }
}

/// Finds the grid MIG runs on: the `grid` property when set, else the one grid whose `MIG_ip` is
/// this MIG's GUI address (`listen`:`port_no`).
pub fn own_grid<'a>(props: &Properties, gi: &'a GridInfo) -> Result<&'a Grid, String> {
    if let Some(id) = &props.grid {
        return gi.get(id).ok_or_else(|| {
            let ids: Vec<&str> = gi.grids.iter().map(|g| g.id.as_str()).collect();
            format!(
                "no grid {id:?} in {}; it has {}",
                gi.path.display(),
                ids.join(", ")
            )
        });
    }
    if props.listen.is_unspecified() {
        return Err(format!(
            "MIG listens on {} (every address), so it cannot match itself to a MIG_ip in {}: set `listen` to this MIG's address or `grid` to its grid id",
            props.listen,
            gi.path.display()
        ));
    }
    let me = format!("{}:{}", props.listen, props.port_no);
    let found: Vec<&Grid> = gi
        .grids
        .iter()
        .filter(|g| g.mig_ip.host == props.listen.to_string() && g.mig_ip.port == props.port_no)
        .collect();
    match found.as_slice() {
        [g] => Ok(g),
        [] => Err(format!(
            "no grid in {} has MIG_ip = {me}; MIG offers no operation until it can tell its grid (set `grid`, or add this address to grid.info)",
            gi.path.display()
        )),
        many => Err(format!(
            "grids {} in {} all have MIG_ip = {me}; set `grid` to say which one this is",
            many.iter().map(|g| g.id.as_str()).collect::<Vec<_>>().join(", "),
            gi.path.display()
        )),
    }
}

fn check_known_hosts(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!("{}: known_hosts_file is not a regular file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "{}: known_hosts_file not found: pin each controller's host key there (e.g. `ssh-keyscan -p PORT HOST >> {}`, then compare the fingerprints out of band)",
            path.display(),
            path.display()
        )),
        Err(e) => Err(format!("{}: cannot read known_hosts_file: {e}", path.display())),
    }
}

/// The start-up script, when the config volume has one.
pub fn rc_local(config_dir: &Path) -> Option<PathBuf> {
    let p = config_dir.join(RC_LOCAL);
    p.exists().then_some(p)
}

fn check_rc_local(config_dir: &Path) -> Result<(), String> {
    match rc_local(config_dir) {
        Some(p) if !is_executable(&p) => Err(not_executable(&p)),
        _ => Ok(()),
    }
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The appliance's message for a script it cannot run.
pub fn not_executable(p: &Path) -> String {
    format!("{}: .rc.local script is not executable.", p.display())
}

/// Runs `.rc.local` (when present) from the config dir and waits for it. Errors carry the
/// appliance's own messages.
pub async fn run_rc_local(config_dir: &Path) -> Result<(), String> {
    let Some(p) = rc_local(config_dir) else {
        return Ok(());
    };
    if !is_executable(&p) {
        return Err(not_executable(&p));
    }
    tracing::info!(script = %p.display(), "running start-up script");
    let status = tokio::process::Command::new(&p)
        .current_dir(config_dir)
        .status()
        .await
        .map_err(|e| format!("{}: .rc.local script could not run: {e}", p.display()))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(n) => Err(format!(
            "{}: .rc.local script failed, ret = {n}",
            p.display()
        )),
        None => Err(format!(
            "{}: .rc.local script failed, ret = killed by a signal",
            p.display()
        )),
    }
}
