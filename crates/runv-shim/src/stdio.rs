//! A process's standard I/O between containerd and the guest: containerd
//! names FIFOs (or, for output, `file://` and `binary://` log URIs), the
//! guest offers one vsock stream per stream, and the shim copies between
//! them with fixed-size buffers.

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
    process::Stdio as ChildStdio,
};

use runv_agent_client::stdio::open_stream;
use runv_protocol::{agent, stdio::StdioStream};
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    net::{unix::pipe, UnixStream},
    sync::oneshot,
    task::JoinHandle,
};

/// What containerd asked for a process's stdio, as in its requests.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioPaths {
    /// The streams the guest must offer: a terminal carries stdout and
    /// stderr together.
    pub fn guest_stdio(&self) -> agent::Stdio {
        agent::Stdio {
            terminal: self.terminal,
            stdin: !self.stdin.is_empty(),
            stdout: !self.stdout.is_empty(),
            stderr: !self.terminal && !self.stderr.is_empty(),
            ..Default::default()
        }
    }
}

/// Which process the streams belong to.
pub struct ProcessRef<'a> {
    pub namespace: &'a str,
    pub container_id: &'a str,
    /// Empty for the init process.
    pub exec_id: &'a str,
}

/// The running copies of one process's streams.
pub struct ProcessIo {
    pub stdin: StdinCloser,
    pub outputs: OutputCopies,
}

/// Ends the copy to the process's stdin.
#[derive(Default)]
pub struct StdinCloser(Option<oneshot::Sender<()>>);

/// The copies of the process's stdout and stderr to containerd.
#[derive(Default)]
pub struct OutputCopies(Vec<JoinHandle<()>>);

type Output = Box<dyn AsyncWrite + Send + Unpin>;

/// Opens containerd's side of `paths` and the guest's streams through the
/// VM's hybrid vsock `socket`, and starts copying. Call it after the
/// process is created and before it is started.
pub async fn attach(
    socket: &Path,
    process: &ProcessRef<'_>,
    paths: &StdioPaths,
) -> Result<ProcessIo, String> {
    let wanted = paths.guest_stdio();
    let (stdout, stderr) = open_outputs(process, paths, wanted.stderr).await?;
    let stdin = match wanted.stdin {
        true => Some(
            pipe::OpenOptions::new()
                // Holding a write end too: the FIFO gives no end-of-file
                // before containerd opens it; CloseIO ends stdin instead.
                .read_write(true)
                .open_receiver(&paths.stdin)
                .map_err(|e| format!("cannot open stdin FIFO {}: {e}", paths.stdin))?,
        ),
        false => None,
    };
    let guest = |stream| async move {
        open_stream(socket, process.container_id, process.exec_id, stream)
            .await
            .map_err(|e| format!("cannot open the guest's {stream} stream: {e}"))
    };
    let mut io = ProcessIo {
        stdin: StdinCloser::default(),
        outputs: OutputCopies::default(),
    };
    if let Some(fifo) = stdin {
        let (close, closed) = oneshot::channel();
        io.stdin = StdinCloser(Some(close));
        tokio::spawn(copy_stdin(fifo, guest(StdioStream::Stdin).await?, closed));
    }
    for (output, stream) in [(stdout, StdioStream::Stdout), (stderr, StdioStream::Stderr)] {
        if let Some(output) = output {
            let from_guest = guest(stream).await?;
            io.outputs
                .0
                .push(tokio::spawn(copy_output(from_guest, output, stream)));
        }
    }
    Ok(io)
}

impl StdinCloser {
    /// Ends the process's stdin (containerd's CloseIO): the guest stream is
    /// half-closed, which the process reads as end-of-file.
    pub fn close(&mut self) {
        if let Some(close) = self.0.take() {
            let _ = close.send(());
        }
    }
}

impl OutputCopies {
    /// Waits until everything the process wrote has reached containerd:
    /// the agent closes a stream once the process's output is all sent.
    pub async fn drained(mut self) {
        for output in self.0.drain(..) {
            let _ = output.await;
        }
    }
}

impl Drop for OutputCopies {
    fn drop(&mut self) {
        for output in &self.0 {
            output.abort();
        }
    }
}

async fn copy_stdin(
    mut fifo: pipe::Receiver,
    mut guest: UnixStream,
    closed: oneshot::Receiver<()>,
) {
    tokio::select! {
        copied = tokio::io::copy(&mut fifo, &mut guest) => {
            if let Err(e) = copied {
                tracing::debug!(error = %e, "stdin copy ended");
            }
        }
        _ = closed => {}
    }
    let _ = guest.shutdown().await;
}

async fn copy_output(mut guest: UnixStream, mut output: Output, stream: StdioStream) {
    if let Err(e) = tokio::io::copy(&mut guest, &mut output).await {
        tracing::warn!(%stream, error = %e, "output copy failed");
    }
    let _ = output.shutdown().await;
}

/// containerd's side of stdout and stderr (stderr only when the guest has
/// a separate one).
async fn open_outputs(
    process: &ProcessRef<'_>,
    paths: &StdioPaths,
    want_stderr: bool,
) -> Result<(Option<Output>, Option<Output>), String> {
    if let Some(uri) = paths.stdout.strip_prefix("binary://") {
        let (stdout, stderr) = start_logger(uri, process).await?;
        return Ok((Some(stdout), want_stderr.then_some(stderr)));
    }
    let stdout = match paths.stdout.is_empty() {
        true => None,
        false => Some(open_output(&paths.stdout).await?),
    };
    let stderr = match want_stderr {
        true => Some(open_output(&paths.stderr).await?),
        false => None,
    };
    Ok((stdout, stderr))
}

/// A FIFO path or a `file://` URI.
async fn open_output(target: &str) -> Result<Output, String> {
    if let Some(path) = target.strip_prefix("file://") {
        if let Some(dir) = Path::new(path).parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| format!("cannot create the log directory {}: {e}", dir.display()))?;
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map_err(|e| format!("cannot open log file {path}: {e}"))?;
        return Ok(Box::new(file));
    }
    let fifo = pipe::OpenOptions::new()
        // Holding a read end too, as runc's shim does: no error while
        // containerd has not opened the FIFO yet.
        .read_write(true)
        .open_sender(target)
        .map_err(|e| format!("cannot open output FIFO {target}: {e}"))?;
    Ok(Box::new(fifo))
}

/// Starts a `binary://` logger as containerd's runc shim does: the
/// process's stdout on fd 3, its stderr on fd 4, and fd 5 closed by the
/// logger once it is ready; arguments from the URI's query, and only
/// CONTAINER_ID and CONTAINER_NAMESPACE in its environment.
async fn start_logger(uri: &str, process: &ProcessRef<'_>) -> Result<(Output, Output), String> {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let failed = |e: io::Error| format!("cannot start the logging binary {path}: {e}");
    let (stdout_read, stdout_write) = cloexec_pipe().map_err(failed)?;
    let (stderr_read, stderr_write) = cloexec_pipe().map_err(failed)?;
    let (ready_read, ready_write) = cloexec_pipe().map_err(failed)?;
    let mut command = tokio::process::Command::new(percent_decode(path));
    command
        .args(query_args(query))
        .env_clear()
        .env("CONTAINER_ID", process.container_id)
        .env("CONTAINER_NAMESPACE", process.namespace)
        .stdin(ChildStdio::null())
        .stdout(ChildStdio::null())
        .stderr(ChildStdio::null());
    let inherited = [
        stdout_read.as_raw_fd(),
        stderr_read.as_raw_fd(),
        ready_write.as_raw_fd(),
    ];
    // SAFETY: between fork and exec the closure only calls dup2, which is
    // async-signal-safe; the fds it duplicates stay open in the parent
    // until the child is spawned.
    unsafe {
        command.pre_exec(move || {
            for (target, fd) in (3..).zip(inherited) {
                if libc::dup2(fd, target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(failed)?;
    drop((stdout_read, stderr_read, ready_write));
    // The logger closes (or writes to) fd 5 when it is ready; EOF here.
    let mut ready = tokio::fs::File::from_std(std::fs::File::from(ready_read));
    let mut byte = [0u8; 1];
    tokio::io::AsyncReadExt::read(&mut ready, &mut byte)
        .await
        .map_err(failed)?;
    tokio::spawn(async move {
        if let Ok(status) = child.wait().await {
            tracing::info!(%status, "logging binary ended");
        }
    });
    Ok((pipe_writer(stdout_write)?, pipe_writer(stderr_write)?))
}

/// A pipe whose ends the logger does not inherit: it gets only the
/// duplicates on fds 3 to 5, so closing ours gives it end-of-file.
fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

fn pipe_writer(fd: OwnedFd) -> Result<Output, String> {
    pipe::Sender::from_owned_fd(fd)
        .map(|sender| Box::new(sender) as Output)
        .map_err(|e| format!("cannot use the logger pipe: {e}"))
}

/// `a=1&b` → `["a", "1", "b"]`, as containerd passes a query to a logger.
fn query_args(query: &str) -> Vec<String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .flat_map(|pair| match pair.split_once('=') {
            Some((key, value)) => vec![percent_decode(key), percent_decode(value)],
            None => vec![percent_decode(pair)],
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).filter(|_| bytes[i] == b'%');
        match hex.and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminal_has_no_stderr_stream() {
        let paths = StdioPaths {
            stdin: "/fifo/in".into(),
            stdout: "/fifo/out".into(),
            stderr: "/fifo/err".into(),
            terminal: true,
        };
        let stdio = paths.guest_stdio();
        assert!(stdio.terminal && stdio.stdin && stdio.stdout && !stdio.stderr);
        let none = StdioPaths::default().guest_stdio();
        assert!(!none.stdin && !none.stdout && !none.stderr);
    }

    #[test]
    fn logger_arguments_come_from_the_query() {
        assert_eq!(
            query_args("a=1&flag&path=%2Fvar%2Flog"),
            ["a", "1", "flag", "path", "/var/log"]
        );
        assert!(query_args("").is_empty());
    }

    #[tokio::test]
    async fn file_uris_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/out.log");
        for line in ["one\n", "two\n"] {
            let mut output = open_output(&format!("file://{}", path.display()))
                .await
                .unwrap();
            output.write_all(line.as_bytes()).await.unwrap();
            output.shutdown().await.unwrap();
        }
        assert_eq!(std::fs::read_to_string(path).unwrap(), "one\ntwo\n");
    }

    #[tokio::test]
    async fn binary_loggers_get_both_streams() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let script = dir.path().join("logger");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nexec 5>&-\ncat <&3 > {0}.out & cat <&4 > {0}.err\nwait\necho \"$CONTAINER_ID $1 $2\" > {0}.env\n",
                log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let process = ProcessRef {
            namespace: "default",
            container_id: "c1",
            exec_id: "",
        };
        let (mut out, mut err) = start_logger(&format!("{}?k=v", script.display()), &process)
            .await
            .unwrap();
        out.write_all(b"to stdout").await.unwrap();
        err.write_all(b"to stderr").await.unwrap();
        drop((out, err));
        let env = log.with_extension("env");
        for _ in 0..100 {
            if env.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(
            std::fs::read_to_string(log.with_extension("out")).unwrap(),
            "to stdout"
        );
        assert_eq!(
            std::fs::read_to_string(log.with_extension("err")).unwrap(),
            "to stderr"
        );
        assert_eq!(std::fs::read_to_string(env).unwrap(), "c1 k v\n");
    }
}
