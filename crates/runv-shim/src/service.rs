//! containerd's Task service: each call mapped onto the pod and its agent,
//! with the events containerd expects.

use std::{path::PathBuf, sync::Arc};

use async_trait::async_trait;
use containerd_shim::{
    api,
    asynchronous::ExitSignal,
    protos::{
        events::task::{
            TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskIO, TaskPaused,
            TaskResumed, TaskStart,
        },
        protobuf::MessageField,
        shim_async::Task,
        types::task::ProcessInfo,
    },
    TtrpcContext, TtrpcResult,
};
use tokio::sync::Mutex;

use crate::{
    container::{Container, HostMounts},
    error::{Result, ShimError},
    events::Events,
    host_cgroup, namespaces, network, options,
    pod::Pod,
    process::{self, task_pid, Process},
    sizing::PodResources,
    spec, stats,
    stdio::{self, ProcessRef, StdioPaths},
};

pub struct TaskService {
    namespace: String,
    /// The pod, from the first create until its VM is powered off.
    pod: Mutex<Option<Pod>>,
    events: Arc<Events>,
    exit: Arc<ExitSignal>,
}

impl TaskService {
    pub fn new(namespace: String, events: Events, exit: Arc<ExitSignal>) -> TaskService {
        TaskService {
            namespace,
            pod: Mutex::new(None),
            events: Arc::new(events),
            exit,
        }
    }

    async fn create_task(&self, req: api::CreateTaskRequest) -> Result<u32> {
        let mut slot = self.pod.lock().await;
        if slot
            .as_ref()
            .is_some_and(|pod| pod.containers.contains_key(&req.id))
        {
            return Err(ShimError::AlreadyExists(format!(
                "container {} exists",
                req.id
            )));
        }
        let bundle = PathBuf::from(&req.bundle);
        if slot.is_none() {
            let config_path =
                options::config_path(req.options.as_ref()).map_err(ShimError::InvalidArgument)?;
            let host_spec = spec::read(&bundle).map_err(ShimError::InvalidArgument)?;
            namespaces::refuse_node_namespaces(&host_spec).map_err(ShimError::InvalidArgument)?;
            let pod_id = spec::pod_id(&host_spec, &req.id);
            let resources =
                PodResources::from_spec(&host_spec, &pod_id).map_err(ShimError::InvalidArgument)?;
            let netns = network::netns_path(&host_spec);
            *slot = Some(
                Pod::boot(
                    &bundle,
                    config_path.as_deref(),
                    &self.namespace,
                    &pod_id,
                    &resources,
                    netns,
                    host_cgroup::spec_cgroups_path(&host_spec),
                )
                .await?,
            );
        } else if let Some(pod) = slot.as_ref() {
            // A booted pod's first container's bundle was marked at boot.
            pod.mark_bundle(&bundle)?;
        }
        let pod = slot.as_mut().expect("booted above");
        let created = self.create_container(pod, &req).await;
        if created.is_err() && pod.containers.is_empty() {
            // A failed first create leaves no VM behind.
            slot.take().expect("checked above").power_off().await;
        }
        created
    }

    async fn create_container(&self, pod: &mut Pod, req: &api::CreateTaskRequest) -> Result<u32> {
        let bundle = PathBuf::from(&req.bundle);
        let (host, guest_spec) = HostMounts::prepare(pod, &req.id, &bundle, &req.rootfs).await?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let created = async {
            pod.agent()
                .create_container(&req.id, guest_spec, stdio.guest_stdio())
                .await?;
            let process = ProcessRef {
                namespace: &self.namespace,
                container_id: &req.id,
                exec_id: "",
            };
            match stdio::attach(pod.vsock(), &process, &stdio).await {
                Ok(io) => Ok(io),
                Err(e) => {
                    let _ = pod.agent().remove_container(&req.id).await;
                    Err(ShimError::Internal(e))
                }
            }
        };
        let io = match created.await {
            Ok(io) => io,
            Err(e) => {
                host.release(pod).await;
                return Err(e);
            }
        };
        pod.containers.insert(
            req.id.clone(),
            Container {
                id: req.id.clone(),
                bundle,
                init: Process::new(&req.id, "", stdio.clone(), io.stdin, io.outputs),
                execs: Default::default(),
                paused: false,
                host,
            },
        );
        self.events
            .publish(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: stdio.stdin,
                    stdout: stdio.stdout,
                    stderr: stdio.stderr,
                    terminal: stdio.terminal,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await;
        Ok(task_pid())
    }

    async fn start_process(&self, id: &str, exec_id: &str) -> Result<u32> {
        let mut slot = self.pod.lock().await;
        let pod = pod_of(&mut slot)?;
        let vm = pod.vm();
        let started = pod.agent().start_process(id, exec_id).await?;
        let process = pod.container_mut(id)?.process_mut(exec_id)?;
        process.started_as(started.pid, vm, self.events.clone());
        match exec_id {
            "" => {
                self.events
                    .publish(TaskStart {
                        container_id: id.to_owned(),
                        pid: task_pid(),
                        ..Default::default()
                    })
                    .await
            }
            _ => {
                self.events
                    .publish(TaskExecStarted {
                        container_id: id.to_owned(),
                        exec_id: exec_id.to_owned(),
                        pid: task_pid(),
                        ..Default::default()
                    })
                    .await
            }
        }
        Ok(task_pid())
    }

    async fn delete_process(&self, id: &str, exec_id: &str) -> Result<api::DeleteResponse> {
        let mut slot = self.pod.lock().await;
        let pod = pod_of(&mut slot)?;
        let process = pod.container(id)?.process(exec_id)?;
        if process.status() == api::Status::RUNNING {
            return Err(ShimError::FailedPrecondition(format!(
                "process {id}/{exec_id} is running: kill it first"
            )));
        }
        let exit = process.exit().unwrap_or(process::Exit {
            status: 0,
            at: process::now(),
        });
        let pid = task_pid();
        if !exec_id.is_empty() {
            pod.agent().delete_process(id, exec_id).await?;
            pod.container_mut(id)?.execs.remove(exec_id);
        } else {
            if let Err(e) = pod.agent().remove_container(id).await {
                tracing::warn!(container = id, error = %e, "the agent did not remove the container");
            }
            let container = pod.containers.remove(id).expect("found above");
            container.host.release(pod).await;
            self.events
                .publish(TaskDelete {
                    container_id: id.to_owned(),
                    pid,
                    exit_status: exit.status,
                    exited_at: MessageField::some(exit.at.clone()),
                    id: id.to_owned(),
                    ..Default::default()
                })
                .await;
            if pod.containers.is_empty() {
                slot.take().expect("checked above").power_off().await;
            }
        }
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        })
    }

    async fn exec_process(&self, req: api::ExecProcessRequest) -> Result<()> {
        let mut slot = self.pod.lock().await;
        let pod = pod_of(&mut slot)?;
        let container = pod.container(&req.id)?;
        if container.execs.contains_key(&req.exec_id) {
            return Err(ShimError::AlreadyExists(format!(
                "container {} has a process {} already",
                req.id, req.exec_id
            )));
        }
        let process_json = req
            .spec
            .as_ref()
            .map(|spec| spec::process_for_guest(&spec.value))
            .ok_or_else(|| ShimError::InvalidArgument("exec without a process spec".into()))?
            .map_err(ShimError::InvalidArgument)?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        pod.agent()
            .exec_process(&req.id, &req.exec_id, process_json, stdio.guest_stdio())
            .await?;
        let process = ProcessRef {
            namespace: &self.namespace,
            container_id: &req.id,
            exec_id: &req.exec_id,
        };
        let io = match stdio::attach(pod.vsock(), &process, &stdio).await {
            Ok(io) => io,
            Err(e) => {
                let _ = pod.agent().delete_process(&req.id, &req.exec_id).await;
                return Err(ShimError::Internal(e));
            }
        };
        let exec = Process::new(&req.id, &req.exec_id, stdio, io.stdin, io.outputs);
        pod.container_mut(&req.id)?
            .execs
            .insert(req.exec_id.clone(), exec);
        self.events
            .publish(TaskExecAdded {
                container_id: req.id,
                exec_id: req.exec_id,
                ..Default::default()
            })
            .await;
        Ok(())
    }

    async fn state_of(&self, id: &str, exec_id: &str) -> Result<api::StateResponse> {
        let mut slot = self.pod.lock().await;
        let pod = pod_of(&mut slot)?;
        let container = pod.container(id)?;
        let process = container.process(exec_id)?;
        let status = match process.status() {
            api::Status::RUNNING if container.paused => api::Status::PAUSED,
            status => status,
        };
        let exit = process.exit();
        Ok(api::StateResponse {
            id: id.to_owned(),
            bundle: container.bundle.to_string_lossy().into_owned(),
            pid: task_pid(),
            status: status.into(),
            stdin: process.stdio.stdin.clone(),
            stdout: process.stdio.stdout.clone(),
            stderr: process.stdio.stderr.clone(),
            terminal: process.stdio.terminal,
            exit_status: exit.as_ref().map_or(0, |e| e.status),
            exited_at: MessageField::from_option(exit.map(|e| e.at)),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        })
    }

    async fn kill_process(&self, req: &api::KillRequest) -> Result<()> {
        let mut slot = self.pod.lock().await;
        let pod = pod_of(&mut slot)?;
        let process = pod.container(&req.id)?.process(&req.exec_id)?;
        let exited = || {
            ShimError::NotFound(format!(
                "process {}/{} has already exited",
                req.id, req.exec_id
            ))
        };
        if process.status() != api::Status::STOPPED {
            pod.agent()
                .signal_process(&req.id, &req.exec_id, req.signal, req.all)
                .await?;
            return Ok(());
        }
        if !req.all {
            return Err(exited());
        }
        // `all` after the init's exit (containerd's delete with
        // WithProcessKill): processes may be left in a PID namespace the
        // container shared; where the guest cannot be asked (its VM has
        // ended), none is, and the process is as gone as containerd asks.
        pod.agent()
            .signal_process(&req.id, &req.exec_id, req.signal, true)
            .await
            .map_err(|e| {
                tracing::debug!(error = %e, "signalling an exited container's processes");
                exited()
            })
    }

    async fn set_paused(&self, id: &str, paused: bool) -> Result<()> {
        let mut slot = self.pod.lock().await;
        let pod = pod_of(&mut slot)?;
        pod.container(id)?;
        match paused {
            true => pod.agent().pause_container(id).await?,
            false => pod.agent().resume_container(id).await?,
        }
        pod.container_mut(id)?.paused = paused;
        let container_id = id.to_owned();
        match paused {
            true => {
                self.events
                    .publish(TaskPaused {
                        container_id,
                        ..Default::default()
                    })
                    .await
            }
            false => {
                self.events
                    .publish(TaskResumed {
                        container_id,
                        ..Default::default()
                    })
                    .await
            }
        }
        Ok(())
    }

    async fn wait_process(&self, id: &str, exec_id: &str) -> Result<process::Exit> {
        let watch = {
            let mut slot = self.pod.lock().await;
            let pod = pod_of(&mut slot)?;
            pod.container(id)?.process(exec_id)?.exit_watch()
        };
        process::wait_exit(watch).await.ok_or_else(|| {
            ShimError::NotFound(format!("process {id}/{exec_id} went away before it exited"))
        })
    }
}

fn pod_of(slot: &mut Option<Pod>) -> Result<&mut Pod> {
    slot.as_mut()
        .ok_or_else(|| ShimError::NotFound("this shim runs no container".into()))
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if !req.checkpoint.is_empty() {
            return Err(checkpoint_unsupported().into());
        }
        let id = req.id.clone();
        let pid = self.create_task(req).await.inspect_err(|e| {
            tracing::error!(container = %id, error = %e, "create failed");
        })?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = self.start_process(&req.id, &req.exec_id).await?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        Ok(self.state_of(&req.id, &req.exec_id).await?)
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        self.kill_process(&req).await?;
        Ok(api::Empty::new())
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        Ok(self.delete_process(&req.id, &req.exec_id).await?)
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let mut slot = self.pod.lock().await;
        pod_of(&mut slot)?.container(&req.id)?;
        // The one host process of the task (as Kata lists its VM's):
        // the guest's process list is the guest's word.
        Ok(api::PidsResponse {
            processes: vec![ProcessInfo {
                pid: task_pid(),
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        self.exec_process(req).await?;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let mut slot = self.pod.lock().await;
        let pod = pod_of(&mut slot)?;
        pod.container(&req.id)?.process(&req.exec_id)?;
        pod.agent()
            .resize_tty(&req.id, &req.exec_id, req.width, req.height)
            .await
            .map_err(ShimError::from)?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let mut slot = self.pod.lock().await;
        let pod = pod_of(&mut slot)?;
        if req.stdin {
            pod.container_mut(&req.id)?
                .process_mut(&req.exec_id)?
                .close_stdin();
        }
        Ok(api::Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let exit = self.wait_process(&req.id, &req.exec_id).await?;
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let mut slot = self.pod.lock().await;
        let pod = pod_of(&mut slot)?;
        pod.container(&req.id)?;
        let stats = pod
            .agent()
            .container_stats(&req.id)
            .await
            .map_err(ShimError::from)?;
        let metrics = stats::metrics_any(&stats, stats::CgroupVersion::of_host())
            .map_err(ShimError::Internal)?;
        Ok(api::StatsResponse {
            stats: MessageField::some(metrics),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let slot = self.pod.lock().await;
        let task_pid = match slot.as_ref() {
            Some(pod) if pod.containers.contains_key(&req.id) => task_pid(),
            _ => 0,
        };
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        let mut slot = self.pod.lock().await;
        if slot.as_ref().is_some_and(|pod| !pod.containers.is_empty()) {
            // Other containers of the pod still run here.
            return Ok(api::Empty::new());
        }
        if let Some(pod) = slot.take() {
            pod.power_off().await;
        }
        self.exit.signal();
        Ok(api::Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let mut slot = self.pod.lock().await;
        let pod = pod_of(&mut slot)?;
        pod.container(&req.id)?;
        // containerd packs the OCI LinuxResources as JSON in the Any.
        let resources = req.resources.as_ref().map(|any| any.value.clone());
        let resources = resources
            .ok_or_else(|| ShimError::InvalidArgument("update without resources".into()))?;
        pod.agent()
            .update_container(&req.id, resources)
            .await
            .map_err(ShimError::from)?;
        Ok(api::Empty::new())
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.set_paused(&req.id, true).await?;
        Ok(api::Empty::new())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        self.set_paused(&req.id, false).await?;
        Ok(api::Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(checkpoint_unsupported().into())
    }
}

fn checkpoint_unsupported() -> ShimError {
    ShimError::Unimplemented(
        "checkpoint and restore are not supported by runv: the container's memory lives in \
         the pod VM"
            .into(),
    )
}
