//! Supervision: a run that fails (a process exits, a VM is no longer running) is marked failed
//! and its leftovers ended; a component with `restart = "on-failure"` is started again. Also the
//! process-group signalling every stop uses.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::Daemon;
use crate::model::State;
use crate::template::{ComponentKind, Restart, MAX_RESTARTS};
use crate::util;
use crate::vm;

impl Daemon {
    /// Marks `name` failed if `generation` is still its current run; returns the group to kill
    /// and whether the run was `running` (not still starting, which its starter reports).
    pub(super) fn fail(&self, name: &str, generation: u64, reason: &str) -> (i32, bool) {
        let mut inner = self.lock();
        match inner.apps.get_mut(name) {
            Some(e) if e.generation == generation => {
                let was_running = e.rec.state == State::Running;
                if matches!(e.rec.state, State::Starting | State::Running) {
                    tracing::warn!(app = name, "failed: {reason}");
                    e.rec.state = State::Failed;
                    e.rec.error = reason.to_string();
                    self.persist(&e.rec);
                }
                (e.rec.pgid, was_running)
            }
            _ => (0, false),
        }
    }

    /// After component `component` of a running `name` exited: starts the application again if
    /// the component asks for it, with a doubling delay, until a start holds or
    /// [`MAX_RESTARTS`] are spent. Gives up as soon as anyone else starts, stops or destroys it.
    // Boxed as a `Send` future: it starts the application, whose watcher may call it again,
    // and the compiler cannot infer `Send` through that cycle.
    pub(super) fn restart_on_failure(
        self: Arc<Self>,
        name: String,
        mut generation: u64,
        component: String,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move {
            loop {
                let delay = self.with_app(&name, |e| {
                    let policy = e.rec.components.iter().find(|c| c.name == component);
                    let Some(c) = policy.filter(|c| c.restart == Restart::OnFailure) else {
                        return Ok(None);
                    };
                    if e.generation != generation || e.rec.state != State::Failed {
                        return Ok(None);
                    }
                    if e.restarts >= MAX_RESTARTS {
                        e.rec.error = format!(
                            "{} (not restarted: {MAX_RESTARTS} restarts in a row failed)",
                            e.rec.error
                        );
                        self.persist(&e.rec);
                        return Ok(None);
                    }
                    e.restarts += 1;
                    let ms = c
                        .restart_delay_ms
                        .saturating_mul(1 << (e.restarts - 1))
                        .min(30_000);
                    Ok(Some(Duration::from_millis(ms)))
                });
                let Ok(Some(delay)) = delay else { return };
                tokio::time::sleep(delay).await;
                // Only if nobody touched it meanwhile: `start` bumps the generation it checks.
                let unchanged = self.with_app(&name, |e| {
                    Ok(e.generation == generation && e.rec.state == State::Failed)
                });
                if unchanged != Ok(true) {
                    return;
                }
                tracing::info!(app = %name, "restarting after a failure");
                match self.start(&name).await {
                    // Running again: its own watcher takes over from here.
                    Ok(_) => return,
                    Err(e) => {
                        tracing::warn!(app = %name, "restart failed: {e}");
                        match self.with_app(&name, |e| Ok(e.generation)) {
                            Ok(g) => generation = g,
                            Err(_) => return,
                        }
                    }
                }
            }
        })
    }

    /// A VM has no child process to wait for: polls libvirt while the run lasts, and fails the
    /// application when a VM is no longer running (the guest powered off or crashed).
    pub(super) async fn watch_vms(self: Arc<Self>, name: String, generation: u64) {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let comps = self.with_app(&name, |e| {
                Ok((e.generation == generation
                    && matches!(e.rec.state, State::Starting | State::Running))
                .then(|| e.rec.components.clone()))
            });
            let Ok(Some(comps)) = comps else { return };
            let (state, app) = (self.state.clone(), name.clone());
            let down =
                tokio::task::spawn_blocking(move || vm::first_down(&state, &app, &comps)).await;
            let Ok(Ok(Some((c, st)))) = down else {
                continue;
            };
            let (pgid, was_running) = self.fail(&name, generation, &format!("vm {c} is {st}"));
            terminate_group(pgid, Duration::from_secs(2)).await;
            self.halt_vms(&name, generation).await;
            // A VM that died (its guest crashed, its qemu was killed) is restarted like a process.
            if was_running {
                self.restart_on_failure(name, generation, c).await;
            }
            return;
        }
    }

    /// Watches an application started by an earlier daemon: it is not our child, so poll.
    pub(super) async fn poll_adopted(self: Arc<Self>, name: String) {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (generation, dead) = {
                let inner = self.lock();
                match inner.apps.get(&name) {
                    // The pids are in the components' order (see `launch`).
                    Some(e) if e.generation == 0 && e.rec.state == State::Running => (
                        e.generation,
                        e.rec
                            .pids
                            .iter()
                            .zip(
                                e.rec
                                    .components
                                    .iter()
                                    .filter(|c| c.kind == ComponentKind::Process),
                            )
                            .find_map(|(p, c)| {
                                (!util::pid_alive(*p)).then(|| (*p, c.name.clone()))
                            }),
                    ),
                    _ => return,
                }
            };
            if let Some((pid, component)) = dead {
                let (pgid, was_running) = self.fail(
                    &name,
                    generation,
                    &format!("component {component} (process {pid}) exited"),
                );
                terminate_group(pgid, Duration::from_secs(2)).await;
                if was_running {
                    self.restart_on_failure(name, generation, component).await;
                }
                return;
            }
        }
    }
}

pub(super) fn group_exists(pgid: i32) -> bool {
    pgid > 0 && killpg(Pid::from_raw(pgid), None).is_ok()
}

pub(super) fn kill_group_now(pgid: i32) {
    if pgid > 0 {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

/// SIGTERM to the group, SIGKILL after `timeout`, then waits (briefly) until it is gone.
pub async fn terminate_group(pgid: i32, timeout: Duration) {
    if !group_exists(pgid) {
        return;
    }
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGTERM);
    let deadline = Instant::now() + timeout;
    let mut pause = Pause::new(Duration::from_millis(50));
    while group_exists(pgid) && Instant::now() < deadline {
        pause.wait().await;
    }
    if group_exists(pgid) {
        tracing::warn!(pgid, "process group ignored SIGTERM; sending SIGKILL");
        kill_group_now(pgid);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut pause = Pause::new(Duration::from_millis(20));
        while group_exists(pgid) && Instant::now() < deadline {
            pause.wait().await;
        }
    }
}

/// The waits of a poll: 1 ms, then twice as long each time up to `max`. A component that exits
/// or starts listening within milliseconds (most do) is seen within milliseconds, so `app stop`
/// and `app start` answer at once, while a slow one is still polled only every `max`.
pub(super) struct Pause {
    next: Duration,
    max: Duration,
}

impl Pause {
    pub(super) fn new(max: Duration) -> Pause {
        Pause {
            next: Duration::from_millis(1).min(max),
            max,
        }
    }

    /// How long the next wait lasts.
    fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    pub(super) async fn wait(&mut self) {
        tokio::time::sleep(self.step()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_start_at_a_millisecond_and_back_off_to_their_cap() {
        let mut p = Pause::new(Duration::from_millis(50));
        let waits: Vec<u128> = (0..9).map(|_| p.step().as_millis()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 50, 50, 50]);
        let mut tiny = Pause::new(Duration::from_micros(500));
        assert_eq!(tiny.step(), Duration::from_micros(500));
    }
}
