//! The splice path: socket → pipe → socket, pipes pooled per thread and held only while bytes
//! sit in them; small messages go by `read` and `write` instead.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{ready, Poll};

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::unistd::pipe2;
use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::net::TcpStream;

use crate::relay::poll_write_some;

/// Splice state: bytes go socket → pipe → socket. The pipe is borrowed from the thread's pool
/// only while it holds bytes, so an idle connection holds no pipe.
///
/// Small messages skip the pipe: after the source has run dry, the next read is a plain `read`
/// into a [`SMALL_READ`] buffer on the stack, written straight on. A short read tells that the
/// socket is empty, so no further call is needed to learn it (splice cannot tell: it may stop
/// short with bytes left). A full read means a stream is flowing, and splice takes over.
pub(crate) struct SpliceState {
    pub(crate) pipe: Option<Pipe>,
    pub(crate) in_pipe: usize,
    /// Read with `read` (small messages) rather than splice; true until a read fills the buffer.
    pub(crate) probe: bool,
    /// What a probe read left unwritten (allocated only when the writer could not take it all).
    pub(crate) buf: Vec<u8>,
    pub(crate) written: usize,
    pub(crate) eof: bool,
}

impl Default for SpliceState {
    fn default() -> Self {
        SpliceState {
            pipe: None,
            in_pipe: 0,
            probe: true,
            buf: Vec::new(),
            written: 0,
            eof: false,
        }
    }
}

/// Pipe size asked of the kernel: fewer, larger splices. Unprivileged users past
/// `fs.pipe-user-pages-soft` are refused it and keep the default 64 KiB, which still works.
const PIPE_SIZE: usize = 1 << 20;
/// Empty pipes kept for reuse per thread; beyond that they are closed.
const PIPE_POOL_MAX: usize = 64;
/// Largest read that goes by `read` rather than splice; a request or an answer usually fits.
const SMALL_READ: usize = 16 * 1024;
const SPLICE_FLAGS: SpliceFFlags =
    SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
}

thread_local! {
    static PIPE_POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    static PIPES_HELD: Cell<usize> = const { Cell::new(0) };
    static BYTES_SPLICED: Cell<u64> = const { Cell::new(0) };
}

/// Bytes that connections on the calling thread moved through a pipe (the rest went by `read`
/// and `write`). For tests: streams must go by splice, small messages need not.
pub fn bytes_spliced_on_this_thread() -> u64 {
    BYTES_SPLICED.with(Cell::get)
}

/// Pipes that connections on the calling thread hold right now (each holds one only while bytes
/// sit in it). For tests and the mon terminal: idle connections must hold none.
pub fn pipes_held_on_this_thread() -> usize {
    PIPES_HELD.with(Cell::get)
}

impl Pipe {
    fn take() -> io::Result<Pipe> {
        let pipe = match PIPE_POOL.with(|p| p.borrow_mut().pop()) {
            Some(p) => p,
            None => {
                let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
                let raw = write.as_raw_fd();
                let size = match fcntl(raw, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32)) {
                    Ok(n) => n,
                    Err(_) => fcntl(raw, FcntlArg::F_GETPIPE_SZ)?,
                };
                Pipe {
                    read,
                    write,
                    size: usize::try_from(size).unwrap_or(64 * 1024),
                }
            }
        };
        PIPES_HELD.with(|n| n.set(n.get() + 1));
        Ok(pipe)
    }

    /// Returns an empty pipe to the pool. Only empty: bytes left in a pipe would surface in
    /// another connection, so a pipe with bytes in it is dropped (closed) instead.
    fn give_back(self) {
        PIPES_HELD.with(|n| n.set(n.get() - 1));
        PIPE_POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < PIPE_POOL_MAX {
                p.push(self);
            }
        });
    }
}

impl Drop for SpliceState {
    fn drop(&mut self) {
        if self.pipe.take().is_some() {
            // Dropped mid-transfer (error or cut): the pipe may hold bytes; close it.
            PIPES_HELD.with(|n| n.set(n.get() - 1));
        }
    }
}

pub(crate) enum SpliceError {
    /// No pipe could be made; the caller falls back to copying.
    NoPipe(io::Error),
    Io(io::Error),
}

/// The splice loop: socket → pipe (up to the pipe's size), pipe → socket until empty, repeat;
/// on EOF shut down the writer.
pub(crate) fn poll_splice(
    st: &mut SpliceState,
    cx: &mut std::task::Context<'_>,
    src: &mut TcpStream,
    dst: &mut TcpStream,
    count: &dyn Fn(usize),
) -> Poll<Result<(), SpliceError>> {
    loop {
        if let (Some(pipe), true) = (&st.pipe, st.in_pipe > 0) {
            ready!(dst.poll_write_ready(cx)).map_err(SpliceError::Io)?;
            let out = &*dst;
            match dst.try_io(Interest::WRITABLE, || {
                Ok(splice(
                    &pipe.read,
                    None,
                    out,
                    None,
                    st.in_pipe,
                    SPLICE_FLAGS,
                )?)
            }) {
                Ok(0) => return Poll::Ready(Err(SpliceError::Io(io::ErrorKind::WriteZero.into()))),
                Ok(n) => {
                    st.in_pipe -= n;
                    BYTES_SPLICED.with(|b| b.set(b.get() + n as u64));
                    count(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(SpliceError::Io(e))),
            }
            continue;
        }
        if let Some(pipe) = st.pipe.take() {
            pipe.give_back();
        }
        if st.written < st.buf.len() {
            ready!(poll_write_some(&st.buf, &mut st.written, cx, dst, count))
                .map_err(SpliceError::Io)?;
            if st.written == st.buf.len() {
                st.buf = Vec::new();
                st.written = 0;
            }
            continue;
        }
        if st.eof {
            ready!(Pin::new(&mut *dst).poll_shutdown(cx)).map_err(SpliceError::Io)?;
            return Poll::Ready(Ok(()));
        }
        if st.probe {
            ready!(probe_read(st, cx, src, dst, count)).map_err(SpliceError::Io)?;
            continue;
        }
        ready!(src.poll_read_ready(cx)).map_err(SpliceError::Io)?;
        let pipe = Pipe::take().map_err(SpliceError::NoPipe)?;
        let from = &*src;
        match src.try_io(Interest::READABLE, || {
            Ok(splice(
                from,
                None,
                &pipe.write,
                None,
                pipe.size,
                SPLICE_FLAGS,
            )?)
        }) {
            Ok(0) => {
                st.eof = true;
                pipe.give_back();
            }
            Ok(n) => {
                st.in_pipe = n;
                st.pipe = Some(pipe);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // The stream has paused; the next bytes may be a small message.
                st.probe = true;
                pipe.give_back();
            }
            Err(e) => {
                pipe.give_back();
                return Poll::Ready(Err(SpliceError::Io(e)));
            }
        }
    }
}

/// One `read` of up to [`SMALL_READ`] bytes, written straight to `dst`; what `dst` cannot take
/// now waits in `st.buf`. tokio's `poll_read` marks the socket not ready after a short read, so
/// the next wake-up comes from epoll rather than from a read that fails.
fn probe_read(
    st: &mut SpliceState,
    cx: &mut std::task::Context<'_>,
    src: &mut TcpStream,
    dst: &mut TcpStream,
    count: &dyn Fn(usize),
) -> Poll<io::Result<()>> {
    let mut raw = [std::mem::MaybeUninit::<u8>::uninit(); SMALL_READ];
    let mut rb = tokio::io::ReadBuf::uninit(&mut raw);
    ready!(Pin::new(&mut *src).poll_read(cx, &mut rb))?;
    let data = rb.filled();
    if data.is_empty() {
        st.eof = true;
        return Poll::Ready(Ok(()));
    }
    if data.len() == SMALL_READ {
        // A full buffer: a stream is flowing; move the rest through the pipe.
        st.probe = false;
    }
    let sent = match dst.try_write(data) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Poll::Ready(Err(e)),
    };
    if sent > 0 {
        count(sent);
    }
    if sent < data.len() {
        st.buf = data[sent..].to_vec();
        st.written = 0;
    }
    Poll::Ready(Ok(()))
}
