//! The agent's decoding of what the host sends (guest/agent): the first
//! line of a stdio or port-forward connection (request_line.rs, then
//! runv-protocol's StreamHeader::parse and port_forward::parse_request),
//! and ttrpc requests as the agent's ttrpc server decodes them: the
//! request envelope, the method's protobuf message and, for
//! ConfigureNetwork, the agent's validation of the pod network
//! (network.rs's `plan`).
//!
//! The input's first byte picks the stdio line (0), the port-forward line
//! (1) or a ttrpc request (anything else); the rest is what the host sent.
#![no_main]

// The agent's own modules, from its files (it is a binary crate).
#[path = "../../guest/agent/src/request_line.rs"]
mod request_line;
// Only `plan` is reached; the rest of the module configures the kernel.
#[allow(dead_code)]
#[path = "../../guest/agent/src/network.rs"]
mod network;

use libfuzzer_sys::fuzz_target;
use protobuf::Message;
use runv_protocol::{agent, port_forward, stdio};

/// Decodes `payload` as the message of ttrpc method `method`, as the
/// server does before calling the agent's service.
fn decode_request(method: &str, payload: &[u8]) {
    fn decode<M: Message>(payload: &[u8]) -> Option<M> {
        M::parse_from_bytes(payload).ok()
    }
    match method {
        "ConfigureNetwork" => {
            if let Some(request) = decode::<agent::ConfigureNetworkRequest>(payload) {
                let _ = network::plan(&request);
            }
        }
        "Check" => drop(decode::<agent::CheckRequest>(payload)),
        "PlugVirtioMmio" => drop(decode::<agent::PlugVirtioMmioRequest>(payload)),
        "Mount" => drop(decode::<agent::MountRequest>(payload)),
        "MountVirtioFs" => drop(decode::<agent::MountVirtioFsRequest>(payload)),
        "CreateContainer" => drop(decode::<agent::CreateContainerRequest>(payload)),
        "ExecProcess" => drop(decode::<agent::ExecProcessRequest>(payload)),
        "SignalProcess" => drop(decode::<agent::SignalProcessRequest>(payload)),
        "ResizeTty" => drop(decode::<agent::ResizeTtyRequest>(payload)),
        "UpdateContainer" => drop(decode::<agent::UpdateContainerRequest>(payload)),
        _ => drop(decode::<agent::ProcessRequest>(payload)),
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&kind, mut bytes)) = input.split_first() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    match kind {
        0 => {
            let line = runtime.block_on(request_line::read(
                &mut bytes,
                stdio::MAX_HEADER_LEN,
                "stdio header",
            ));
            if let Ok(line) = line {
                let _ = stdio::StreamHeader::parse(&line);
            }
        }
        1 => {
            let line = runtime.block_on(request_line::read(
                &mut bytes,
                port_forward::MAX_REQUEST_LEN,
                "port-forward request",
            ));
            if let Ok(line) = line {
                let _ = port_forward::parse_request(&line);
            }
        }
        _ => {
            if let Ok(request) = ttrpc::proto::Request::parse_from_bytes(bytes) {
                decode_request(&request.method, &request.payload);
            }
        }
    }
});
