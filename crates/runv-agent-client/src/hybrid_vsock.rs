//! Dialing a guest vsock port through a hybrid vsock Unix socket.
//!
//! Both hypervisors expose the guest's vsock to the host as one Unix socket
//! (vhost-device-vsock on the qemu path, the builtin VMM's own device
//! otherwise). A host client connects to it, writes `CONNECT <port>\n`, and
//! reads back `OK <host port>\n` once the guest accepted; from then on the
//! stream is the guest connection. When nothing listens on the guest port,
//! the backend closes the socket instead of answering.
//!
//! The other way round, a guest connection to host port `P` reaches the
//! Unix socket `<socket>_P`, where a host server listens.

use std::{
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use nix::{
    fcntl::AT_FDCWD,
    sys::stat::{fchmodat, FchmodatFlags, Mode},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
};

/// The longest reply line a backend sends (`OK 4294967295\n` is 14 bytes).
const MAX_REPLY_LEN: usize = 32;

/// Connects to guest `port` through the hybrid vsock socket at `socket`.
pub async fn connect(socket: &Path, port: u32) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(socket).await?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    let reply = read_line(&mut stream, MAX_REPLY_LEN)
        .await?
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "the guest did not accept the connection (nothing listens on the port yet)",
            )
        })?;
    if reply.starts_with("OK ") {
        Ok(stream)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("hybrid vsock answered {reply:?} to CONNECT {port}"),
        ))
    }
}

/// Listens for guest connections to host `port`, on a socket only root
/// may connect to (0600 whatever the umask).
pub fn listen(socket: &Path, port: u32) -> io::Result<UnixListener> {
    let path = listener_path(socket, port);
    let listener = UnixListener::bind(&path)?;
    // The vsock backend connects to it: where that backend runs under a
    // uid of its own (the qemu backend's), it owns the socket's directory,
    // and gets the socket too. That uid's process serves the guest, so it
    // could swap the socket for a symlink: neither call below follows one.
    fchmodat(
        AT_FDCWD,
        &path,
        Mode::S_IRUSR | Mode::S_IWUSR,
        FchmodatFlags::NoFollowSymlink,
    )?;
    let dir = path.parent().unwrap_or(Path::new("/"));
    let owner = std::fs::metadata(dir)?.uid();
    if owner != std::fs::symlink_metadata(&path)?.uid() {
        std::os::unix::fs::lchown(&path, Some(owner), None)?;
    }
    Ok(listener)
}

/// Where guest connections to host `port` arrive.
pub fn listener_path(socket: &Path, port: u32) -> PathBuf {
    let mut path = socket.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// Reads a reply line of at most `max_len` bytes, byte by byte: anything
/// after the newline already belongs to the guest connection and must stay
/// in the socket. None when the other end closed (or reset) first.
pub(crate) async fn read_line(
    stream: &mut UnixStream,
    max_len: usize,
) -> io::Result<Option<String>> {
    let mut line = Vec::with_capacity(max_len);
    loop {
        let byte = match stream.read_u8().await {
            Ok(byte) => byte,
            // A close, or a reset when our request was still unread.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        if byte == b'\n' {
            return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
        }
        if line.len() == max_len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a reply line from the guest exceeds {max_len} bytes"),
            ));
        }
        line.push(byte);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A backend on a real Unix socket that answers the handshake with
    /// `reply`, then echoes one message.
    async fn serve_once(listener: UnixListener, reply: &'static [u8]) -> String {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut request = vec![0u8; 13];
        conn.read_exact(&mut request).await.unwrap();
        conn.write_all(reply).await.unwrap();
        let mut message = [0u8; 4];
        if conn.read_exact(&mut message).await.is_ok() {
            conn.write_all(&message).await.unwrap();
        }
        String::from_utf8(request).unwrap()
    }

    #[tokio::test]
    async fn handshake_then_stream_belongs_to_guest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // The reply and the first guest bytes arrive in one write.
        let server = tokio::spawn(serve_once(listener, b"OK 1073741824\n"));
        let mut stream = connect(&path, 1024).await.unwrap();
        stream.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        stream.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"ping");
        assert_eq!(server.await.unwrap(), "CONNECT 1024\n");
    }

    #[test]
    fn guest_connections_arrive_beside_the_socket() {
        assert_eq!(
            listener_path(Path::new("/run/runv/vm1/vsock.sock"), 1025),
            Path::new("/run/runv/vm1/vsock.sock_1025")
        );
    }

    #[tokio::test]
    async fn closed_socket_means_not_listening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (conn, _) = listener.accept().await.unwrap();
            drop(conn);
        });
        let err = connect(&path, 1024).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn unexpected_reply_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(serve_once(listener, b"ERR\n"));
        let err = connect(&path, 1024).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("ERR"), "{err}");
    }
}
