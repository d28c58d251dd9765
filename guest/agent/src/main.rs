//! runv-agent: PID 1 of a runv pod VM. It brings up the minimal system
//! (pseudo file systems, console, orphan reaping) and serves the agent
//! protocol to the shim over vsock.

mod block_mount;
mod boot_clock;
mod cgroup_stats;
mod containers;
mod host_only;
mod hotplug;
mod init;
mod network;
mod oci_runtime;
mod port_forward;
mod process_io;
mod process_spec;
mod ready;
mod reaper;
mod request_line;
mod root_switch;
mod service;
mod share;
mod shared_pid;
mod stdio_listener;
mod tty;

use std::{process, sync::Arc};

use runv_protocol::{agent_ttrpc, AGENT_VSOCK_PORT};
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};
use tracing::Level;
use ttrpc::r#async::transport::Listener;

fn main() {
    let is_init = process::id() == 1;
    let init_started = boot_clock::now();
    if is_init {
        if let Err(e) = root_switch::leave_initramfs() {
            fatal(is_init, &format!("cannot leave the initramfs: {e}"));
        }
        if let Err(e) = init::set_up_system() {
            fatal(is_init, &format!("cannot set up the guest system: {e}"));
        }
    }
    let level = init::kernel_param("runv.log_level")
        .and_then(|level| level.parse::<Level>().ok())
        .unwrap_or(Level::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        // No wall-clock stamps: it reads 1970 until the host sets it.
        .without_time()
        .init();

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => fatal(is_init, &format!("cannot start the async runtime: {e}")),
    };
    if let Err(e) = runtime.block_on(serve(init_started, is_init)) {
        fatal(is_init, &format!("cannot serve the agent protocol: {e}"));
    }
}

async fn serve(init_started: u64, is_init: bool) -> ttrpc::Result<()> {
    // Container processes are the agent's children whether or not it is
    // PID 1; as PID 1 it reaps every orphan too.
    let reaper = reaper::Reaper::new();
    tokio::spawn(reaper.clone().run());
    let containers = Arc::new(containers::Containers::new(reaper));
    let stdio = stdio_listener::listen()
        .map_err(|e| ttrpc::Error::Others(format!("listening for stdio streams: {e}")))?;
    tokio::spawn(stdio_listener::serve(stdio, containers.clone()));
    let forwards = port_forward::listen()
        .map_err(|e| ttrpc::Error::Others(format!("listening for port-forwards: {e}")))?;
    tokio::spawn(port_forward::serve(forwards));
    let service = service::AgentService::new(init_started, is_init, containers);
    let service = Arc::new(service);
    let listener =
        VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, AGENT_VSOCK_PORT)).map_err(|e| {
            ttrpc::Error::Others(format!("listening on vsock port {AGENT_VSOCK_PORT}: {e}"))
        })?;
    // The agent accepts, so that ttrpc only ever sees the host's connections.
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(Listener::new(host_only::incoming(listener)))
        .register_service(agent_ttrpc::create_agent(service.clone()));
    server.start().await?;
    service.mark_ready(boot_clock::now());
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        port = AGENT_VSOCK_PORT,
        "runv-agent ready"
    );
    tokio::spawn(ready::notify_host());
    // The server runs on the runtime's tasks until the VM powers off.
    std::future::pending().await
}

/// PID 1 must never exit (the kernel would panic): report the failure on
/// the console and reset the VM, which ends it.
fn fatal(is_init: bool, message: &str) -> ! {
    eprintln!("runv-agent: fatal: {message}");
    if is_init {
        init::end_vm();
    }
    process::exit(1)
}
