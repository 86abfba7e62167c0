//! The daemon's protocol on `STATE/daemon.sock`: one JSON request per line, one JSON reply per
//! line. Export and import leases last as long as the connection that took them.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::AppRecord;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Ping,
    /// A dialect command line, already validated by the caller (and parsed again here).
    Command {
        line: String,
    },
    /// Holds `app` stopped and undestroyable until the connection closes.
    ExportBegin {
        app: String,
        /// The pre-copy (`peer export --stage`): the application may run meanwhile; the lease
        /// still keeps it from being destroyed while it is read.
        #[serde(default)]
        live: bool,
    },
    /// Reserves `name` and creates its directory; removed unless committed on this connection.
    ImportBegin {
        name: String,
    },
    ImportCommit {
        record: AppRecord,
    },
    ImportAbort,
    /// Holds the staged copy `name` (no start, no destroy) for its final pull until the
    /// connection closes; answered with [`Reply::Export`] (its record and directory).
    StageBegin {
        name: String,
    },
    /// Turns the staged copy held on this connection into the stopped application `record`.
    StageCommit {
        record: AppRecord,
    },
    /// Stops every application (state `stopped`) and exits: `lab down`.
    Shutdown,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    /// Exit code (0 ok, 1 failed, 2 refused) and what to print.
    Done {
        code: i32,
        stdout: String,
        stderr: String,
    },
    Export {
        record: AppRecord,
        app_dir: PathBuf,
    },
    Import {
        app_dir: PathBuf,
    },
}

impl Reply {
    pub fn ok(stdout: impl Into<String>) -> Reply {
        Reply::Done {
            code: 0,
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }
    pub fn fail(code: i32, stderr: impl Into<String>) -> Reply {
        Reply::Done {
            code,
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }
}

pub fn socket_path(state: &Path) -> PathBuf {
    state.join("daemon.sock")
}

/// A blocking connection to a grid's daemon.
pub struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Conn {
    pub fn connect(state: &Path) -> std::io::Result<Conn> {
        let s = UnixStream::connect(socket_path(state))?;
        Ok(Conn {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    pub fn call(&mut self, req: &Request) -> std::io::Result<Reply> {
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        let mut resp = String::new();
        if self.reader.read_line(&mut resp)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the grid daemon closed the connection",
            ));
        }
        Ok(serde_json::from_str(&resp)?)
    }
}
