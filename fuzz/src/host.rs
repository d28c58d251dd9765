//! Host-side peers of the devices under fuzzing: non-blocking sockets
//! that send what the input says and swallow whatever arrives, so that
//! no device ever waits on a full socket.

use std::{
    io::{ErrorKind, Read, Write},
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::net::UnixStream,
    },
};

/// A connected pair of non-blocking seqpacket sockets: one message per
/// frame, like a tap.
pub fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are new and ours alone.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Writes what fits of `bytes` (a full socket drops the rest).
pub fn send(stream: &mut impl Write, bytes: &[u8]) {
    let _ = stream.write(bytes);
}

/// Reads and drops everything `stream` has now.
pub fn drain(stream: &mut UnixStream) {
    let mut scratch = [0u8; 4096];
    loop {
        match stream.read(&mut scratch) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}
