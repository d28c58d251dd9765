//! The host side of the hybrid vsock: Unix sockets.
//!
//! Host clients connect to the device's socket and ask for a guest port
//! with a `CONNECT <port>\n` line; guest connections to host port `P` go to
//! the Unix socket `<path>_P`. This is the protocol of Firecracker's and
//! vhost-device-vsock's hybrid vsock, which `runv-agent-client` speaks.

use std::{
    io::{self, Read},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::FileTypeExt, net::UnixListener, net::UnixStream},
    },
    path::{Path, PathBuf},
};

/// The longest `CONNECT <port>\n` line a client may send.
const MAX_CONNECT_LINE: usize = 32;

/// The listening socket host clients connect to; the socket file goes away
/// with it.
pub struct HostListener {
    listener: UnixListener,
    path: PathBuf,
}

impl HostListener {
    /// Listens at `path`, replacing a stale socket file a previous VM left.
    pub fn bind(path: &Path) -> io::Result<HostListener> {
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(HostListener {
            listener,
            path: path.to_owned(),
        })
    }

    /// The next waiting client, non-blocking; `None` when none waits.
    pub fn accept(&self) -> io::Result<Option<UnixStream>> {
        match self.listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(true)?;
                Ok(Some(stream))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl AsRawFd for HostListener {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::debug!(path = %self.path.display(), error = %e, "cannot remove the vsock socket");
        }
    }
}

/// Where a host client's handshake stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    /// The line is not complete yet.
    Pending,
    /// The client asked for this guest port.
    Connect(u32),
    /// The client closed, sent something else, or the socket failed.
    Failed(String),
}

/// A freshly accepted client reading its `CONNECT <port>\n` line.
pub struct PendingClient {
    stream: UnixStream,
    line: Vec<u8>,
}

impl PendingClient {
    pub fn new(stream: UnixStream) -> PendingClient {
        PendingClient {
            stream,
            line: Vec::with_capacity(MAX_CONNECT_LINE),
        }
    }

    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Reads what the client sent so far. Byte by byte: whatever follows the
    /// newline belongs to the guest connection and must stay in the socket.
    pub fn read_request(&mut self) -> Handshake {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return Handshake::Failed("closed before CONNECT".into()),
                Ok(_) if byte[0] == b'\n' => return parse_connect(&self.line),
                Ok(_) if self.line.len() == MAX_CONNECT_LINE => {
                    return Handshake::Failed("CONNECT line too long".into())
                }
                Ok(_) => self.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Handshake::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Handshake::Failed(e.to_string()),
            }
        }
    }
}

impl AsRawFd for PendingClient {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.stream.as_raw_fd()
    }
}

fn parse_connect(line: &[u8]) -> Handshake {
    let port = std::str::from_utf8(line)
        .ok()
        .and_then(|line| line.strip_prefix("CONNECT "))
        .and_then(|port| port.trim_end_matches('\r').parse::<u32>().ok());
    match port {
        Some(port) => Handshake::Connect(port),
        None => Handshake::Failed(format!(
            "expected CONNECT <port>, got {:?}",
            String::from_utf8_lossy(line)
        )),
    }
}

/// The line that tells a host client its connection is up.
pub fn connect_reply(local_port: u32) -> String {
    format!("OK {local_port}\n")
}

/// Where guest connections to host `port` go.
pub fn guest_listener_path(socket: &Path, port: u32) -> PathBuf {
    let mut path = socket.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// Connects to a host server without blocking: a server whose backlog is
/// full must not stall the VM's event loop, so that counts as a refusal.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain data; all zeros is a valid value.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= address.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (slot, byte) in address.sun_path.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: plain socket creation; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: address is a valid sockaddr_un and the length passed is its size.
    let result = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            std::ptr::addr_of!(address).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(socket))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn connect_lines_are_parsed_strictly() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Handshake::Connect(1024));
        assert_eq!(parse_connect(b"CONNECT 7\r"), Handshake::Connect(7));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT -1",
            b"connect 5",
            b"CONNECT 99999999999",
        ] {
            assert!(
                matches!(parse_connect(bad), Handshake::Failed(_)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_request_is_read_up_to_its_newline_only() {
        let (mut client, server) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut pending = PendingClient::new(server);
        client.write_all(b"CONNECT 10").unwrap();
        assert_eq!(pending.read_request(), Handshake::Pending);
        client.write_all(b"24\nrest").unwrap();
        assert_eq!(pending.read_request(), Handshake::Connect(1024));
        let mut rest = [0u8; 4];
        pending.into_stream().read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"rest");

        let (mut client, server) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut pending = PendingClient::new(server);
        client.write_all(&[b'x'; MAX_CONNECT_LINE + 1]).unwrap();
        assert!(matches!(pending.read_request(), Handshake::Failed(_)));
        drop(client);
        let (client, server) = UnixStream::pair().unwrap();
        drop(client);
        assert!(matches!(
            PendingClient::new(server).read_request(),
            Handshake::Failed(_)
        ));
    }

    #[test]
    fn listener_replaces_stale_sockets_and_removes_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let stale = UnixListener::bind(&path).unwrap();
        drop(stale);
        let listener = HostListener::bind(&path).unwrap();
        assert!(listener.accept().unwrap().is_none());
        let _client = UnixStream::connect(&path).unwrap();
        assert!(listener.accept().unwrap().is_some());
        drop(listener);
        assert!(!path.exists());
    }

    #[test]
    fn nonblocking_connect_reaches_listeners_and_reports_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vsock.sock");
        let path = guest_listener_path(&socket, 1025);
        assert_eq!(path, dir.path().join("vsock.sock_1025"));
        assert!(connect_nonblocking(&path).is_err());
        let listener = UnixListener::bind(&path).unwrap();
        let mut stream = connect_nonblocking(&path).unwrap();
        stream.write_all(b"READY").unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        let mut ready = [0u8; 5];
        accepted.read_exact(&mut ready).unwrap();
        assert_eq!(&ready, b"READY");
        assert_eq!(connect_reply(1 << 30), "OK 1073741824\n");
    }
}
