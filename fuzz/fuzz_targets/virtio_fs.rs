//! virtio-fs's FUSE requests (crates/runv-vmm/src/virtio/fs: the device,
//! its gate, and fuse-backend-rs's server and passthrough file system)
//! with a hostile driver, on a read-only share of a file and a directory.
//!
//! Read-only because the requests are served on the fuzzer's thread, not
//! on the worker whose root is the share (the device's containment in
//! production): the fuzzer must not change anything on the host. The
//! device is made as in production, worker included (it enters the share,
//! which takes root), and the worker is stopped at once.
#![no_main]

use std::{fs, path::PathBuf, sync::OnceLock};

use libfuzzer_sys::fuzz_target;
use runv_fuzz::{scratch, virtio::HostileDriver};
use runv_vmm::virtio::fs::{Fs, FsConfig};

fn share() -> PathBuf {
    static SHARE: OnceLock<PathBuf> = OnceLock::new();
    SHARE
        .get_or_init(|| {
            let share = scratch::dir().join("share");
            fs::create_dir_all(share.join("dir")).expect("the share");
            fs::write(share.join("file"), b"hello from the host\n").expect("a shared file");
            share
        })
        .clone()
}

fuzz_target!(|input: &[u8]| {
    let (device, worker) = Fs::new(FsConfig {
        tag: "fuzz".into(),
        shared_dir: share(),
        read_only: true,
    })
    .expect("an fs device (the fs target runs as root)");
    worker.stop();
    HostileDriver::for_shared(device).run(input, |_, _| {});
});
