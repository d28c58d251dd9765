//! A container process's standard streams: the descriptors its runtime
//! hands it (pipes, or a terminal), the host's stream connections attached
//! to them, and the copying between the two.
//!
//! Copies go through one fixed buffer per stream: a process that writes
//! faster than the host reads is held back by the pipe, not buffered here.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, OwnedFd},
    sync::Mutex,
    time::Duration,
};

use nix::{
    fcntl::{fcntl, FcntlArg, OFlag},
    unistd::{dup, pipe2},
};
use runv_protocol::{agent, stdio::StdioStream};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::unix::pipe,
    sync::{watch, Notify},
};

/// A host stream connection (vsock in the guest; any socket in tests).
pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Connection for T {}

/// The size of each stream's copy buffer, and so of the largest write to a
/// vsock stream. Kept well under 32 KiB: above that the guest kernel (6.12
/// with the nonlinear-skb change, as Debian ships it) splits a packet's
/// payload over several descriptors, which vhost-device-vsock 0.3.0 does
/// not handle, and the stream stalls for good.
const COPY_BUFFER: usize = 16 * 1024;

/// The end-of-file character of a terminal in canonical mode: how a
/// terminal's reader learns that stdin is closed.
const TERMINAL_EOF: u8 = 0x04;

/// Which streams a process has, as attached by the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Streams {
    pub terminal: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

impl Streams {
    /// A terminal carries stdin and stdout; there is no stderr stream.
    pub fn from_request(stdio: &agent::Stdio) -> Streams {
        Streams {
            terminal: stdio.terminal,
            stdin: stdio.stdin,
            stdout: stdio.stdout,
            stderr: stdio.stderr && !stdio.terminal,
        }
    }

    fn wants(&self, stream: StdioStream) -> bool {
        match stream {
            StdioStream::Stdin => self.stdin,
            StdioStream::Stdout => self.stdout,
            StdioStream::Stderr => self.stderr,
        }
    }
}

/// The descriptors a process without a terminal gets as 0, 1 and 2:
/// pipes for the streams it has, /dev/null for the others.
pub struct ChildPipes {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// The agent's ends of a process's stdio.
enum AgentEnds {
    Pipes {
        stdin: Option<OwnedFd>,
        stdout: Option<OwnedFd>,
        stderr: Option<OwnedFd>,
    },
    Terminal(OwnedFd),
}

#[derive(Default)]
struct Attached {
    stdin: Option<Box<dyn Connection>>,
    stdout: Option<Box<dyn Connection>>,
    stderr: Option<Box<dyn Connection>>,
}

impl Attached {
    fn slot(&mut self, stream: StdioStream) -> &mut Option<Box<dyn Connection>> {
        match stream {
            StdioStream::Stdin => &mut self.stdin,
            StdioStream::Stdout => &mut self.stdout,
            StdioStream::Stderr => &mut self.stderr,
        }
    }
}

pub struct ProcessIo {
    streams: Streams,
    attached: Mutex<Attached>,
    attach_changed: Notify,
    ends: Mutex<Option<AgentEnds>>,
    /// The terminal's master, kept for resizing.
    terminal: Mutex<Option<OwnedFd>>,
    stdin_closed: watch::Sender<bool>,
    /// True once every output stream has been copied and closed.
    drained: watch::Sender<bool>,
}

impl ProcessIo {
    /// The stdio of a process with a terminal, whose master arrives later
    /// ([`ProcessIo::set_terminal`]).
    pub fn for_terminal(streams: Streams) -> ProcessIo {
        Self::new(streams, None)
    }

    /// The stdio of a process without a terminal, and the child's ends.
    pub fn with_pipes(streams: Streams) -> io::Result<(ProcessIo, ChildPipes)> {
        let (stdin, child_stdin) = if streams.stdin {
            let (read, write) = pipe2(OFlag::O_CLOEXEC)?;
            (Some(write), read)
        } else {
            (None, dev_null()?)
        };
        let output = |wanted: bool| -> io::Result<(Option<OwnedFd>, OwnedFd)> {
            if wanted {
                let (read, write) = pipe2(OFlag::O_CLOEXEC)?;
                Ok((Some(read), write))
            } else {
                Ok((None, dev_null()?))
            }
        };
        let (stdout, child_stdout) = output(streams.stdout)?;
        let (stderr, child_stderr) = output(streams.stderr)?;
        let ends = AgentEnds::Pipes {
            stdin,
            stdout,
            stderr,
        };
        let child = ChildPipes {
            stdin: child_stdin,
            stdout: child_stdout,
            stderr: child_stderr,
        };
        Ok((Self::new(streams, Some(ends)), child))
    }

    fn new(streams: Streams, ends: Option<AgentEnds>) -> ProcessIo {
        ProcessIo {
            streams,
            attached: Mutex::default(),
            attach_changed: Notify::new(),
            ends: Mutex::new(ends),
            terminal: Mutex::new(None),
            stdin_closed: watch::channel(false).0,
            drained: watch::channel(false).0,
        }
    }

    pub fn streams(&self) -> Streams {
        self.streams
    }

    /// Takes the terminal master the runtime sent.
    pub fn set_terminal(&self, master: OwnedFd) -> io::Result<()> {
        let for_copies = dup(&master)?;
        *lock(&self.terminal) = Some(master);
        *lock(&self.ends) = Some(AgentEnds::Terminal(for_copies));
        Ok(())
    }

    pub fn resize(&self, width: u32, height: u32) -> Result<(), String> {
        let size = crate::tty::window_size(width, height)?;
        let terminal = lock(&self.terminal);
        let master = terminal
            .as_ref()
            .ok_or("the process has no terminal to resize")?;
        crate::tty::resize(master, &size).map_err(|e| format!("setting the window size: {e}"))
    }

    /// Attaches the host's connection for `stream`.
    pub fn attach(
        &self,
        stream: StdioStream,
        connection: Box<dyn Connection>,
    ) -> Result<(), String> {
        if !self.streams.wants(stream) {
            return Err(format!(
                "the process has no {stream} stream (its stdio: {:?})",
                self.streams
            ));
        }
        let mut attached = lock(&self.attached);
        let slot = attached.slot(stream);
        if slot.is_some() {
            return Err(format!("{stream} is already attached"));
        }
        *slot = Some(connection);
        self.attach_changed.notify_waiters();
        Ok(())
    }

    /// Waits up to `timeout` until every stream the process has is
    /// attached; the error names those still missing.
    pub async fn wait_attached(&self, timeout: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.attach_changed.notified();
            let missing = self.missing_streams();
            if missing.is_empty() {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(format!(
                    "no {} stream attached within {timeout:?}: the host must connect them to \
                     vsock port {} before starting the process",
                    missing.join(" or "),
                    runv_protocol::STDIO_VSOCK_PORT
                ));
            }
        }
    }

    fn missing_streams(&self) -> Vec<String> {
        let mut attached = lock(&self.attached);
        [StdioStream::Stdin, StdioStream::Stdout, StdioStream::Stderr]
            .into_iter()
            .filter(|&stream| self.streams.wants(stream) && attached.slot(stream).is_none())
            .map(|stream| stream.to_string())
            .collect()
    }

    /// Starts copying between the process's descriptors and the attached
    /// connections. Call once every stream is attached and the descriptors
    /// are there (after the terminal arrived).
    pub fn start_copying(&self) -> io::Result<()> {
        let ends = lock(&self.ends)
            .take()
            .ok_or_else(|| io::Error::other("the process's stdio was already started"))?;
        let mut attached = std::mem::take(&mut *lock(&self.attached));
        let mut outputs = Vec::new();
        match ends {
            AgentEnds::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                if let (Some(fd), Some(connection)) = (stdin, attached.stdin.take()) {
                    self.spawn_stdin(connection, pipe::Sender::from_owned_fd(fd)?, false);
                }
                for (fd, connection) in [(stdout, attached.stdout), (stderr, attached.stderr)] {
                    if let (Some(fd), Some(connection)) = (fd, connection) {
                        outputs.push(tokio::spawn(copy_output(
                            pipe::Receiver::from_owned_fd(fd)?,
                            connection,
                        )));
                    }
                }
            }
            AgentEnds::Terminal(master) => {
                set_nonblocking(&master)?;
                if let Some(connection) = attached.stdin.take() {
                    let writer = pipe::Sender::from_owned_fd_unchecked(dup(&master)?)?;
                    self.spawn_stdin(connection, writer, true);
                }
                if let Some(connection) = attached.stdout.take() {
                    let reader = pipe::Receiver::from_owned_fd_unchecked(master)?;
                    outputs.push(tokio::spawn(copy_output(reader, connection)));
                }
            }
        }
        let drained = self.drained.clone();
        tokio::spawn(async move {
            for output in outputs {
                let _ = output.await;
            }
            drained.send_replace(true);
        });
        Ok(())
    }

    fn spawn_stdin(&self, connection: Box<dyn Connection>, sink: pipe::Sender, terminal: bool) {
        let closed = self.stdin_closed.subscribe();
        tokio::spawn(copy_input(connection, sink, closed, terminal));
    }

    /// The process reads end-of-file on stdin, now or as soon as copying
    /// starts.
    pub fn close_stdin(&self) {
        self.stdin_closed.send_replace(true);
    }

    /// Returns once every output stream is copied and closed; at once when
    /// copying never started.
    pub async fn wait_drained(&self, started: bool) {
        if started {
            let mut drained = self.drained.subscribe();
            let _ = drained.wait_for(|drained| *drained).await;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn dev_null() -> io::Result<OwnedFd> {
    Ok(File::options()
        .read(true)
        .write(true)
        .open("/dev/null")?
        .into())
}

fn set_nonblocking(fd: &impl AsFd) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Copies the process's output to the host until the process's end is
/// closed, then closes the connection: the host reads end-of-file.
async fn copy_output(mut source: pipe::Receiver, mut sink: Box<dyn Connection>) {
    let mut buffer = vec![0; COPY_BUFFER];
    loop {
        let read = match source.read(&mut buffer).await {
            Ok(0) => break,
            Ok(read) => read,
            // A terminal's master reads EIO once no process holds the slave.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) => {
                tracing::warn!(error = %e, "reading a process's output");
                break;
            }
        };
        if let Err(e) = sink.write_all(&buffer[..read]).await {
            tracing::warn!(error = %e, "the host's output stream failed; the rest is dropped");
            // Keep draining so that the process is never blocked on a
            // full pipe by a host that went away.
            while matches!(source.read(&mut buffer).await, Ok(read) if read > 0) {}
            return;
        }
    }
    let _ = sink.shutdown().await;
}

/// Copies the host's stdin to the process until the host half-closes or
/// stdin is closed by request, then closes the process's end.
async fn copy_input(
    mut source: Box<dyn Connection>,
    mut sink: pipe::Sender,
    mut closed: watch::Receiver<bool>,
    terminal: bool,
) {
    let mut buffer = vec![0; COPY_BUFFER];
    loop {
        let read = tokio::select! {
            read = source.read(&mut buffer) => read,
            _ = closed.wait_for(|closed| *closed) => Ok(0),
        };
        match read {
            Ok(0) => break,
            Ok(read) => {
                if sink.write_all(&buffer[..read]).await.is_err() {
                    // The process closed its stdin or ended.
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the host's stdin stream");
                break;
            }
        }
    }
    if terminal {
        let _ = sink.write_all(&[TERMINAL_EOF]).await;
    }
}

#[cfg(test)]
mod tests {
    use std::{os::fd::AsRawFd, process::Stdio};

    use tokio::{net::UnixStream, process::Command};

    use super::*;

    fn streams(stdin: bool, stdout: bool, stderr: bool) -> Streams {
        Streams {
            terminal: false,
            stdin,
            stdout,
            stderr,
        }
    }

    #[test]
    fn a_terminal_has_no_stderr_stream() {
        let request = agent::Stdio {
            terminal: true,
            stdin: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let streams = Streams::from_request(&request);
        assert!(streams.stdin && streams.stdout && !streams.stderr);
    }

    #[tokio::test]
    async fn attaching_checks_what_the_process_has() {
        let (io, _child) = ProcessIo::with_pipes(streams(false, true, false)).unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        let err = io.attach(StdioStream::Stdin, Box::new(a)).unwrap_err();
        assert!(err.contains("no stdin stream"), "{err}");
        let (a, _b) = UnixStream::pair().unwrap();
        io.attach(StdioStream::Stdout, Box::new(a)).unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        let err = io.attach(StdioStream::Stdout, Box::new(a)).unwrap_err();
        assert!(err.contains("already attached"), "{err}");
    }

    #[tokio::test]
    async fn waiting_for_streams_names_the_missing_one() {
        let (io, _child) = ProcessIo::with_pipes(streams(true, true, false)).unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        io.attach(StdioStream::Stdout, Box::new(a)).unwrap();
        let err = io
            .wait_attached(Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(err.contains("no stdin stream attached"), "{err}");
        let (a, _b) = UnixStream::pair().unwrap();
        io.attach(StdioStream::Stdin, Box::new(a)).unwrap();
        io.wait_attached(Duration::from_millis(50)).await.unwrap();
    }

    /// A real child's stdin, stdout and stderr through the pipes: input is
    /// echoed back byte-exact up to the host's half-close, output streams
    /// end with end-of-file, and the drain is reported after them.
    #[tokio::test]
    async fn copies_a_childs_stdio_both_ways() {
        let (io, child) = ProcessIo::with_pipes(streams(true, true, true)).unwrap();
        let connect = |stream| {
            let (agent_end, host_end) = UnixStream::pair().unwrap();
            io.attach(stream, Box::new(agent_end)).unwrap();
            host_end
        };
        let mut stdin = connect(StdioStream::Stdin);
        let mut stdout = connect(StdioStream::Stdout);
        let mut stderr = connect(StdioStream::Stderr);
        io.wait_attached(Duration::from_secs(1)).await.unwrap();

        let mut process = Command::new("sh")
            .args(["-c", "cat; echo done >&2"])
            .stdin(Stdio::from(child.stdin))
            .stdout(Stdio::from(child.stdout))
            .stderr(Stdio::from(child.stderr))
            .spawn()
            .unwrap();
        io.start_copying().unwrap();

        let input: Vec<u8> = (0..3 * COPY_BUFFER as u32)
            .map(|i| (i % 251) as u8)
            .collect();
        let writer = {
            let input = input.clone();
            tokio::spawn(async move {
                stdin.write_all(&input).await.unwrap();
                stdin.shutdown().await.unwrap();
                stdin
            })
        };
        let mut output = Vec::new();
        stdout.read_to_end(&mut output).await.unwrap();
        assert!(output == input, "stdout differs from stdin");
        let mut errors = String::new();
        stderr.read_to_string(&mut errors).await.unwrap();
        assert_eq!(errors, "done\n");
        writer.await.unwrap();
        assert!(process.wait().await.unwrap().success());
        tokio::time::timeout(Duration::from_secs(5), io.wait_drained(true))
            .await
            .expect("drained");
    }

    #[tokio::test]
    async fn closing_stdin_ends_the_childs_input() {
        let (io, child) = ProcessIo::with_pipes(streams(true, true, false)).unwrap();
        let (agent_in, _host_in) = UnixStream::pair().unwrap();
        let (agent_out, mut host_out) = UnixStream::pair().unwrap();
        io.attach(StdioStream::Stdin, Box::new(agent_in)).unwrap();
        io.attach(StdioStream::Stdout, Box::new(agent_out)).unwrap();
        assert!(child.stderr.as_raw_fd() > 2);
        let mut process = Command::new("sh")
            .args(["-c", "cat; echo eof"])
            .stdin(Stdio::from(child.stdin))
            .stdout(Stdio::from(child.stdout))
            .stderr(Stdio::from(child.stderr))
            .spawn()
            .unwrap();
        io.close_stdin();
        io.start_copying().unwrap();
        let mut output = String::new();
        host_out.read_to_string(&mut output).await.unwrap();
        assert_eq!(output, "eof\n");
        assert!(process.wait().await.unwrap().success());
    }
}
