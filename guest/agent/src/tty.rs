//! Terminals of container processes. The OCI runtime creates the pty inside
//! the container and sends its master over a console socket the agent
//! listens on; the agent relays the master and sets its window size.

use std::{
    io::{self, IoSliceMut},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::net::UnixListener,
    },
    path::{Path, PathBuf},
};

use nix::{
    cmsg_space,
    sys::socket::{recvmsg, ControlMessageOwned, MsgFlags},
};

/// Where a process's console socket listens until the master arrives.
pub struct ConsoleSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ConsoleSocket {
    pub fn bind(path: PathBuf) -> io::Result<ConsoleSocket> {
        let listener = UnixListener::bind(&path).map_err(|e| {
            io::Error::new(e.kind(), format!("console socket {}: {e}", path.display()))
        })?;
        Ok(ConsoleSocket { listener, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pty master the runtime sent. It is sent before the runtime's
    /// create returns, so it waits in the socket's backlog: never block.
    pub fn receive_master(self) -> io::Result<OwnedFd> {
        self.listener.set_nonblocking(true)?;
        let (connection, _) = self.listener.accept().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("the OCI runtime did not connect to the console socket: {e}"),
            )
        })?;
        let mut name = [0u8; 64];
        let mut iov = [IoSliceMut::new(&mut name)];
        let mut space = cmsg_space!([std::os::fd::RawFd; 1]);
        let message = recvmsg::<()>(
            connection.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| io::Error::other(format!("receiving the pty master: {e}")))?;
        let master = message
            .cmsgs()
            .map_err(|e| io::Error::other(format!("reading the pty master message: {e}")))?
            .find_map(|cmsg| match cmsg {
                ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                _ => None,
            })
            .ok_or_else(|| io::Error::other("the console socket message carried no pty master"))?;
        // SAFETY: SCM_RIGHTS installed this descriptor in our table just
        // now and nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(master) })
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The window size the host asks for, as the kernel takes it.
pub fn window_size(width: u32, height: u32) -> Result<libc::winsize, String> {
    let cells = |value: u32, what: &str| {
        u16::try_from(value).map_err(|_| format!("terminal {what} {value} exceeds {}", u16::MAX))
    };
    Ok(libc::winsize {
        ws_col: cells(width, "width")?,
        ws_row: cells(height, "height")?,
        ws_xpixel: 0,
        ws_ypixel: 0,
    })
}

/// Sets the window size of the terminal whose master is `master`; the
/// kernel signals SIGWINCH to its foreground process group.
pub fn resize(master: &OwnedFd, size: &libc::winsize) -> io::Result<()> {
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which points
    // to a live, initialised struct for the whole call.
    let result = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, size as *const _) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use nix::{
        pty::openpty,
        sys::socket::{sendmsg, ControlMessage},
    };

    use super::*;

    #[test]
    fn window_sizes_fit_the_kernel_fields() {
        let size = window_size(120, 40).unwrap();
        assert_eq!((size.ws_col, size.ws_row), (120, 40));
        let err = window_size(70_000, 40).unwrap_err();
        assert!(err.contains("width 70000"), "{err}");
        assert!(window_size(80, 65_536).unwrap_err().contains("height"));
    }

    /// A master sent the way the OCI runtime sends it arrives, and
    /// resizing it is what the slave side sees.
    #[test]
    fn receives_a_master_and_resizes_its_terminal() {
        let scratch = tempfile::tempdir().unwrap();
        let socket = ConsoleSocket::bind(scratch.path().join("console.sock")).unwrap();
        let pty = openpty(None, None).unwrap();
        let sender = UnixStream::connect(socket.path()).unwrap();
        let fds = [pty.master.as_raw_fd()];
        sendmsg::<()>(
            sender.as_raw_fd(),
            &[io::IoSlice::new(b"/dev/ptmx")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let path = socket.path().to_owned();
        let master = socket.receive_master().unwrap();
        assert!(!path.exists(), "the socket file is removed");

        resize(&master, &window_size(100, 30).unwrap()).unwrap();
        let mut seen = window_size(0, 0).unwrap();
        // SAFETY: TIOCGWINSZ writes one winsize into `seen`.
        let result = unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut seen) };
        assert_eq!(result, 0);
        assert_eq!((seen.ws_col, seen.ws_row), (100, 30));
    }

    #[test]
    fn a_runtime_that_never_connects_is_reported() {
        let scratch = tempfile::tempdir().unwrap();
        let socket = ConsoleSocket::bind(scratch.path().join("console.sock")).unwrap();
        let err = socket.receive_master().unwrap_err();
        assert!(err.to_string().contains("did not connect"), "{err}");
    }
}
