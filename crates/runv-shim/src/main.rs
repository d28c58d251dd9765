//! `containerd-shim-runv-v2`: containerd's shim v2 for runtime
//! `io.containerd.runv.v2`, one shim process and one microVM per pod.

mod container;
mod devices;
mod disks;
mod error;
mod events;
mod host_cgroup;
mod mounts;
mod namespaces;
mod network;
mod oom;
mod options;
mod pod;
mod port_forward;
mod process;
mod service;
mod shim;
mod sizing;
mod spec;
mod stats;
mod stdio;

use std::io::Write;

use containerd_shim::protos::{
    protobuf::{Message, MessageField},
    types::introspection::{RuntimeInfo, RuntimeVersion},
};

/// The runtime name containerd knows this shim by.
const RUNTIME_ID: &str = "io.containerd.runv.v2";

// One shim serves one pod: two workers keep its calls, streams and agent
// connection moving, where tokio's default (a worker per host CPU) would
// give every pod dozens of threads, stacks and malloc arenas on a large
// node. The VM's vCPUs and devices run on the VMM's own threads.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // containerd 2 asks `-info` of a runtime; containerd-shim 0.10 leaves
    // that flag to the shim.
    if std::env::args().any(|arg| arg == "-info" || arg == "--info") {
        print_info();
        return;
    }
    containerd_shim::asynchronous::run::<shim::RunvShim>(RUNTIME_ID, Some(shim::shim_config()))
        .await;
}

fn print_info() {
    let info = RuntimeInfo {
        name: RUNTIME_ID.into(),
        version: MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let bytes = info.write_to_bytes().expect("RuntimeInfo encodes");
    let mut stdout = std::io::stdout();
    if stdout
        .write_all(&bytes)
        .and_then(|()| stdout.flush())
        .is_err()
    {
        std::process::exit(1);
    }
}
