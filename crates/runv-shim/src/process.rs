//! One process of a container (its init process or an exec): its stdio,
//! its guest PID once started, and its exit, which is known only once
//! its output has all reached containerd.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use containerd_shim::protos::{
    api::Status,
    events::task::{TaskExit, TaskOOM},
    protobuf::well_known_types::timestamp::Timestamp,
};
use runv_sandbox::PodVm;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    events::Events,
    oom,
    stdio::{OutputCopies, StdinCloser, StdioPaths},
};

/// How a process ended.
#[derive(Debug, Clone)]
pub struct Exit {
    /// The exit code, or 128 + the signal that killed it.
    pub status: u32,
    pub at: Timestamp,
}

/// The PID containerd gets for every task and process of the pod: the
/// shim's own, a host process that runv owns and that lives as long as
/// any of the pod's tasks (it holds the VM; on the builtin hypervisor it
/// is the VM). Guest PIDs are the guest's to choose and mean nothing on
/// the host, so none reaches containerd.
pub fn task_pid() -> u32 {
    std::process::id()
}

/// The exit status containerd sees when the guest cannot say how a
/// process ended (the VM went away, say), as runc's shim reports it.
const UNKNOWN_EXIT_STATUS: u32 = 255;

pub struct Process {
    pub container_id: String,
    /// Empty for the init process.
    pub exec_id: String,
    pub stdio: StdioPaths,
    /// The guest PID, once started: for the guest's use only (see
    /// [`task_pid`]).
    pub pid: u32,
    stdin: StdinCloser,
    /// Held until the process starts, then handed to its exit watcher.
    outputs: Option<OutputCopies>,
    exit_sender: Option<watch::Sender<Option<Exit>>>,
    exit: watch::Receiver<Option<Exit>>,
    /// The exit watcher; it holds the VM, so it goes with the process.
    watcher: Option<JoinHandle<()>>,
}

impl Process {
    pub fn new(
        container_id: &str,
        exec_id: &str,
        stdio: StdioPaths,
        stdin: StdinCloser,
        outputs: OutputCopies,
    ) -> Process {
        let (exit_sender, exit) = watch::channel(None);
        Process {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            stdio,
            pid: 0,
            stdin,
            outputs: Some(outputs),
            exit_sender: Some(exit_sender),
            exit,
            watcher: None,
        }
    }

    pub fn started(&self) -> bool {
        self.exit_sender.is_none()
    }

    pub fn exit(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }

    /// containerd's status of the process (the container's pause state
    /// aside).
    pub fn status(&self) -> Status {
        match (self.started(), self.exit.borrow().is_some()) {
            (false, _) => Status::CREATED,
            (true, false) => Status::RUNNING,
            (true, true) => Status::STOPPED,
        }
    }

    /// Records the start and watches for the exit: once the guest says the
    /// process ended and its output is all copied, the exit is recorded
    /// and TaskExit published. While an init process runs, the watcher
    /// also publishes TaskOOM for the container's OOM kills.
    pub fn started_as(&mut self, pid: u32, vm: Arc<PodVm>, events: Arc<Events>) {
        self.pid = pid;
        let (Some(exit_sender), Some(outputs)) = (self.exit_sender.take(), self.outputs.take())
        else {
            return;
        };
        let (container_id, exec_id) = (self.container_id.clone(), self.exec_id.clone());
        self.watcher = Some(tokio::spawn(async move {
            let waited = vm.agent().wait_process(&container_id, &exec_id);
            let waited = match exec_id.is_empty() {
                true => {
                    let (vm, container_id, events) = (&vm, &container_id, &events);
                    let kills = move || async move {
                        let stats = vm.agent().container_stats(container_id).await;
                        Some(stats.ok()?.memory.into_option()?.oom_kill_events)
                    };
                    let on_oom = move || async move {
                        tracing::info!(%container_id, "OOM kill in the container");
                        let oom = TaskOOM {
                            container_id: container_id.clone(),
                            ..Default::default()
                        };
                        events.publish(oom).await
                    };
                    oom::watch_during(oom::POLL_INTERVAL, waited, kills, on_oom).await
                }
                false => waited.await,
            };
            let exit = match waited {
                Ok(waited) => Exit {
                    status: waited.exit_status,
                    at: timestamp(Duration::from_nanos(waited.exited_at_ns)),
                },
                Err(e) => {
                    tracing::error!(%container_id, %exec_id, error = %e, "cannot wait for the process");
                    Exit {
                        status: UNKNOWN_EXIT_STATUS,
                        at: now(),
                    }
                }
            };
            drop(vm);
            outputs.drained().await;
            exit_sender.send_replace(Some(exit.clone()));
            let id = match exec_id.is_empty() {
                true => container_id.clone(),
                false => exec_id,
            };
            events
                .publish(TaskExit {
                    container_id,
                    id,
                    pid: task_pid(),
                    exit_status: exit.status,
                    exited_at: Some(exit.at).into(),
                    ..Default::default()
                })
                .await;
        }));
    }

    /// A receiver that resolves on the exit.
    pub fn exit_watch(&self) -> watch::Receiver<Option<Exit>> {
        self.exit.clone()
    }

    pub fn close_stdin(&mut self) {
        self.stdin.close();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(watcher) = &self.watcher {
            watcher.abort();
        }
    }
}

/// Waits for the exit `watch` reports.
pub async fn wait_exit(mut watch: watch::Receiver<Option<Exit>>) -> Option<Exit> {
    watch
        .wait_for(Option::is_some)
        .await
        .ok()
        .and_then(|exit| exit.clone())
}

pub fn now() -> Timestamp {
    timestamp(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default(),
    )
}

fn timestamp(since_epoch: Duration) -> Timestamp {
    Timestamp {
        seconds: since_epoch.as_secs() as i64,
        nanos: since_epoch.subsec_nanos() as i32,
        ..Default::default()
    }
}
