//! A small QMP (QEMU Machine Protocol) client: one Unix socket connection,
//! one command at a time. QMP speaks one JSON object per line: a greeting,
//! then a reply (`return` or `error`) per command, with asynchronous
//! `event` messages in between, which this client skips.

use std::{
    io::IoSlice,
    os::fd::{AsRawFd, BorrowedFd},
    path::Path,
    time::Duration,
};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Interest},
    net::{
        unix::{OwnedReadHalf, OwnedWriteHalf},
        UnixStream,
    },
};

use crate::HypervisorError;

/// How long QEMU may take to answer one command. Block graph changes are
/// quick, but a TCG guest keeps the host's cores busy.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A QMP connection in command mode.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, reads QEMU's greeting and
    /// leaves capabilities negotiation for command mode.
    pub async fn connect(path: &Path) -> Result<Qmp, HypervisorError> {
        let stream =
            UnixStream::connect(path)
                .await
                .map_err(|e| HypervisorError::QmpConnection {
                    context: format!("cannot connect to {}", path.display()),
                    detail: e.to_string(),
                })?;
        let (reader, writer) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(reader),
            writer,
            next_id: 0,
        };
        let greeting = qmp.read_message("the greeting").await?;
        if greeting.get("QMP").is_none() {
            return Err(HypervisorError::QmpConnection {
                context: format!("greeting on {}", path.display()),
                detail: format!("not a QMP greeting: {greeting}"),
            });
        }
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` (a JSON object) and returns its
    /// `return` value. QEMU's refusal becomes [`HypervisorError::Qmp`],
    /// naming the command and QEMU's description.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Value,
    ) -> Result<Value, HypervisorError> {
        self.execute_passing(command, arguments, None).await
    }

    /// [`Qmp::execute`], passing `fd` to QEMU with the command (SCM_RIGHTS),
    /// for the commands that take one (`add-fd`, `getfd`).
    pub async fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Value,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, HypervisorError> {
        self.execute_passing(command, arguments, Some(fd)).await
    }

    async fn execute_passing(
        &mut self,
        command: &str,
        arguments: Value,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, HypervisorError> {
        self.next_id += 1;
        let id = self.next_id;
        let mut line = json!({ "execute": command, "arguments": arguments, "id": id }).to_string();
        line.push('\n');
        let sent = match fd {
            None => self.writer.write_all(line.as_bytes()).await,
            Some(fd) => send_with_fd(&self.writer, line.as_bytes(), fd).await,
        };
        sent.map_err(|e| HypervisorError::QmpConnection {
            context: format!("sending `{command}`"),
            detail: e.to_string(),
        })?;
        tracing::debug!(command, %arguments, "QMP command");
        loop {
            let message = self.read_message(command).await?;
            if message.get("event").is_some() {
                tracing::debug!(%message, "QMP event");
                continue;
            }
            if message.get("id").and_then(Value::as_u64) != Some(id) {
                return Err(HypervisorError::QmpConnection {
                    context: format!("reply to `{command}`"),
                    detail: format!("a reply to another command: {message}"),
                });
            }
            if let Some(error) = message.get("error") {
                let desc = error
                    .get("desc")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .unwrap_or_else(|| error.to_string());
                return Err(HypervisorError::Qmp {
                    command: command.to_owned(),
                    desc,
                });
            }
            return match message.get("return") {
                Some(value) => Ok(value.clone()),
                None => Err(HypervisorError::QmpConnection {
                    context: format!("reply to `{command}`"),
                    detail: format!("neither `return` nor `error`: {message}"),
                }),
            };
        }
    }

    /// The next message, as a JSON object.
    async fn read_message(&mut self, awaiting: &str) -> Result<Value, HypervisorError> {
        let failed = |detail: String| HypervisorError::QmpConnection {
            context: format!("awaiting {awaiting}"),
            detail,
        };
        let mut line = String::new();
        let read = tokio::time::timeout(REPLY_TIMEOUT, self.reader.read_line(&mut line))
            .await
            .map_err(|_| failed(format!("no answer from QEMU in {REPLY_TIMEOUT:?}")))?
            .map_err(|e| failed(e.to_string()))?;
        if read == 0 {
            return Err(failed("QEMU closed the connection".into()));
        }
        let message: Value = serde_json::from_str(line.trim_end())
            .map_err(|e| failed(format!("not JSON ({e}): {line:?}")))?;
        if !message.is_object() {
            return Err(failed(format!("not a JSON object: {line:?}")));
        }
        Ok(message)
    }
}

/// Sends `bytes` in one message with `fd` attached. A QMP command line is
/// short: a partial send is an error rather than a case to handle.
async fn send_with_fd(
    writer: &OwnedWriteHalf,
    bytes: &[u8],
    fd: BorrowedFd<'_>,
) -> std::io::Result<()> {
    let stream: &UnixStream = writer.as_ref();
    let fds = [fd.as_raw_fd()];
    let sent = stream
        .async_io(Interest::WRITABLE, || {
            sendmsg::<()>(
                stream.as_raw_fd(),
                &[IoSlice::new(bytes)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        })
        .await?;
    if sent != bytes.len() {
        return Err(std::io::Error::other(format!(
            "sent {sent} of {} bytes",
            bytes.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio::{io::AsyncReadExt, net::UnixListener};

    use super::*;

    /// A fake QEMU: sends the greeting, then for each command line answers
    /// with `replies` in turn (`{id}` replaced by the command's id), after
    /// an event.
    async fn fake_qemu(listener: UnixListener, replies: Vec<&'static str>) -> Vec<Value> {
        let (stream, _) = listener.accept().await.unwrap();
        let (reader, mut writer) = stream.into_split();
        let mut reader = BufReader::new(reader);
        writer
            .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
            .await
            .unwrap();
        let mut commands = Vec::new();
        for reply in replies {
            let mut line = String::new();
            reader.read_line(&mut line).await.unwrap();
            let command: Value = serde_json::from_str(&line).unwrap();
            let id = command["id"].to_string();
            commands.push(command);
            writer
                .write_all(b"{\"event\": \"RESUME\", \"timestamp\": {}}\r\n")
                .await
                .unwrap();
            writer
                .write_all(format!("{}\r\n", reply.replace("{id}", &id)).as_bytes())
                .await
                .unwrap();
        }
        // Wait for the client to hang up.
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest).await;
        commands
    }

    #[tokio::test]
    async fn negotiates_runs_commands_skips_events_and_names_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_qemu(
            listener,
            vec![
                r#"{"return": {}, "id": {id}}"#,
                r#"{"return": [{"node-name": "slot2"}], "id": {id}}"#,
                r#"{"error": {"class": "GenericError", "desc": "Could not open '/x': No such file or directory"}, "id": {id}}"#,
            ],
        ));
        let mut qmp = Qmp::connect(&path).await.unwrap();
        let nodes = qmp
            .execute("query-named-block-nodes", json!({ "flat": true }))
            .await
            .unwrap();
        assert_eq!(nodes[0]["node-name"], "slot2");
        let err = qmp
            .execute("blockdev-add", json!({ "driver": "file" }))
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "QEMU refused QMP command `blockdev-add`: Could not open '/x': No such file or \
             directory"
        );
        drop(qmp);
        let commands = server.await.unwrap();
        assert_eq!(commands[0]["execute"], "qmp_capabilities");
        assert_eq!(commands[1]["execute"], "query-named-block-nodes");
        assert_eq!(commands[1]["arguments"]["flat"], true);
        assert_eq!(commands[2]["arguments"]["driver"], "file");
    }

    #[tokio::test]
    async fn a_closed_connection_and_a_missing_socket_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let err = Qmp::connect(&path).await.err().unwrap().to_string();
        assert!(
            err.contains("cannot connect to") && err.contains("qmp.sock"),
            "{err}"
        );
        let listener = UnixListener::bind(&path).unwrap();
        // Greets, reads the command, then goes away without answering.
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut stream = BufReader::new(stream);
            stream
                .get_mut()
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .await
                .unwrap();
            let mut line = String::new();
            stream.read_line(&mut line).await.unwrap();
            assert!(line.contains("qmp_capabilities"), "{line}");
        });
        let err = Qmp::connect(&path).await.err().unwrap().to_string();
        assert!(err.contains("QEMU closed the connection"), "{err}");
        server.await.unwrap();
    }
}
