//! Driving libvirt through the `virsh` CLI: one argument vector per call, never a shell line,
//! each bounded in time; and the steps built on it (define and start, ACPI stop then a forced
//! one, halt, undefine).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::domain::{domain_xml, Spec};
use super::Settings;
use crate::util;

/// A failed `virsh` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirshError {
    pub args: Vec<String>,
    pub message: String,
}

impl VirshError {
    /// libvirt has no such domain (already undefined, or never defined here).
    pub fn no_domain(&self) -> bool {
        let m = self.message.to_ascii_lowercase();
        m.contains("failed to get domain") || m.contains("domain not found")
    }
}

impl std::fmt::Display for VirshError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "virsh {}: {}", self.args.join(" "), self.message)
    }
}

/// Runs one `virsh` command; a test stands in with a fake.
pub trait Virsh {
    fn run(&self, args: &[&str]) -> Result<String, VirshError>;
}

/// The real `virsh`, on the grid's libvirt URI, each call bounded by `timeout`.
pub struct VirshCli {
    pub program: String,
    pub uri: String,
    pub timeout: Duration,
}

impl VirshCli {
    pub fn new(settings: &Settings) -> VirshCli {
        VirshCli {
            program: settings.virsh.clone(),
            uri: settings.uri.clone(),
            timeout: Duration::from_secs(60),
        }
    }
}

impl Virsh for VirshCli {
    fn run(&self, args: &[&str]) -> Result<String, VirshError> {
        let fail = |message: String| VirshError {
            args: args.iter().map(|s| s.to_string()).collect(),
            message,
        };
        let mut child = Command::new(&self.program)
            .arg("--connect")
            .arg(&self.uri)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("cannot run {}: {e}", self.program)))?;
        // Read both pipes on threads so that a chatty virsh cannot block on a full pipe.
        let mut out = child.stdout.take();
        let mut err = child.stderr.take();
        let out_t = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(o) = out.as_mut() {
                let _ = o.read_to_string(&mut s);
            }
            s
        });
        let err_t = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(e) = err.as_mut() {
                let _ = e.read_to_string(&mut s);
            }
            s
        });
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(fail(format!(
                        "no answer within {}s (is libvirtd running at {}?)",
                        self.timeout.as_secs(),
                        self.uri
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(fail(e.to_string())),
            }
        };
        let out = out_t.join().unwrap_or_default();
        let err = err_t.join().unwrap_or_default();
        if status.success() {
            Ok(out)
        } else {
            // One line: the message ends up in `app info --batch`, one KEY\tVALUE per line.
            let msg: Vec<&str> = err
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            Err(fail(if msg.is_empty() {
                status.to_string()
            } else {
                msg.join("; ")
            }))
        }
    }
}

/// libvirt's state of a domain, as `virsh domstate` names it; `None` when it is not defined.
pub fn domstate(v: &dyn Virsh, name: &str) -> Result<Option<String>, VirshError> {
    match v.run(&["domstate", name]) {
        Ok(s) => Ok(Some(s.lines().next().unwrap_or("").trim().to_string())),
        Err(e) if e.no_domain() => Ok(None),
        Err(e) => Err(e),
    }
}

fn is_off(state: &Option<String>) -> bool {
    matches!(state.as_deref(), None | Some("shut off") | Some("crashed"))
}

/// Writes the domain XML beside the application and (re)defines and starts the domain.
pub fn define_and_start(v: &dyn Virsh, spec: &Spec, xml_path: &Path) -> Result<(), String> {
    util::write_atomic(xml_path, domain_xml(spec).as_bytes())
        .map_err(|e| format!("writing {}: {e}", xml_path.display()))?;
    let xml = xml_path.to_string_lossy();
    v.run(&["define", &xml]).map_err(|e| e.to_string())?;
    if !is_off(&domstate(v, &spec.name).map_err(|e| e.to_string())?) {
        return Ok(());
    }
    v.run(&["start", &spec.name]).map_err(|e| e.to_string())?;
    Ok(())
}

/// How a VM came to be off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// It was not running (or not defined).
    AlreadyOff,
    /// The guest powered off after the ACPI request.
    ShutDown,
    /// It did not within the wait, or refused the request, and was forced off.
    Forced { reason: String },
}

/// ACPI shutdown, a wait of at most `timeout` (polling every `poll`), then a hard stop.
pub fn stop(
    v: &dyn Virsh,
    name: &str,
    timeout: Duration,
    poll: Duration,
) -> Result<Stopped, String> {
    if is_off(&domstate(v, name).map_err(|e| e.to_string())?) {
        return Ok(Stopped::AlreadyOff);
    }
    let reason = match v.run(&["shutdown", name, "--mode", "acpi"]) {
        Err(e) => format!("the ACPI shutdown request failed ({e})"),
        Ok(_) => {
            let deadline = Instant::now() + timeout;
            loop {
                if is_off(&domstate(v, name).map_err(|e| e.to_string())?) {
                    return Ok(Stopped::ShutDown);
                }
                if Instant::now() >= deadline {
                    break format!(
                        "it did not power off within {}s of the ACPI request",
                        timeout.as_secs()
                    );
                }
                std::thread::sleep(poll);
            }
        }
    };
    halt(v, name)?;
    Ok(Stopped::Forced { reason })
}

/// Forces the domain off, if it runs.
pub fn halt(v: &dyn Virsh, name: &str) -> Result<(), String> {
    if is_off(&domstate(v, name).map_err(|e| e.to_string())?) {
        return Ok(());
    }
    match v.run(&["destroy", name]) {
        Ok(_) => Ok(()),
        // It went off by itself meanwhile.
        Err(_) if is_off(&domstate(v, name).map_err(|e| e.to_string())?) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// Forces the domain off and removes its definition; a domain already gone is fine.
pub fn undefine(v: &dyn Virsh, name: &str) -> Result<(), String> {
    halt(v, name)?;
    match v.run(&["undefine", name]) {
        Err(e) if !e.no_domain() => Err(e.to_string()),
        _ => Ok(()),
    }
}
