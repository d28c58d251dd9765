//! The host's decoding of what a hostile agent sends back
//! (crates/runv-agent-client, runv-protocol): the hybrid vsock handshake
//! reply (hybrid_vsock.rs), the port-forward reply (port_forward.rs), and
//! ttrpc responses of the agent's methods as the shim's ttrpc client
//! decodes them (frames, status, protobuf messages).
//!
//! The input's first byte picks the call; the rest is everything the
//! agent writes to the connection after reading `CONNECT <port>\n`,
//! before it closes it.
#![no_main]

use std::{path::Path, time::Duration};

use libfuzzer_sys::fuzz_target;
use runv_agent_client::{hybrid_vsock, port_forward};
use runv_fuzz::scratch;
use runv_protocol::{agent, agent_ttrpc::AgentClient};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
};

/// Past this a call is stuck: the agent has closed its end long before.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The hostile agent: answers one connection with `reply`, then closes.
async fn agent(listener: UnixListener, reply: Vec<u8>) {
    let Ok((stream, _)) = listener.accept().await else {
        return;
    };
    let mut stream = BufReader::new(stream);
    let mut connect = String::new();
    if stream.read_line(&mut connect).await.is_ok() {
        let _ = stream.get_mut().write_all(&reply).await;
    }
}

/// One call of the shim's, picked by `call`; what it returns is dropped:
/// any answer but a panic or a hang is fine.
async fn host(socket: &Path, call: u8) {
    if call == 0 {
        let _ = port_forward::open(socket, 8080).await;
        return;
    }
    let Ok(stream) = hybrid_vsock::connect(socket, runv_protocol::AGENT_VSOCK_PORT).await else {
        return;
    };
    let client = AgentClient::new(ttrpc::r#async::Client::new(stream.into()));
    let context = || ttrpc::context::with_timeout(CALL_TIMEOUT.as_nanos() as i64);
    let process = agent::ProcessRequest::new();
    let container = agent::ContainerRequest::new();
    let _ = match call % 7 {
        1 => client
            .check(context(), &agent::CheckRequest::new())
            .await
            .map(drop),
        2 => client
            .get_guest_details(context(), &agent::GetGuestDetailsRequest::new())
            .await
            .map(drop),
        3 => client
            .plug_virtio_mmio(context(), &agent::PlugVirtioMmioRequest::new())
            .await
            .map(drop),
        4 => client.wait_process(context(), &process).await.map(drop),
        5 => client.list_processes(context(), &container).await.map(drop),
        _ => client
            .container_stats(context(), &container)
            .await
            .map(drop),
    };
}

fuzz_target!(|input: &[u8]| {
    let Some((&call, reply)) = input.split_first() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let socket = scratch::dir().join("agent.sock");
    runtime.block_on(async {
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).expect("the agent's socket");
        let agent = tokio::spawn(agent(listener, reply.to_vec()));
        tokio::time::timeout(CALL_TIMEOUT * 2, host(&socket, call))
            .await
            .expect("a call that ends once the agent has closed the connection");
        agent.abort();
    });
});
