//! The shim-to-agent protocol of runv: protobuf messages and ttrpc services,
//! generated at build time, plus the constants both sides must agree on.

/// Protobuf messages of `protos/agent.proto`.
#[allow(warnings, clippy::all)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

pub mod port_forward;
pub mod stdio;

/// ttrpc client and server stubs of the `Agent` service.
#[allow(warnings, clippy::all)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// The protocol version this build speaks. Bump it whenever a message or a
/// method changes meaning; the shim refuses an agent of another version.
pub const PROTOCOL_VERSION: u32 = 8;

/// The vsock port on which the agent serves ttrpc.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The host vsock port the agent dials once it serves, so that the host
/// connects only when the agent is there instead of polling a booting
/// guest. Through a hybrid vsock socket `S`, the host listens on `S_1025`.
pub const AGENT_READY_VSOCK_PORT: u32 = 1025;

/// What the agent writes on its ready connection.
pub const AGENT_READY_MESSAGE: &[u8] = b"READY\n";

/// The guest vsock port of standard I/O streams. The host opens one
/// connection per stream of a process and first writes one line,
/// `<container id> <exec id or -> <stdin|stdout|stderr>\n`; the connection
/// then carries that stream's bytes only: host to guest for stdin (the
/// host's half-close is the process's end-of-file), guest to host for
/// stdout and stderr (the agent closes it once the process's end of the
/// pipe or terminal is closed and everything is sent). A terminal
/// process has no stderr stream: its stdout carries the terminal.
pub const STDIO_VSOCK_PORT: u32 = 1026;

/// The guest vsock port of port-forwarding (CRI PortForward, `kubectl
/// port-forward`). The host opens one connection per forwarded TCP
/// connection and writes the guest port as one line (`8080\n`); the agent
/// connects to that port on the guest's loopback (else on the guest's own
/// addresses), answers `OK\n` or `ERR <why>\n`, and then relays bytes
/// both ways until either side closes (see [`port_forward`]).
pub const PORT_FORWARD_VSOCK_PORT: u32 = 1027;

/// The exec ID written in a stdio stream's first line for a container's
/// init process, whose exec ID is empty.
pub const INIT_PROCESS_STREAM_ID: &str = "-";

/// The virtio-fs tag of the directory the host shares with the guest for
/// container root file systems and volumes.
pub const SHARED_FS_TAG: &str = "runv-shared";

/// Where the agent mounts the shared directory in the guest.
pub const GUEST_SHARED_DIR: &str = "/run/runv/shared";
