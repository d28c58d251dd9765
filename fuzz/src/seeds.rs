//! The seed corpus of every target: realistic inputs the fuzzer starts
//! from, written to fuzz/corpus/<target>/ by `cargo run --example
//! make_seeds` (scripts/fuzz --seeds).

use crate::{
    script::Script,
    virtio::{publish_chain, Part},
};

/// A target's seeds: file name and contents.
pub type Seeds = Vec<(&'static str, Vec<u8>)>;

/// Every target's seeds, by target name.
pub fn all() -> Vec<(&'static str, Seeds)> {
    vec![("virtio_blk", virtio_blk())]
}

/// `struct virtio_blk_outhdr`: type, reserved, sector.
fn blk_header(request_type: u32, sector: u64) -> Vec<u8> {
    let mut header = request_type.to_le_bytes().to_vec();
    header.extend_from_slice(&[0; 4]);
    header.extend_from_slice(&sector.to_le_bytes());
    header
}

/// A discard or write-zeroes range: sector, sectors, flags.
fn blk_range(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut range = sector.to_le_bytes().to_vec();
    range.extend_from_slice(&sectors.to_le_bytes());
    range.extend_from_slice(&flags.to_le_bytes());
    range
}

fn virtio_blk() -> Seeds {
    let one = |parts: &[Part]| publish_chain(Script::new(), 0, 0, parts).into_bytes();
    let read = blk_header(0, 1);
    let write = blk_header(1, 2);
    let data = [0x5a; 512];
    let flush = blk_header(4, 0);
    let get_id = blk_header(8, 0);
    let discard = blk_header(11, 0);
    let write_zeroes = blk_header(13, 0);
    let range = blk_range(4, 2, 0);
    let unmap_range = blk_range(8, 1, 1);
    vec![
        (
            "read",
            one(&[Part::Read(&read), Part::Write(512), Part::Write(1)]),
        ),
        (
            "write",
            one(&[Part::Read(&write), Part::Read(&data), Part::Write(1)]),
        ),
        ("flush", one(&[Part::Read(&flush), Part::Write(1)])),
        (
            "get_id",
            one(&[Part::Read(&get_id), Part::Write(20), Part::Write(1)]),
        ),
        (
            "discard",
            one(&[Part::Read(&discard), Part::Read(&range), Part::Write(1)]),
        ),
        (
            "write_zeroes",
            one(&[
                Part::Read(&write_zeroes),
                Part::Read(&unmap_range),
                Part::Write(1),
            ]),
        ),
        (
            "write_then_read",
            publish_chain(
                publish_chain(
                    Script::new(),
                    0,
                    0,
                    &[Part::Read(&write), Part::Read(&data), Part::Write(1)],
                ),
                0,
                1,
                &[
                    Part::Read(&blk_header(0, 2)),
                    Part::Write(512),
                    Part::Write(1),
                ],
            )
            .into_bytes(),
        ),
    ]
}
