//! The op book: what one instance knows of every operation it took part in.
//!
//! Writes go to the journal first (durable), then to the in-memory copy that status reads and the
//! live event streams watch. An older copy (lower `version`) never replaces a newer one, so a late
//! or replayed write cannot move an operation backwards.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};

use crate::journal::{Journal, JournalError};
use crate::op::{Op, OpState, Role, StepState, MIGRATING};

#[derive(Clone)]
pub struct OpBook {
    journal: Journal,
    ops: Arc<Mutex<HashMap<String, watch::Sender<Op>>>>,
    /// One commit at a time: saves of an operation share its temporary file, and the check that a
    /// copy is not older than the book's must hold until its write is done.
    writing: Arc<Mutex<()>>,
    /// Told of each operation that starts or ends here, after the commit that did it.
    listeners: Arc<Mutex<Vec<mpsc::UnboundedSender<Lifecycle>>>>,
}

/// An operation started by this instance, or ended by it: what webhooks announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleEvent {
    Started,
    Ended,
}

impl LifecycleEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleEvent::Started => "started",
            LifecycleEvent::Ended => "ended",
        }
    }

    /// What the commit of `op` over `prev` (the book's copy before it) means, if anything. The
    /// same rule as the started and ended counters: each event once per instance.
    pub fn of(prev: Option<&Op>, op: &Op) -> Option<LifecycleEvent> {
        if prev.is_none() && op.owner == Role::Source && op.state.is_running() {
            return Some(LifecycleEvent::Started);
        }
        let was_running = prev.is_none_or(|p| p.state.is_running());
        (was_running && op.state.is_final()).then_some(LifecycleEvent::Ended)
    }
}

/// One [`LifecycleEvent`] with the operation as committed.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    pub event: LifecycleEvent,
    pub op: Op,
}

impl OpBook {
    /// Opens the book on `journal`, loading every operation already recorded.
    pub fn open(journal: Journal) -> Result<OpBook, JournalError> {
        let book = OpBook {
            journal,
            ops: Arc::default(),
            writing: Arc::default(),
            listeners: Arc::default(),
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
    /// A copy older than the book's (a lower `version`, from a task that fell behind) changes
    /// nothing, on disk as in memory, so a restart never resumes from a step already passed.
    pub fn commit(&self, op: &Op) -> Result<(), JournalError> {
        let _one_writer = self.writing.lock().expect("journal writer lock");
        let prev = self.get(&op.id);
        if let Some(cur) = prev.as_ref().filter(|cur| cur.version > op.version) {
            tracing::warn!(
                op_id = %op.id,
                stale = op.version,
                current = cur.version,
                "not journalling an older copy of the operation"
            );
            return Ok(());
        }
        self.journal.save(op)?;
        record_metrics(prev.as_ref(), op);
        if let Some(event) = LifecycleEvent::of(prev.as_ref(), op) {
            // Unbounded and never awaited: a listener (a slow webhook) cannot hold a commit.
            let told = Lifecycle {
                event,
                op: op.clone(),
            };
            self.listeners
                .lock()
                .expect("listeners lock")
                .retain(|l| l.send(told.clone()).is_ok());
        }
        self.publish(op.clone());
        Ok(())
    }

    /// Every operation that starts or ends here from now on, as its commit journals it.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<Lifecycle> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.listeners.lock().expect("listeners lock").push(tx);
        rx
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
            OpState::Cancelled => "cancelled",
            OpState::Running => unreachable!(),
        };
        metrics::counter!("mig_operations_ended_total", "kind" => kind, "state" => state)
            .increment(1);
        metrics::gauge!("mig_migration_rate_bytes_per_second").set(0.0);
    }
    // Steps already ended when this instance first sees the operation ended elsewhere.
    let Some(prev) = prev else { return };
    for step in op.monitors.iter().flat_map(|m| &m.steps) {
        let before = Some(prev.step(step.name).state);
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
            metrics::histogram!("mig_step_duration_seconds", "step" => step.name.as_str(), "state" => state)
                .record(secs);
        }
        if step.name == MIGRATING && step.state == StepState::Done {
            metrics::counter!("mig_migrated_bytes_total").increment(step.bytes_done.unwrap_or(0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_copy_changes_neither_the_journal_nor_the_book() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let book = OpBook::open(journal.clone()).unwrap();
        let mut op = crate::op::tests::sample_op();
        book.commit(&op).unwrap();
        let old = op.clone();
        op.start_step(crate::op::PROVISIONING_HELPER);
        assert!(op.version > old.version);
        book.commit(&op).unwrap();
        book.commit(&old).unwrap();
        assert_eq!(book.get(&op.id).unwrap(), op);
        assert_eq!(journal.load(&op.id).unwrap().unwrap(), op);
        // Reopened, as after a restart: the newer copy.
        let again = OpBook::open(Journal::open(dir.path()).unwrap()).unwrap();
        assert_eq!(again.get(&op.id).unwrap(), op);
    }

    #[test]
    fn listeners_hear_of_a_start_and_an_end_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let book = OpBook::open(Journal::open(dir.path()).unwrap()).unwrap();
        let mut rx = book.subscribe();
        let mut op = crate::op::tests::sample_op();
        book.commit(&op).unwrap();
        op.start_step(crate::op::PROVISIONING_HELPER);
        book.commit(&op).unwrap();
        op.end(OpState::RolledBack, Some("x".into()));
        book.commit(&op).unwrap();
        op.version += 1;
        book.commit(&op).unwrap();
        let got: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|l| (l.event, l.op.state))
            .collect();
        assert_eq!(
            got,
            [
                (LifecycleEvent::Started, OpState::Running),
                (LifecycleEvent::Ended, OpState::RolledBack)
            ]
        );
    }

    #[test]
    fn commits_from_many_threads_leave_the_newest_copy_whole() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let book = OpBook::open(journal.clone()).unwrap();
        let op = crate::op::tests::sample_op();
        let copies: Vec<Op> = (0..16)
            .scan(op, |op, i| {
                op.trace("command", format!("app list #{i}"), Some(1), None);
                op.version += 1;
                Some(op.clone())
            })
            .collect();
        let newest = copies.last().unwrap().clone();
        std::thread::scope(|s| {
            for chunk in copies.chunks(4) {
                let book = book.clone();
                s.spawn(move || {
                    for c in chunk.iter().rev() {
                        book.commit(c).unwrap();
                    }
                });
            }
        });
        assert_eq!(book.get(&newest.id).unwrap(), newest);
        assert_eq!(journal.load(&newest.id).unwrap().unwrap(), newest);
    }
}
