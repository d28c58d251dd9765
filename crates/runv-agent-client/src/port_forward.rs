//! Port-forwarding into the guest: one guest vsock connection per TCP
//! connection, to the agent's port-forward port (see
//! `runv_protocol::PORT_FORWARD_VSOCK_PORT`).

use std::{io, path::Path, time::Duration};

use runv_protocol::{
    port_forward::{parse_reply, request_line, MAX_REPLY_LEN},
    PORT_FORWARD_VSOCK_PORT,
};
use tokio::{io::AsyncWriteExt, net::UnixStream};

use crate::hybrid_vsock;

/// How long the agent may take to connect and answer: it tries the
/// loopback and then each of the guest's addresses. A guest that never
/// answers costs the host one idle connection for this long, no more.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects to TCP `port` in the guest through the VM's hybrid vsock
/// `socket`: once this returns, the stream carries that TCP connection's
/// bytes. An error says why the guest could not connect.
pub async fn open(socket: &Path, port: u16) -> io::Result<UnixStream> {
    let mut connection = hybrid_vsock::connect(socket, PORT_FORWARD_VSOCK_PORT).await?;
    connection.write_all(request_line(port).as_bytes()).await?;
    let reply = tokio::time::timeout(
        REPLY_TIMEOUT,
        hybrid_vsock::read_line(&mut connection, MAX_REPLY_LEN),
    )
    .await
    .map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the agent did not answer a port-forward within {REPLY_TIMEOUT:?}"),
        )
    })??
    .ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the agent closed the port-forward connection without answering",
        )
    })?;
    parse_reply(&reply)
        .map(|()| connection)
        .map_err(|why| io::Error::new(io::ErrorKind::ConnectionRefused, why))
}
