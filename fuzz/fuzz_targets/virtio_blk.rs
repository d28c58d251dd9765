//! virtio-blk's request handling (crates/runv-vmm/src/virtio/block) with a
//! hostile driver, on a 64 KiB image file.
#![no_main]

use std::{fs::File, path::PathBuf, sync::OnceLock};

use libfuzzer_sys::fuzz_target;
use runv_fuzz::{scratch, virtio::HostileDriver};
use runv_vmm::virtio::block::{Block, BlockConfig};

/// 128 sectors: small, so that sectors the fuzzer picks are often valid.
const IMAGE_SIZE: u64 = 0x1_0000;

fn image() -> PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let path = scratch::dir().join("disk.img");
            File::create(&path)
                .and_then(|file| file.set_len(IMAGE_SIZE))
                .expect("the block image");
            path
        })
        .clone()
}

fuzz_target!(|input: &[u8]| {
    let device = Block::new(BlockConfig {
        path: image(),
        read_only: false,
        serial: "fuzz".into(),
    })
    .expect("a block device");
    HostileDriver::for_shared(device).run(input, |_, _| {});
});
