//! The agent protocol's service: health check, guest details, power off.

use std::{sync::OnceLock, time::Duration};

use async_trait::async_trait;
use nix::{
    sys::{sysinfo::sysinfo, utsname::uname},
    unistd::{sysconf, SysconfVar},
};
use runv_protocol::{agent, agent_ttrpc, PROTOCOL_VERSION};
use ttrpc::r#async::TtrpcContext;

use crate::{boot_clock, init};

/// How long the power-off reply has to leave the guest before it resets.
const POWER_OFF_DELAY: Duration = Duration::from_millis(20);

pub struct AgentService {
    init_started_ns: u64,
    agent_ready_ns: OnceLock<u64>,
    is_init: bool,
}

impl AgentService {
    pub fn new(init_started_ns: u64, is_init: bool) -> Self {
        AgentService {
            init_started_ns,
            agent_ready_ns: OnceLock::new(),
            is_init,
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
}
