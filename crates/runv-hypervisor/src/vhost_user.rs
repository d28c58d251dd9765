//! The vhost-user backends of the qemu backend: helper processes that each
//! serve one virtio device to QEMU over a Unix socket in the VM directory
//! and log there. This module starts them so that they die with the shim,
//! waits for their sockets, and reports how they ended; it also holds their
//! command lines.

use std::{
    future::{poll_fn, Future},
    path::{Path, PathBuf},
    task::Poll,
    time::{Duration, Instant},
};

use tokio::process::Child;

use crate::{
    process::{path_arg, spawn_logged, tail, Spawn, LOG_TAIL_LINES},
    HypervisorError,
};

/// How long a backend may take to open its socket.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
const READY_POLL_INTERVAL: Duration = Duration::from_millis(2);

/// A started backend process.
pub struct Backend {
    name: &'static str,
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Backend {
    /// Spawns `program` with `args` as `how` says; it is to serve on
    /// `socket`. Call [`Backend::wait_ready`] before QEMU dials the socket.
    pub fn spawn(
        program: &Path,
        args: Vec<String>,
        socket: PathBuf,
        how: Spawn<'_>,
    ) -> Result<Backend, HypervisorError> {
        let (name, log) = (how.what, how.log.to_owned());
        let child = spawn_logged(program, args, how)?;
        Ok(Backend {
            name,
            child,
            socket,
            log,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for the backend's socket, failing when the backend exits or
    /// the socket does not appear in time.
    pub async fn wait_ready(&mut self) -> Result<(), HypervisorError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while !self.socket.exists() {
            let failure = if let Ok(Some(status)) = self.child.try_wait() {
                format!("it exited ({status})")
            } else if Instant::now() > deadline {
                format!("its socket did not appear within {READY_TIMEOUT:?}")
            } else {
                tokio::time::sleep(READY_POLL_INTERVAL).await;
                continue;
            };
            return Err(self.failed(failure));
        }
        Ok(())
    }

    /// Connects to the backend's socket, for QEMU to inherit. The backend
    /// creates the socket file a moment before it listens: a refused
    /// connection is tried again while the backend runs, until
    /// [`READY_TIMEOUT`]. (No probe connection before this one: a backend
    /// serves one connection and exits when it closes.)
    pub async fn connect(&mut self) -> Result<std::os::unix::net::UnixStream, HypervisorError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let error = match std::os::unix::net::UnixStream::connect(&self.socket) {
                Ok(stream) => return Ok(stream),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => e,
                Err(e) => return Err(self.failed(format!("cannot connect to its socket: {e}"))),
            };
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.failed(format!("it exited ({status})")));
            }
            if Instant::now() > deadline {
                return Err(self.failed(format!(
                    "its socket refused connections for {READY_TIMEOUT:?}: {error}"
                )));
            }
            tokio::time::sleep(READY_POLL_INTERVAL).await;
        }
    }

    /// A start failure of this backend, with its log.
    fn failed(&self, failure: String) -> HypervisorError {
        HypervisorError::StartFailed {
            what: self.name,
            detail: format!("{failure}; its log:\n{}", self.log_tail()),
        }
    }

    /// Resolves once the backend has exited, with how, for the VM's end.
    pub async fn exited(&mut self) -> String {
        let status = match self.child.wait().await {
            Ok(status) => status.to_string(),
            Err(e) => format!("cannot wait for it: {e}"),
        };
        format!("{} exited ({status}):\n{}", self.name, self.log_tail())
    }

    /// Kills the backend and reaps it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    fn log_tail(&self) -> String {
        tail(&self.log, LOG_TAIL_LINES)
    }
}

/// Resolves with the first of `backends` to exit; never when there is none.
pub async fn first_exit(backends: &mut [Backend]) -> String {
    let mut exits: Vec<_> = backends
        .iter_mut()
        .map(|backend| Box::pin(backend.exited()))
        .collect();
    poll_fn(|cx| {
        exits
            .iter_mut()
            .find_map(|exit| match exit.as_mut().poll(cx) {
                Poll::Ready(how) => Some(how),
                Poll::Pending => None,
            })
            .map_or(Poll::Pending, Poll::Ready)
    })
    .await
}

/// Kills and reaps every one of `backends`.
pub async fn kill_all(backends: &mut [Backend]) {
    for backend in backends {
        backend.kill().await;
    }
}

/// vhost-device-vsock's command line: the guest `cid`'s vsock served on
/// `socket`, with the hybrid vsock Unix socket for host clients at `uds`.
/// The helper runs unprivileged in the directory that holds both, so the
/// two are names in it: it need not reach the directory by path.
pub fn vsock_args(cid: u32, socket: &str, uds: &str) -> Vec<String> {
    vec![
        "--guest-cid".into(),
        cid.to_string(),
        "--socket".into(),
        socket.into(),
        "--uds-path".into(),
        uds.into(),
    ]
}

/// virtiofsd's command line: `shared_dir` served on `socket`.
///
/// The shim bind-mounts each container's root file system (an overlay
/// mount) into the shared directory while the VM runs, and the guest must
/// see those mounts. That decides the sandbox:
/// - `--sandbox=chroot`: virtiofsd stays in the shim's mount namespace,
///   rooted at the shared directory, so a mount made under it at any time
///   is visible at once and nothing on the host needs shared mount
///   propagation (which would mean a mount of our own on the caller's
///   directory that a crashed shim leaves behind). The default namespace
///   sandbox would also fork the serving process into a new PID namespace,
///   a grandchild the supervisor cannot reap and our parent-death signal
///   does not cover. The chroot still confines path
///   resolution: virtiofsd drops CAP_SYS_CHROOT and runs under its seccomp
///   filter (default action: kill).
/// - `--inode-file-handles=never`: inodes are held as O_PATH descriptors,
///   so virtiofsd does not keep CAP_DAC_READ_SEARCH, with which
///   open_by_handle_at could reach files outside the chroot. Overlay
///   mounts have no file handles by default anyway.
/// - `--announce-submounts`: each mount under the share (a container
///   root) is a submount in the guest with its own device number, so inode
///   numbers of different host file systems never collide there.
/// - `--cache=auto`: the guest caches names and attributes for a second and
///   a file's data while it is open, so files the host changes (configmap
///   and secret volumes, resolv.conf) show within a second; `always` would
///   keep stale data for a day, `never` would make every lookup a round
///   trip to the host.
/// - `--xattr` with `--xattrmap=:map::user.virtiofs.:`: every extended
///   attribute the guest names is stored on the host under the prefix
///   `user.virtiofs.` (the guest's `security.capability` is the host's
///   `user.virtiofs.security.capability`), and the guest sees only host
///   attributes with that prefix. So the guest can neither read nor set the
///   host's `security.*` (file capabilities, SELinux labels), `trusted.*`
///   or ACLs, and `user.*` works inside the guest. The price: file
///   capabilities that an image's files carry on the host are not seen.
/// - `--modcaps=-mknod:-fsetid`: virtiofsd runs as root to serve every
///   uid's files, but without CAP_MKNOD the guest cannot create device
///   nodes on the host, and without CAP_FSETID a file it writes or chowns
///   loses its setuid and setgid bits.
/// - `--thread-pool-size=0`: requests are served on the queue's own thread;
///   no pool of threads per pod (memory, small hosts), and the device has
///   a single request queue anyway.
pub fn virtiofsd_args(shared_dir: &Path, socket: &Path) -> Vec<String> {
    let mut args = vec![
        "--shared-dir".into(),
        path_arg(shared_dir),
        "--socket-path".into(),
        path_arg(socket),
    ];
    args.extend(
        [
            "--sandbox=chroot",
            "--inode-file-handles=never",
            "--announce-submounts",
            "--cache=auto",
            "--xattr",
            "--xattrmap=:map::user.virtiofs.:",
            "--modcaps=-mknod:-fsetid",
            "--thread-pool-size=0",
        ]
        .map(String::from),
    );
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(dir: &Path, name: &'static str, script: &str) -> Backend {
        let log = dir.join(format!("{name}.log"));
        Backend::spawn(
            Path::new("sh"),
            vec!["-c".into(), script.into()],
            dir.join(format!("{name}.sock")),
            Spawn::logged(&log, name),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn ready_once_the_socket_appears_and_failures_quote_the_log() {
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("ready.sock");
        let mut ready = backend(
            tmp.path(),
            "ready",
            &format!("touch {}; exec sleep 30", socket.display()),
        );
        ready.wait_ready().await.unwrap();
        ready.kill().await;

        let mut failing = backend(tmp.path(), "failing", "echo cannot bind >&2; exit 3");
        let err = failing.wait_ready().await.unwrap_err().to_string();
        assert!(
            err.contains("failing failed to start: it exited (exit status: 3)")
                && err.contains("cannot bind"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn first_exit_names_the_backend_that_ended() {
        let tmp = tempfile::tempdir().unwrap();
        let mut backends = vec![
            backend(tmp.path(), "lasting", "exec sleep 30"),
            backend(tmp.path(), "short", "echo bye >&2; exit 1"),
        ];
        let how = first_exit(&mut backends).await;
        assert!(how.starts_with("short exited (exit status: 1)"), "{how}");
        assert!(how.ends_with("bye"), "{how}");
        let lasting = backends[0].pid().unwrap();
        kill_all(&mut backends).await;
        assert!(
            !Path::new(&format!("/proc/{lasting}")).exists(),
            "killed and reaped"
        );
        let none = tokio::time::timeout(Duration::from_millis(50), first_exit(&mut [])).await;
        assert!(none.is_err(), "no backend never ends");
    }

    #[test]
    fn virtiofsd_shares_the_directory_with_mounts_visible_and_confined() {
        let args = virtiofsd_args(Path::new("/pods/p1/shared"), Path::new("/run/vm/fs.sock"));
        assert_eq!(
            args[..4],
            [
                "--shared-dir",
                "/pods/p1/shared",
                "--socket-path",
                "/run/vm/fs.sock"
            ]
        );
        for option in [
            "--sandbox=chroot",
            "--inode-file-handles=never",
            "--announce-submounts",
            "--cache=auto",
            "--xattr",
            "--xattrmap=:map::user.virtiofs.:",
            "--modcaps=-mknod:-fsetid",
        ] {
            assert!(args.iter().any(|a| a == option), "{option}: {args:?}");
        }
    }
}
