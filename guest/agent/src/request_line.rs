//! The first line of a connection from the host on a byte-stream port
//! (stdio, port-forward): read byte by byte, so that none of the stream
//! after it is consumed, and bounded.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Reads up to the newline (not included); fails past `max_len` bytes.
/// `what` names the line in errors.
pub async fn read(
    connection: &mut (impl AsyncRead + Unpin),
    max_len: usize,
    what: &str,
) -> Result<String, String> {
    let mut line = Vec::with_capacity(max_len);
    loop {
        let byte = connection
            .read_u8()
            .await
            .map_err(|e| format!("reading the {what}: {e}"))?;
        if byte == b'\n' {
            break;
        }
        if line.len() == max_len {
            return Err(format!("the {what} exceeds {max_len} bytes"));
        }
        line.push(byte);
    }
    String::from_utf8(line).map_err(|_| format!("the {what} is not UTF-8"))
}
