//! The host's decoding of what a hostile agent sends back
//! (crates/runv-agent-client, runv-protocol): the hybrid vsock handshake
//! reply (hybrid_vsock.rs), the port-forward reply (port_forward.rs), and
//! ttrpc responses of the agent's methods as the shim's ttrpc client
//! decodes them (frames, status, protobuf messages).
//!
//! The input's first byte picks the call; the rest is everything the
//! agent writes: its first line once it has read `CONNECT <port>\n`, the
//! rest once it has read the host's request; then it closes.
#![no_main]

use std::{path::Path, time::Duration};

use libfuzzer_sys::fuzz_target;
use runv_agent_client::{hybrid_vsock, port_forward};
use runv_fuzz::scratch;
use runv_protocol::{agent, agent_ttrpc::AgentClient};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
};

/// Past this a call is stuck: the agent has closed its end long before.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The hostile agent: answers one connection with `reply`, split where
/// the protocol has the host speak: the first line is the handshake reply
/// to `CONNECT`; the rest goes once the host's request has arrived (a
/// port-forward line, or a ttrpc frame: a response before its request is
/// one the client never asked for).
async fn agent(listener: UnixListener, port_forward: bool, reply: Vec<u8>) {
    let Ok((stream, _)) = listener.accept().await else {
        return;
    };
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    if stream.read_line(&mut line).await.is_err() {
        return;
    }
    let split = reply
        .iter()
        .position(|&byte| byte == b'\n')
        .map_or(reply.len(), |newline| newline + 1);
    let (handshake, answer) = reply.split_at(split);
    // Without a whole line the host still waits for the handshake: close.
    if stream.get_mut().write_all(handshake).await.is_err() || !handshake.ends_with(b"\n") {
        return;
    }
    let request = if port_forward {
        stream.read_line(&mut line).await.map(drop)
    } else {
        read_ttrpc_frame(&mut stream).await
    };
    if request.is_ok() {
        let _ = stream.get_mut().write_all(answer).await;
    }
}

/// Reads one ttrpc frame: a 10-byte header whose first 4 bytes are the
/// payload's length (big-endian), then the payload.
async fn read_ttrpc_frame(stream: &mut (impl AsyncRead + Unpin)) -> std::io::Result<()> {
    let mut header = [0u8; 10];
    stream.read_exact(&mut header).await?;
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    tokio::io::copy(&mut stream.take(u64::from(len)), &mut tokio::io::sink()).await?;
    Ok(())
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
        let agent = tokio::spawn(agent(listener, call == 0, reply.to_vec()));
        tokio::time::timeout(CALL_TIMEOUT * 2, host(&socket, call))
            .await
            .expect("a call that ends once the agent has closed the connection");
        agent.abort();
    });
});
