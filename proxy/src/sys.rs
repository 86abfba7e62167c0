//! The two socket options the sockmap path needs that neither `nix` nor `socket2` wraps.
//!
//! This is the crate's only `unsafe`: `getsockopt`/`setsockopt` through `libc` on a descriptor
//! that the borrowed socket keeps open for the call, with buffers whose size is passed along.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;

/// Offset of `tcpi_bytes_acked` in the kernel's `struct tcp_info` (since Linux 4.1); stable ABI.
const BYTES_ACKED_OFFSET: usize = 120;

/// What the sockmap path reads of a socket's `TCP_INFO`.
pub(crate) struct TcpInfo {
    /// `tcpi_state`: 1 is ESTABLISHED, the only state (bar LISTEN) a socket map takes.
    pub(crate) established: bool,
    /// `tcpi_bytes_acked`: bytes of data sent that the remote end has acknowledged.
    pub(crate) bytes_acked: u64,
}

pub(crate) fn tcp_info(socket: &impl AsRawFd) -> io::Result<TcpInfo> {
    // u64s keep the buffer aligned for the kernel's 8-byte fields.
    let mut info = [0u64; 32];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes and the descriptor is open while `socket` is
    // borrowed; the kernel writes at most `len` bytes and updates `len`.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < BYTES_ACKED_OFFSET + 8 {
        return Err(io::Error::other(
            "the kernel's tcp_info has no tcpi_bytes_acked",
        ));
    }
    Ok(TcpInfo {
        // tcpi_state is the first byte.
        established: info[0].to_ne_bytes()[0] == 1,
        bytes_acked: info[BYTES_ACKED_OFFSET / 8],
    })
}

/// Sets `SO_RCVLOWAT` to 1 (the default). TCP re-checks its receive queue on this option and
/// calls the socket's data-ready hook when bytes wait there, which makes the sockmap verdict take
/// bytes that arrived before the socket entered the map.
pub(crate) fn kick_receive(socket: &impl AsRawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `one` is readable for the size passed; the descriptor is open while borrowed.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
