//! The stdio stream listener on vsock port STDIO_VSOCK_PORT: each
//! connection names its process and stream in a first line, then carries
//! that stream's bytes (see runv_protocol::stdio).

use std::{sync::Arc, time::Duration};

use runv_protocol::{
    stdio::{StreamHeader, MAX_HEADER_LEN},
    STDIO_VSOCK_PORT,
};
use tokio::io::AsyncRead;
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};

use crate::{containers::Containers, host_only, request_line};

/// A host that connects but never names its stream is dropped after this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

pub fn listen() -> std::io::Result<VsockListener> {
    VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, STDIO_VSOCK_PORT))
}

/// Attaches every incoming stream to its process.
pub async fn serve(listener: VsockListener, containers: Arc<Containers>) {
    loop {
        let mut connection = match host_only::accept(&listener).await {
            Ok(connection) => connection,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a stdio stream");
                continue;
            }
        };
        let containers = containers.clone();
        tokio::spawn(async move {
            let header =
                match tokio::time::timeout(HEADER_TIMEOUT, read_header(&mut connection)).await {
                    Ok(Ok(header)) => header,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "refused a stdio stream");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!("a stdio stream sent no header within {HEADER_TIMEOUT:?}");
                        return;
                    }
                };
            match containers.attach(&header, Box::new(connection)) {
                Ok(()) => tracing::debug!(?header, "stdio stream attached"),
                // Dropping the connection tells the host.
                Err(e) => tracing::warn!(?header, error = %e.message, "refused a stdio stream"),
            }
        });
    }
}

async fn read_header(connection: &mut (impl AsyncRead + Unpin)) -> Result<StreamHeader, String> {
    let line = request_line::read(connection, MAX_HEADER_LEN, "stdio header").await?;
    StreamHeader::parse(&line)
}

#[cfg(test)]
mod tests {
    use runv_protocol::stdio::StdioStream;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn reads_the_header_and_leaves_the_stream() {
        let (mut host, mut agent) = tokio::net::UnixStream::pair().unwrap();
        host.write_all(b"web exec-1 stdin\nfirst bytes")
            .await
            .unwrap();
        let header = read_header(&mut agent).await.unwrap();
        assert_eq!(header.container_id, "web");
        assert_eq!(header.exec_id, "exec-1");
        assert_eq!(header.stream, StdioStream::Stdin);
        let mut rest = [0; 11];
        agent.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"first bytes");
    }

    #[tokio::test]
    async fn refuses_overlong_and_truncated_headers() {
        let (mut host, mut agent) = tokio::net::UnixStream::pair().unwrap();
        host.write_all(&[b'a'; MAX_HEADER_LEN + 1]).await.unwrap();
        let err = read_header(&mut agent).await.unwrap_err();
        assert!(err.contains("exceeds"), "{err}");

        let (mut host, mut agent) = tokio::net::UnixStream::pair().unwrap();
        host.write_all(b"web - std").await.unwrap();
        drop(host);
        let err = read_header(&mut agent).await.unwrap_err();
        assert!(err.contains("reading the stdio header"), "{err}");
    }
}
