//! The op book: what one instance knows of every operation it took part in.
//!
//! Writes go to the journal first (durable), then to the in-memory copy that status reads and the
//! live event streams watch. An older copy (lower `version`) never replaces a newer one, so a late
//! or replayed write cannot move an operation backwards.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::journal::{Journal, JournalError};
use crate::op::{Op, OpState, Role, StepState, MIGRATING};

#[derive(Clone)]
pub struct OpBook {
    journal: Journal,
    ops: Arc<Mutex<HashMap<String, watch::Sender<Op>>>>,
}

impl OpBook {
    /// Opens the book on `journal`, loading every operation already recorded.
    pub fn open(journal: Journal) -> Result<OpBook, JournalError> {
        let book = OpBook {
            journal,
            ops: Arc::default(),
        };
        for op in book.journal.load_all()? {
            book.publish(op);
        }
        Ok(book)
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Journals `op`, then makes it visible. Callers do this before acknowledging or starting work.
    pub fn commit(&self, op: &Op) -> Result<(), JournalError> {
        self.journal.save(op)?;
        record_metrics(self.get(&op.id).as_ref(), op);
        self.publish(op.clone());
        Ok(())
    }

    /// Makes `op` visible without journalling it: for progress figures, which are not worth an
    /// fsync each and are recomputed after a restart anyway.
    pub fn publish(&self, op: Op) {
        if let Some(rate) = crate::op::copy_rate(&op) {
            metrics::gauge!("mig_migration_rate_bytes_per_second").set(rate);
        }
        let mut ops = self.ops.lock().expect("op book lock");
        match ops.get(&op.id) {
            Some(tx) => {
                tx.send_if_modified(|cur| {
                    if op.version >= cur.version && *cur != op {
                        *cur = op;
                        true
                    } else {
                        false
                    }
                });
            }
            None => {
                ops.insert(op.id.clone(), watch::channel(op).0);
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<Op> {
        self.ops
            .lock()
            .expect("op book lock")
            .get(id)
            .map(|tx| tx.borrow().clone())
    }

    /// A live view of one operation, for the event stream.
    pub fn watch(&self, id: &str) -> Option<watch::Receiver<Op>> {
        self.ops
            .lock()
            .expect("op book lock")
            .get(id)
            .map(|tx| tx.subscribe())
    }

    /// Every operation still running that `role` drives here.
    pub fn running_owned_by(&self, role: Role) -> Vec<Op> {
        self.all()
            .into_iter()
            .filter(|op| op.state.is_running() && op.owner == role)
            .collect()
    }

    /// An operation still running, by whoever, as far as this instance knows.
    pub fn any_running(&self) -> Option<Op> {
        self.all().into_iter().find(|op| op.state.is_running())
    }

    pub fn all(&self) -> Vec<Op> {
        let ops = self.ops.lock().expect("op book lock");
        let mut all: Vec<Op> = ops.values().map(|tx| tx.borrow().clone()).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }
}

/// Records what changed between the last committed copy of an operation and this one: every
/// change passes through a commit, so counting here counts each event once per instance.
fn record_metrics(prev: Option<&Op>, op: &Op) {
    let kind = op.kind.as_str();
    if prev.is_none() && op.owner == Role::Source {
        metrics::counter!("mig_operations_started_total", "kind" => kind).increment(1);
    }
    let was_running = prev.is_none_or(|p| p.state == OpState::Running);
    if was_running && op.state.is_final() {
        let state = match op.state {
            OpState::Succeeded => "succeeded",
            OpState::Failed => "failed",
            OpState::RolledBack => "rolled_back",
            OpState::Running => unreachable!(),
        };
        metrics::counter!("mig_operations_ended_total", "kind" => kind, "state" => state)
            .increment(1);
        metrics::gauge!("mig_migration_rate_bytes_per_second").set(0.0);
    }
    // Steps already ended when this instance first sees the operation ended elsewhere.
    let Some(prev) = prev else { return };
    for step in op.monitors.iter().flat_map(|m| &m.steps) {
        let before = Some(prev.step(&step.name).state);
        let ended = matches!(step.state, StepState::Done | StepState::Failed);
        if !ended || before == Some(step.state) {
            continue;
        }
        if let Some(secs) = crate::op::duration(step) {
            let state = if step.state == StepState::Done {
                "done"
            } else {
                "failed"
            };
            metrics::histogram!("mig_step_duration_seconds", "step" => step.name.clone(), "state" => state)
                .record(secs);
        }
        if step.name == MIGRATING && step.state == StepState::Done {
            metrics::counter!("mig_migrated_bytes_total").increment(step.bytes_done.unwrap_or(0));
        }
    }
}
