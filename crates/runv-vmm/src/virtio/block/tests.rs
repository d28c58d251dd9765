//! The device end to end: a driver plays the guest on hand-driven rings in
//! guest memory, a real event loop runs the device, an image file in a
//! temporary directory is the backend.

use std::{
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use virtio_bindings::{
    virtio_blk::*,
    virtio_mmio::VIRTIO_MMIO_CONFIG,
    virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE},
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{Block, BlockConfig, DEVICE_TYPE};
use crate::{
    bus::BusDevice,
    event_loop::EventLoop,
    memory::create_guest_memory,
    virtio::{
        queue_device::QueueDevice,
        test_driver::{
            activate_directly, mmio_transport, set_up_through_mmio, Desc, Kick, QueueDriver,
            BUFFER_SLOT, RING_SIZE,
        },
        VirtioDevice,
    },
};

const MEMORY_SIZE: u64 = 16 << 20;
const RING_BASE: u64 = 0;
const BUFFERS: u64 = 0x10_0000;
const IMAGE_SIZE: u64 = 1 << 20;
const SECTOR: u64 = 512;
const SERIAL: &str = "runv-test-disk";

/// The guest side of one block device.
struct Guest {
    queue: QueueDriver,
    device: Arc<Mutex<QueueDevice<Block>>>,
    irq: EventFd,
    image: PathBuf,
    _event_loop: EventLoop,
    _dir: tempfile::TempDir,
}

/// A patterned image file and a device on it, not yet activated.
fn device(
    read_only: bool,
) -> (
    Arc<Mutex<QueueDevice<Block>>>,
    EventLoop,
    PathBuf,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let pattern: Vec<u8> = (0..IMAGE_SIZE).map(|i| (i % 251) as u8).collect();
    std::fs::write(&image, pattern).unwrap();
    let device = Block::new(BlockConfig {
        path: image.clone(),
        read_only,
        serial: SERIAL.into(),
    })
    .unwrap();
    let event_loop = EventLoop::spawn("blk-test").unwrap();
    event_loop.add_subscriber(device.clone()).unwrap();
    (device, event_loop, image, dir)
}

/// A device activated directly, kicked through its queue eventfd.
fn guest(read_only: bool) -> Guest {
    let (device, event_loop, image, dir) = device(read_only);
    activated(device, event_loop, image, dir)
}

/// `device` (served by `event_loop`, backed by `image`) activated directly.
fn activated(
    device: Arc<Mutex<QueueDevice<Block>>>,
    event_loop: EventLoop,
    image: PathBuf,
    dir: tempfile::TempDir,
) -> Guest {
    let memory = create_guest_memory(MEMORY_SIZE).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let (mut rings, mut kicks) =
        activate_directly(&mut device.clone(), &memory, &[RING_BASE], &irq);
    Guest {
        queue: QueueDriver {
            memory,
            ring: rings.remove(0),
            kick: Kick::Eventfd(kicks.remove(0)),
            queue: 0,
            buffers: BUFFERS,
        },
        device,
        irq,
        image,
        _event_loop: event_loop,
        _dir: dir,
    }
}

fn header(request_type: u32, sector: u64) -> Vec<u8> {
    let mut header = request_type.to_le_bytes().to_vec();
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&sector.to_le_bytes());
    header
}

/// A discard or write-zeroes range.
fn range(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut range = sector.to_le_bytes().to_vec();
    range.extend_from_slice(&sectors.to_le_bytes());
    range.extend_from_slice(&flags.to_le_bytes());
    range
}

/// What came back of a request.
struct Answer {
    status: u8,
    used: u32,
    /// What the device wrote before the status byte.
    data: Vec<u8>,
}

impl Guest {
    /// A request as Linux lays it out: header, data to write or room to
    /// read into, status.
    fn request(&mut self, request_type: u32, sector: u64, out: &[u8], in_len: u32) -> Answer {
        let mut descs = vec![Desc::Read(header(request_type, sector))];
        if !out.is_empty() {
            descs.push(Desc::Read(out.to_vec()));
        }
        if in_len > 0 {
            descs.push(Desc::Write(in_len));
        }
        descs.push(Desc::Write(1));
        let (used, mut written) = self.queue.submit(&descs);
        let status = written.pop().unwrap()[0];
        Answer {
            status,
            used,
            data: written.pop().unwrap_or_default(),
        }
    }

    fn image(&self) -> Vec<u8> {
        std::fs::read(&self.image).unwrap()
    }

    fn features(&self) -> u64 {
        self.device.features()
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn reads_and_writes_reach_the_backing_file() {
    let mut guest = guest(false);
    let before = guest.image();
    let read = guest.request(VIRTIO_BLK_T_IN, 2, &[], 1024);
    assert_eq!((read.status, read.used), (OK, 1024 + 1));
    assert_eq!(read.data, before[1024..2048]);

    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let write = guest.request(VIRTIO_BLK_T_OUT, 8, &data, 0);
    assert_eq!((write.status, write.used), (OK, 1));
    let after = guest.image();
    assert_eq!(after[4096..8192], data[..]);
    assert_eq!(after[..4096], before[..4096], "nothing else changed");
    assert_eq!(after[8192..], before[8192..]);
    assert!(guest.irq.read().unwrap() > 0, "the guest was interrupted");

    // Data split over several descriptors, as a scattered page list is.
    let (used, written) = guest.queue.submit(&[
        Desc::Read(header(VIRTIO_BLK_T_IN, 8)),
        Desc::Write(512),
        Desc::Write(3584),
        Desc::Write(1),
    ]);
    assert_eq!(used, 4096 + 1);
    assert_eq!([&written[0][..], &written[1][..]].concat(), data);
    assert_eq!(written[2], [OK]);
}

#[test]
fn flush_discard_and_write_zeroes_reach_the_backing_file() {
    let mut guest = guest(false);
    for feature in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
    ] {
        assert_ne!(guest.features() & 1 << feature, 0, "feature {feature}");
    }
    assert_eq!(guest.features() & 1 << VIRTIO_BLK_F_RO, 0);
    assert_eq!(guest.request(VIRTIO_BLK_T_FLUSH, 0, &[], 0).status, OK);

    let blocks = std::fs::metadata(&guest.image).unwrap().blocks();
    // 64 KiB at 128 KiB: whole file-system blocks, so the hole is real.
    let discard = guest.request(VIRTIO_BLK_T_DISCARD, 256, &range(256, 128, 0), 0);
    assert_eq!((discard.status, discard.used), (OK, 1));
    let image = guest.image();
    assert!(image[128 << 10..192 << 10].iter().all(|&b| b == 0));
    assert_ne!(image[(128 << 10) - 1], 0, "the byte before is kept");
    assert!(
        std::fs::metadata(&guest.image).unwrap().blocks() < blocks,
        "space freed"
    );
    assert_eq!(image.len() as u64, IMAGE_SIZE, "the size is kept");

    // Two ranges, one of them allowed to unmap.
    let ranges = [
        range(8, 1, 0),
        range(20, 3, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
    ]
    .concat();
    let zeroes = guest.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &ranges, 0);
    assert_eq!(zeroes.status, OK);
    let image = guest.image();
    assert!(image[8 * 512..9 * 512].iter().all(|&b| b == 0));
    assert!(image[20 * 512..23 * 512].iter().all(|&b| b == 0));
    assert_ne!(image[9 * 512 + 1], 0);

    let unmapping_discard = guest.request(
        VIRTIO_BLK_T_DISCARD,
        0,
        &range(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
        0,
    );
    assert_eq!(
        unmapping_discard.status, UNSUPP,
        "the flag is reserved for discard"
    );
    let beyond = guest.request(
        VIRTIO_BLK_T_DISCARD,
        0,
        &range(IMAGE_SIZE / SECTOR, 1, 0),
        0,
    );
    assert_eq!(beyond.status, IOERR);
    let ragged = guest.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[0; 10], 0);
    assert_eq!(ragged.status, IOERR, "ranges are 16 bytes each");
}

#[test]
fn get_id_returns_the_owners_serial() {
    let mut guest = guest(false);
    let id = guest.request(VIRTIO_BLK_T_GET_ID, 0, &[], VIRTIO_BLK_ID_BYTES);
    assert_eq!((id.status, id.used), (OK, VIRTIO_BLK_ID_BYTES + 1));
    let mut expected = SERIAL.as_bytes().to_vec();
    expected.resize(VIRTIO_BLK_ID_BYTES as usize, 0);
    assert_eq!(id.data, expected);

    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, [0; 512]).unwrap();
    let too_long = Block::new(BlockConfig {
        path: image,
        read_only: false,
        serial: "x".repeat(21),
    });
    assert!(too_long.is_err());
    let missing = Block::new(BlockConfig {
        path: dir.path().join("missing.img"),
        read_only: false,
        serial: String::new(),
    });
    assert!(missing.is_err());
}

#[test]
fn a_read_only_device_refuses_every_write() {
    let mut guest = guest(true);
    assert_ne!(guest.features() & 1 << VIRTIO_BLK_F_RO, 0);
    assert_eq!(guest.features() & 1 << VIRTIO_BLK_F_DISCARD, 0);
    assert_eq!(guest.features() & 1 << VIRTIO_BLK_F_WRITE_ZEROES, 0);
    let before = guest.image();
    let write = guest.request(VIRTIO_BLK_T_OUT, 0, &[0x55; 512], 0);
    assert_eq!((write.status, write.used), (IOERR, 1));
    let discard = guest.request(VIRTIO_BLK_T_DISCARD, 0, &range(0, 1, 0), 0);
    assert_eq!(discard.status, IOERR);
    let zeroes = guest.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &range(0, 1, 0), 0);
    assert_eq!(zeroes.status, IOERR);
    assert_eq!(guest.image(), before, "not a byte written");
    let read = guest.request(VIRTIO_BLK_T_IN, 0, &[], 512);
    assert_eq!((read.status, read.data), (OK, before[..512].to_vec()));
}

#[test]
fn requests_beyond_the_capacity_or_unknown_fail() {
    let mut guest = guest(false);
    let mut capacity = [0u8; 8];
    guest.device.read_config(0, &mut capacity);
    let sectors = IMAGE_SIZE / SECTOR;
    assert_eq!(u64::from_le_bytes(capacity), sectors);
    let mut seg_max = [0u8; 4];
    guest.device.read_config(12, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), 254);

    let last = guest.request(VIRTIO_BLK_T_IN, sectors - 1, &[], 512);
    assert_eq!(last.status, OK);
    let past_the_end = guest.request(VIRTIO_BLK_T_IN, sectors - 1, &[], 1024);
    assert_eq!((past_the_end.status, past_the_end.used), (IOERR, 1));
    let beyond = guest.request(VIRTIO_BLK_T_OUT, sectors, &[1; 512], 0);
    assert_eq!(beyond.status, IOERR);
    let overflowing = guest.request(VIRTIO_BLK_T_IN, u64::MAX / 256, &[], 512);
    assert_eq!(overflowing.status, IOERR, "sector * 512 overflows");
    let partial_sector = guest.request(VIRTIO_BLK_T_IN, 0, &[], 100);
    assert_eq!(partial_sector.status, IOERR);
    let unknown = guest.request(99, 0, &[], 0);
    assert_eq!((unknown.status, unknown.used), (UNSUPP, 1));
    assert_eq!(guest.image().len() as u64, IMAGE_SIZE);
}

#[test]
fn malformed_chains_are_answered_or_returned_and_the_device_goes_on() {
    let mut guest = guest(false);
    // The status descriptor is not writable: nothing to answer in.
    let (used, _) = guest
        .queue
        .submit(&[Desc::Read(header(VIRTIO_BLK_T_IN, 0)), Desc::Read(vec![0])]);
    assert_eq!(used, 0);
    // The header is in a write-only descriptor.
    let (used, written) = guest.queue.submit(&[Desc::Write(16), Desc::Write(1)]);
    assert_eq!((used, written[1][0]), (1, IOERR));
    // A readable descriptor after a writable one.
    let (_, written) = guest.queue.submit(&[
        Desc::Read(header(VIRTIO_BLK_T_OUT, 0)),
        Desc::Write(512),
        Desc::Read(vec![0; 512]),
        Desc::Write(1),
    ]);
    assert_eq!(written[1][0], IOERR);
    // A header split over two descriptors is fine.
    let header = header(VIRTIO_BLK_T_IN, 1);
    let (used, written) = guest.queue.submit(&[
        Desc::Read(header[..5].to_vec()),
        Desc::Read(header[5..].to_vec()),
        Desc::Write(512),
        Desc::Write(1),
    ]);
    assert_eq!((used, written[1][0]), (513, OK));

    // A data buffer that runs past the end of guest memory.
    let queue = &mut guest.queue;
    let chain = [(16, false), (512, true), (1, true)];
    let indices = queue.ring.add_chain(&queue.memory, &chain, |index| {
        BUFFERS + u64::from(index) * BUFFER_SLOT
    });
    let flags = (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16;
    let past_ram = Descriptor::new(MEMORY_SIZE - 256, 512, flags, indices[2]);
    queue.ring.write_desc(&queue.memory, indices[1], past_ram);
    let header = self::header(VIRTIO_BLK_T_IN, 0);
    let at = GuestAddress(queue.buffer(indices[0]));
    queue.memory.write_slice(&header, at).unwrap();
    queue.ring.publish(&queue.memory, indices[0]);
    queue.kick();
    assert_eq!(queue.ring.wait_used(&queue.memory, indices[0]), 1);
    let status_at = GuestAddress(queue.buffer(indices[2]));
    let status: u8 = queue.memory.read_obj(status_at).unwrap();
    assert_eq!(status, IOERR);

    // A head index beyond the ring: virtio-queue yields an empty chain,
    // which has no status and cannot even be returned.
    guest.queue.ring.publish(&guest.queue.memory, RING_SIZE + 3);
    let read = guest.request(VIRTIO_BLK_T_IN, 0, &[], 512);
    assert_eq!(read.status, OK, "the device still answers");
}

/// The whole path a guest takes: virtio-mmio registers for discovery,
/// features, configuration and the queue, DRIVER_OK, then a notification
/// through the QueueNotify register.
#[test]
fn works_through_the_mmio_transport() {
    let (device, event_loop, image, dir) = device(false);
    let memory = create_guest_memory(MEMORY_SIZE).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut transport = mmio_transport(Box::new(device.clone()), &memory, &irq, DEVICE_TYPE);
    let mut capacity = [0u8; 8];
    transport.read(u64::from(VIRTIO_MMIO_CONFIG), &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), IMAGE_SIZE / SECTOR);
    let features = 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_SEG_MAX;
    let mut rings = set_up_through_mmio(&mut transport, &memory, features, &[RING_BASE]);
    let mut guest = Guest {
        queue: QueueDriver {
            memory,
            ring: rings.remove(0),
            kick: Kick::Mmio(Box::new(transport)),
            queue: 0,
            buffers: BUFFERS,
        },
        device,
        irq,
        image,
        _event_loop: event_loop,
        _dir: dir,
    };
    let write = guest.request(VIRTIO_BLK_T_OUT, 4, &[0xab; 512], 0);
    assert_eq!(write.status, OK);
    assert_eq!(guest.image()[2048..2560], [0xab; 512]);
    assert!(guest.irq.read().unwrap() > 0);
    let flush = guest.request(VIRTIO_BLK_T_FLUSH, 0, &[], 0);
    assert_eq!(flush.status, OK);
    let discard = guest.request(VIRTIO_BLK_T_DISCARD, 0, &range(0, 1, 0), 0);
    assert_eq!(discard.status, UNSUPP, "the driver did not take DISCARD");
}

/// A loop device over a temporary image, detached when dropped.
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    /// None (saying why) where loop devices cannot be made (no root, no
    /// `losetup`).
    fn new(image: &std::path::Path) -> Option<LoopDevice> {
        let output = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image)
            .output();
        match output {
            Ok(output) if output.status.success() => Some(LoopDevice {
                path: String::from_utf8(output.stdout).unwrap().trim().into(),
            }),
            other => {
                eprintln!("skipped: cannot set up a loop device: {other:?}");
                None
            }
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("--detach")
            .arg(&self.path)
            .status();
    }
}

#[test]
fn a_host_block_device_is_a_backend() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0x11; IMAGE_SIZE as usize]).unwrap();
    let Some(loop_device) = LoopDevice::new(&image) else {
        return;
    };
    let device = Block::new(BlockConfig {
        path: loop_device.path.clone(),
        read_only: false,
        serial: SERIAL.into(),
    })
    .unwrap();
    let mut capacity = [0u8; 8];
    device.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), IMAGE_SIZE / SECTOR);
    let event_loop = EventLoop::spawn("blk-dev-test").unwrap();
    event_loop.add_subscriber(device.clone()).unwrap();
    let mut guest = activated(device, event_loop, image, dir);
    let write = guest.request(VIRTIO_BLK_T_OUT, 2, &[0x22; 1024], 0);
    assert_eq!(write.status, OK);
    assert_eq!(guest.request(VIRTIO_BLK_T_FLUSH, 0, &[], 0).status, OK);
    let read = guest.request(VIRTIO_BLK_T_IN, 2, &[], 1024);
    assert_eq!((read.status, read.data), (OK, vec![0x22; 1024]));
    let zeroes = guest.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &range(2, 1, 0), 0);
    assert_eq!(zeroes.status, OK, "BLKZEROOUT");
    let image = guest.image();
    assert_eq!(image[1024..1536], [0; 512], "seen through the image");
    assert_eq!(image[1536..2048], [0x22; 512]);
    assert_eq!(image[..1024], [0x11; 1024]);
    let beyond = guest.request(VIRTIO_BLK_T_IN, IMAGE_SIZE / SECTOR, &[], 512);
    assert_eq!(beyond.status, IOERR);
}
