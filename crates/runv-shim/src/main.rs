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

fn main() {
    // One malloc arena for the whole shim: glibc otherwise gives each
    // thread that allocates (tokio workers, the VMM's device, vCPU and
    // virtio-fs threads) an arena of its own, whose freed memory stays
    // resident; measured in the nested bed, 0.7 MiB more per pod. The
    // shim's threads allocate little, so they seldom wait on the lock.
    // SAFETY: mallopt only sets glibc's allocator parameters; no other
    // thread exists yet.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    // One shim serves one pod: two workers keep its calls, streams and
    // agent connection moving, where tokio's default (a worker per host
    // CPU) would give every pod dozens of threads and stacks on a large
    // node. The VM's vCPUs and devices run on the VMM's own threads.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the shim's tokio runtime starts")
        .block_on(serve());
}

async fn serve() {
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
