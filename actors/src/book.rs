//! The op book: what one instance knows of every operation it took part in.
//!
//! Writes go to the journal first (durable), then to the in-memory copy that status reads and the
//! live event streams watch. An older copy (lower `version`) never replaces a newer one, so a late
//! or replayed write cannot move an operation backwards.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::journal::{Journal, JournalError};
use crate::op::{Op, Role};

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
        self.publish(op.clone());
        Ok(())
    }

    /// Makes `op` visible without journalling it: for progress figures, which are not worth an
    /// fsync each and are recomputed after a restart anyway.
    pub fn publish(&self, op: Op) {
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
