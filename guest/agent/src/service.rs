//! The agent protocol's service: health check, guest details, power off,
//! virtio-mmio hot-plug, mounts (handed to `share` and `block_mount`) and
//! the containers' calls (handed to `containers`).

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use async_trait::async_trait;
use nix::{
    sys::{sysinfo::sysinfo, utsname::uname},
    unistd::{sysconf, SysconfVar},
};
use runv_protocol::{agent, agent_ttrpc, PROTOCOL_VERSION};
use ttrpc::r#async::TtrpcContext;

use crate::{
    boot_clock,
    containers::{Containers, Failure},
    hotplug::{HotplugError, PlatformBus, PLUG_TIMEOUT},
    init, network,
};

/// How long the power-off reply has to leave the guest before it resets.
const POWER_OFF_DELAY: Duration = Duration::from_millis(20);

pub struct AgentService {
    init_started_ns: u64,
    agent_ready_ns: OnceLock<u64>,
    is_init: bool,
    containers: Arc<Containers>,
}

impl AgentService {
    pub fn new(init_started_ns: u64, is_init: bool, containers: Arc<Containers>) -> Self {
        AgentService {
            init_started_ns,
            agent_ready_ns: OnceLock::new(),
            is_init,
            containers,
        }
    }

    pub fn mark_ready(&self, now_ns: u64) {
        let _ = self.agent_ready_ns.set(now_ns);
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(
        ttrpc::Code::INTERNAL,
        format!("{what}: {e}"),
    ))
}

/// A container operation's failure as the host receives it.
fn container_status(failure: Failure) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(failure.code, failure.message))
}

/// A hot-plug failure with the status code that says whose it is.
fn hotplug_status(e: HotplugError) -> ttrpc::Error {
    let code = match e {
        HotplugError::NoSuchSlot { .. } => ttrpc::Code::NOT_FOUND,
        HotplugError::EmptySlot { .. } => ttrpc::Code::FAILED_PRECONDITION,
        HotplugError::Timeout { .. } | HotplugError::NoBlockDevice { .. } => {
            ttrpc::Code::DEADLINE_EXCEEDED
        }
        HotplugError::Bind { .. } | HotplugError::Unbind { .. } | HotplugError::Read { .. } => {
            ttrpc::Code::INTERNAL
        }
    };
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
}

fn network_status(e: network::NetworkError) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
}

/// Runs a sysfs operation off the runtime's only thread: a bind runs the
/// driver's probe before the write returns.
async fn on_blocking_thread<T: Send + 'static>(
    operation: impl FnOnce() -> Result<T, HotplugError> + Send + 'static,
) -> ttrpc::Result<T> {
    tokio::task::spawn_blocking(operation)
        .await
        .map_err(|e| internal("hot-plug task", e))?
        .map_err(hotplug_status)
}

/// The device number of a block device node, which the host needs to give
/// a container the disk as a raw device.
fn device_number(node: &std::path::Path) -> ttrpc::Result<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(node)
        .map_err(|e| internal(&format!("stat {}", node.display()), e))?
        .rdev();
    Ok((
        nix::sys::stat::major(rdev) as u32,
        nix::sys::stat::minor(rdev) as u32,
    ))
}

#[async_trait]
impl agent_ttrpc::Agent for AgentService {
    async fn check(
        &self,
        _ctx: &TtrpcContext,
        request: agent::CheckRequest,
    ) -> ttrpc::Result<agent::CheckResponse> {
        if request.protocol_version != PROTOCOL_VERSION {
            tracing::warn!(
                shim = request.protocol_version,
                agent = PROTOCOL_VERSION,
                "the shim speaks another protocol version"
            );
        }
        if self.is_init {
            match boot_clock::follow_host(request.host_time_ns) {
                Ok(true) => tracing::info!("guest clock set from the host's"),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot set the guest clock"),
            }
        }
        Ok(agent::CheckResponse {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn get_guest_details(
        &self,
        _ctx: &TtrpcContext,
        _request: agent::GetGuestDetailsRequest,
    ) -> ttrpc::Result<agent::GuestDetails> {
        let uts = uname().map_err(|e| internal("uname", e))?;
        let memory = sysinfo().map_err(|e| internal("sysinfo", e))?;
        let cpus = sysconf(SysconfVar::_NPROCESSORS_ONLN)
            .map_err(|e| internal("sysconf", e))?
            .unwrap_or(1);
        Ok(agent::GuestDetails {
            kernel_release: uts.release().to_string_lossy().into_owned(),
            memory_total_bytes: memory.ram_total(),
            online_cpus: cpus as u32,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: PROTOCOL_VERSION,
            boot_times: protobuf::MessageField::some(agent::BootTimes {
                init_started_ns: self.init_started_ns,
                agent_ready_ns: self.agent_ready_ns.get().copied().unwrap_or_default(),
                ..Default::default()
            }),
            wall_clock_ns: boot_clock::wall_clock(),
            ..Default::default()
        })
    }

    async fn power_off(
        &self,
        _ctx: &TtrpcContext,
        _request: agent::PowerOffRequest,
    ) -> ttrpc::Result<agent::Empty> {
        tracing::info!("powering off on request");
        let is_init = self.is_init;
        tokio::spawn(async move {
            tokio::time::sleep(POWER_OFF_DELAY).await;
            if is_init {
                init::end_vm();
            }
            std::process::exit(0);
        });
        Ok(agent::Empty::new())
    }

    async fn plug_virtio_mmio(
        &self,
        _ctx: &TtrpcContext,
        request: agent::PlugVirtioMmioRequest,
    ) -> ttrpc::Result<agent::PlugVirtioMmioResponse> {
        let slot = request.slot;
        let device =
            on_blocking_thread(move || PlatformBus::system().plug(slot, PLUG_TIMEOUT)).await?;
        tracing::info!(slot, device = %device.name, id = device.device_id, driver = ?device.driver, block_device = ?device.block_device, "virtio-mmio device plugged");
        let (block_major, block_minor) = match &device.block_device {
            Some(node) => device_number(node)?,
            None => (0, 0),
        };
        Ok(agent::PlugVirtioMmioResponse {
            device_name: device.name,
            device_id: device.device_id,
            driver: device.driver.unwrap_or_default(),
            block_device: device
                .block_device
                .map(|node| node.to_string_lossy().into_owned())
                .unwrap_or_default(),
            block_major,
            block_minor,
            ..Default::default()
        })
    }

    async fn unplug_virtio_mmio(
        &self,
        _ctx: &TtrpcContext,
        request: agent::UnplugVirtioMmioRequest,
    ) -> ttrpc::Result<agent::Empty> {
        let slot = request.slot;
        on_blocking_thread(move || PlatformBus::system().unplug(slot)).await?;
        tracing::info!(slot, "virtio-mmio device unplugged");
        Ok(agent::Empty::new())
    }

    async fn mount_virtio_fs(
        &self,
        _ctx: &TtrpcContext,
        request: agent::MountVirtioFsRequest,
    ) -> ttrpc::Result<agent::Empty> {
        crate::share::serve_mount(request).await
    }

    async fn mount(
        &self,
        _ctx: &TtrpcContext,
        request: agent::MountRequest,
    ) -> ttrpc::Result<agent::Empty> {
        crate::block_mount::serve_mount(request).await
    }

    async fn unmount(
        &self,
        _ctx: &TtrpcContext,
        request: agent::UnmountRequest,
    ) -> ttrpc::Result<agent::Empty> {
        crate::block_mount::serve_unmount(request).await
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        request: agent::CreateContainerRequest,
    ) -> ttrpc::Result<agent::Empty> {
        self.containers
            .create_container(request)
            .await
            .map_err(container_status)?;
        Ok(agent::Empty::new())
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        request: agent::ExecProcessRequest,
    ) -> ttrpc::Result<agent::Empty> {
        self.containers
            .exec_process(request)
            .await
            .map_err(container_status)?;
        Ok(agent::Empty::new())
    }

    async fn start_process(
        &self,
        _ctx: &TtrpcContext,
        request: agent::ProcessRequest,
    ) -> ttrpc::Result<agent::StartProcessResponse> {
        let pid = self
            .containers
            .start_process(&request.container_id, &request.exec_id)
            .await
            .map_err(container_status)?;
        Ok(agent::StartProcessResponse {
            pid,
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        request: agent::SignalProcessRequest,
    ) -> ttrpc::Result<agent::Empty> {
        self.containers
            .signal_process(request)
            .await
            .map_err(container_status)?;
        Ok(agent::Empty::new())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        request: agent::ProcessRequest,
    ) -> ttrpc::Result<agent::WaitProcessResponse> {
        let exit = self
            .containers
            .wait_process(&request.container_id, &request.exec_id)
            .await
            .map_err(container_status)?;
        Ok(agent::WaitProcessResponse {
            exit_status: exit.status,
            exited_at_ns: exit.at_ns,
            ..Default::default()
        })
    }

    async fn resize_tty(
        &self,
        _ctx: &TtrpcContext,
        request: agent::ResizeTtyRequest,
    ) -> ttrpc::Result<agent::Empty> {
        self.containers
            .resize_tty(&request)
            .map_err(container_status)?;
        Ok(agent::Empty::new())
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        request: agent::ProcessRequest,
    ) -> ttrpc::Result<agent::Empty> {
        self.containers
            .close_stdin(&request.container_id, &request.exec_id)
            .map_err(container_status)?;
        Ok(agent::Empty::new())
    }

    async fn delete_process(
        &self,
        _ctx: &TtrpcContext,
        request: agent::ProcessRequest,
    ) -> ttrpc::Result<agent::Empty> {
        self.containers
            .delete_process(&request.container_id, &request.exec_id)
            .map_err(container_status)?;
        Ok(agent::Empty::new())
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        request: agent::ContainerRequest,
    ) -> ttrpc::Result<agent::ListProcessesResponse> {
        let pids = self
            .containers
            .list_processes(&request.container_id)
            .await
            .map_err(container_status)?;
        Ok(agent::ListProcessesResponse {
            pids,
            ..Default::default()
        })
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        request: agent::ContainerRequest,
    ) -> ttrpc::Result<agent::Empty> {
        self.containers
            .pause(&request.container_id)
            .await
            .map_err(container_status)?;
        Ok(agent::Empty::new())
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        request: agent::ContainerRequest,
    ) -> ttrpc::Result<agent::Empty> {
        self.containers
            .resume(&request.container_id)
            .await
            .map_err(container_status)?;
        Ok(agent::Empty::new())
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        request: agent::UpdateContainerRequest,
    ) -> ttrpc::Result<agent::Empty> {
        self.containers
            .update(request)
            .await
            .map_err(container_status)?;
        Ok(agent::Empty::new())
    }

    async fn container_stats(
        &self,
        _ctx: &TtrpcContext,
        request: agent::ContainerRequest,
    ) -> ttrpc::Result<agent::ContainerStats> {
        self.containers
            .stats(&request.container_id)
            .await
            .map_err(container_status)
    }

    async fn configure_network(
        &self,
        _ctx: &TtrpcContext,
        request: agent::ConfigureNetworkRequest,
    ) -> ttrpc::Result<agent::Empty> {
        let plan = network::plan(&request).map_err(network_status)?;
        if !self.is_init {
            // Outside a VM it would reconfigure the machine it runs on.
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::FAILED_PRECONDITION,
                "runv-agent is not PID 1 of a VM: it leaves this machine's network alone",
            )));
        }
        tokio::task::spawn_blocking(move || network::configure(&plan, network::NIC_WAIT))
            .await
            .map_err(|e| internal("network task", e))?
            .map_err(network_status)?;
        Ok(agent::Empty::new())
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        request: agent::ContainerRequest,
    ) -> ttrpc::Result<agent::Empty> {
        self.containers
            .remove_container(&request.container_id)
            .await
            .map_err(container_status)?;
        Ok(agent::Empty::new())
    }
}
