//! The shim binary's lifecycle for containerd: `start` (one shim per pod),
//! serving the Task API, and `delete` after a shim has died.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use containerd_shim::{
    api::DeleteResponse,
    asynchronous::{spawn, util::write_str_to_file, ExitSignal, Shim},
    publisher::RemotePublisher,
    Config, Error, Flags, StartOpts,
};

use crate::{
    events::Events,
    host_cgroup,
    mounts::{self, bundle_rootfs, SharedDir},
    pod::SHARED_DIR_MARKER,
    process,
    service::TaskService,
    spec,
};

/// The exit status containerd records for a task whose shim died: killed.
const DEAD_SHIM_EXIT_STATUS: u32 = 128 + libc::SIGKILL as u32;

pub struct RunvShim {
    id: String,
    namespace: String,
    exit: Arc<ExitSignal>,
}

/// What containerd-shim must not do for runv: reap children behind
/// tokio's back (the VM's processes are tokio children) or make the shim
/// a subreaper (the shim runs no container process on the host).
pub fn shim_config() -> Config {
    Config {
        no_reaper: true,
        no_sub_reaper: true,
        ..Config::default()
    }
}

#[async_trait]
impl Shim for RunvShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        RunvShim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    /// Starts the pod's shim, or finds the one already serving the pod:
    /// containers of a CRI pod share one shim, grouped by the sandbox ID.
    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let bundle = std::env::current_dir().map_err(|e| Error::Other(e.to_string()))?;
        let host_spec = spec::read(&bundle).map_err(Error::InvalidArgument)?;
        let pod_id = spec::pod_id(&host_spec, &opts.id);
        let address = spawn(opts, &pod_id, Vec::new()).await?;
        write_str_to_file("address", &address).await?;
        Ok(address)
    }

    /// Cleans up after a shim that died: its VM's processes died with it,
    /// what it mounted for this container is unmounted and removed here.
    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let bundle = std::env::current_dir().map_err(|e| Error::Other(e.to_string()))?;
        if let Ok(view) = std::fs::read_to_string(bundle.join(SHARED_DIR_MARKER)) {
            let view = PathBuf::from(view);
            let shared = SharedDir::from_view(&view);
            if let Err(e) = shared.unshare(&self.id) {
                tracing::warn!(error = %e, "cannot remove the container's shares");
            }
            if let (true, Some(pod_dir)) = (shared.is_empty(), view.parent()) {
                if let Err(e) = mounts::remove_unmounted(pod_dir) {
                    tracing::warn!(error = %e, "cannot remove the pod directory");
                }
            }
        }
        mounts::unmount_tree(&bundle_rootfs(&bundle))
            .map_err(|e| Error::Other(format!("cannot unmount the rootfs: {e}")))?;
        remove_dead_socket(&bundle).await;
        // The pod's own container (its sandbox, or a `ctr run` one) named
        // the cgroup the dead shim made; the VM's helpers died with it.
        if let Ok(spec) = spec::read(&bundle) {
            if let (true, Some(path)) = (
                spec::pod_id(&spec, &self.id) == self.id,
                host_cgroup::spec_cgroups_path(&spec),
            ) {
                host_cgroup::remove_leftover(path);
            }
        }
        tracing::info!(id = %self.id, namespace = %self.namespace, "cleaned up after a dead shim");
        Ok(DeleteResponse {
            exit_status: DEAD_SHIM_EXIT_STATUS,
            exited_at: Some(process::now()).into(),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        // Before the first pod: every thread, and every helper this shim
        // starts, inherits it (docs/security.md). It denies loading eBPF
        // programs, so port-forward's is loaded first.
        crate::port_forward::prepare();
        if let Err(e) = runv_hypervisor::confine::confine_process() {
            tracing::error!(error = %e, "running without the shim's seccomp filter");
        }
        let events = Events::new(publisher, self.namespace.clone());
        TaskService::new(self.namespace.clone(), events, self.exit.clone())
    }
}

/// Removes the socket of the bundle's shim once nothing serves it: a shim
/// killed outright could not remove it (a live shim still serving other
/// containers of the pod keeps it). containerd may run this as soon as it
/// sees the shim's connection end, while the dying shim's listener is
/// still open: it is asked again for a short while before being left.
async fn remove_dead_socket(bundle: &Path) {
    const PATIENCE: Duration = Duration::from_secs(2);
    let Ok(address) = std::fs::read_to_string(bundle.join("address")) else {
        return;
    };
    let socket = Path::new(address.trim().trim_start_matches("unix://"));
    let is_refused = || {
        std::os::unix::net::UnixStream::connect(socket)
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    };
    let deadline = Instant::now() + PATIENCE;
    let mut refused = is_refused();
    while !refused && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        refused = is_refused();
    }
    if refused {
        if let Err(e) = std::fs::remove_file(socket) {
            tracing::warn!(socket = %socket.display(), error = %e, "cannot remove the dead shim's socket");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_a_socket_nobody_serves_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let socket = |name: &str| dir.path().join(name);
        let (served, dead, dying) = (socket("served"), socket("dead"), socket("dying"));
        let _listener = std::os::unix::net::UnixListener::bind(&served).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
        // A shim still dying when containerd runs `delete`.
        let last_moments = std::os::unix::net::UnixListener::bind(&dying).unwrap();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(last_moments);
        });
        for socket in [&served, &dead, &dying] {
            let address = format!("unix://{}", socket.display());
            std::fs::write(dir.path().join("address"), address).unwrap();
            remove_dead_socket(dir.path()).await;
        }
        assert!(served.exists());
        assert!(!dead.exists());
        assert!(!dying.exists());
    }
}
