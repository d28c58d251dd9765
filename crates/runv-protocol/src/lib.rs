//! The shim-to-agent protocol of runv: protobuf messages and ttrpc services,
//! generated at build time, plus the constants both sides must agree on.

/// Protobuf messages of `protos/agent.proto`.
#[allow(warnings, clippy::all)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// ttrpc client and server stubs of the `Agent` service.
#[allow(warnings, clippy::all)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// The protocol version this build speaks. Bump it whenever a message or a
/// method changes meaning; the shim refuses an agent of another version.
pub const PROTOCOL_VERSION: u32 = 2;

/// The vsock port on which the agent serves ttrpc.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The host vsock port the agent dials once it serves, so that the host
/// connects only when the agent is there instead of polling a booting
/// guest. Through a hybrid vsock socket `S`, the host listens on `S_1025`.
pub const AGENT_READY_VSOCK_PORT: u32 = 1025;

/// What the agent writes on its ready connection.
pub const AGENT_READY_MESSAGE: &[u8] = b"READY\n";
