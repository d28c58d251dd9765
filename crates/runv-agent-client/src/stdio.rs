//! A process's standard streams: one guest vsock connection per stream, to
//! the agent's stdio port, opened with a one-line header that names the
//! process and the stream (see `runv_protocol::STDIO_VSOCK_PORT`).

use std::{io, path::Path};

use runv_protocol::{
    stdio::{StdioStream, StreamHeader},
    STDIO_VSOCK_PORT,
};
use tokio::{io::AsyncWriteExt, net::UnixStream};

use crate::hybrid_vsock;

/// Opens `stream` of process `exec_id` (empty for the init process) of
/// `container_id` through the VM's hybrid vsock `socket`. The process must
/// have been created (CreateContainer or ExecProcess) and not started yet.
pub async fn open_stream(
    socket: &Path,
    container_id: &str,
    exec_id: &str,
    stream: StdioStream,
) -> io::Result<UnixStream> {
    let header = StreamHeader {
        container_id: container_id.to_owned(),
        exec_id: exec_id.to_owned(),
        stream,
    };
    let mut connection = hybrid_vsock::connect(socket, STDIO_VSOCK_PORT).await?;
    connection.write_all(header.to_line().as_bytes()).await?;
    Ok(connection)
}
