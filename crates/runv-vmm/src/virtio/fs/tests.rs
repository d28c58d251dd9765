//! The device end to end: a driver plays the guest's FUSE client on
//! hand-driven rings, a real event loop runs the device, a temporary
//! directory is the share. Messages are built from fuse-backend-rs's ABI
//! structs.

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, CreateIn, EntryOut, GetattrIn, InHeader, InitIn, InitOut, Opcode, OpenIn, OpenOut,
    OutHeader, ReadIn, WriteIn, WriteOut, KERNEL_MINOR_VERSION, KERNEL_VERSION, ROOT_ID,
};
use fuse_vm_memory::ByteValued;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_CONFIG;
use vmm_sys_util::eventfd::EventFd;

use super::{Fs, FsConfig, DEVICE_TYPE};
use crate::{
    bus::BusDevice,
    event_loop::EventLoop,
    memory::create_guest_memory,
    virtio::{
        queue_device::QueueDevice,
        test_driver::{
            activate_directly, mmio_transport, set_up_through_mmio, Desc, Kick, QueueDriver,
        },
    },
};

const MEMORY_SIZE: u64 = 16 << 20;
/// hiprio, then the request queue.
const RING_BASES: [u64; 2] = [0x0, 0x1_0000];
const REQUEST_QUEUE: usize = 1;
const BUFFERS: u64 = 0x10_0000;
const TAG: &str = "runv-share";
const OUT_HEADER_LEN: usize = std::mem::size_of::<OutHeader>();
/// Room for any reply the tests expect.
const REPLY_ROOM: u32 = 8192;

/// The guest's FUSE client on the request queue.
struct Client {
    queue: QueueDriver,
    unique: u64,
    _device: Arc<Mutex<QueueDevice<Fs>>>,
    _event_loop: EventLoop,
}

/// A device on `dir`, served by its own worker.
fn device(dir: &Path, read_only: bool) -> (Arc<Mutex<QueueDevice<Fs>>>, EventLoop) {
    Fs::new(FsConfig {
        tag: TAG.into(),
        shared_dir: dir.to_owned(),
        read_only,
    })
    .unwrap()
}

/// A client of a device activated directly, kicked through eventfds.
fn client(dir: &Path, read_only: bool) -> Client {
    let (device, event_loop) = device(dir, read_only);
    let memory = create_guest_memory(MEMORY_SIZE).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let (mut rings, mut kicks) = activate_directly(&mut device.clone(), &memory, &RING_BASES, &irq);
    Client {
        queue: QueueDriver {
            memory,
            ring: rings.remove(REQUEST_QUEUE),
            kick: Kick::Eventfd(kicks.remove(REQUEST_QUEUE)),
            queue: REQUEST_QUEUE as u16,
            buffers: BUFFERS,
        },
        unique: 0,
        _device: device,
        _event_loop: event_loop,
    }
}

/// A reply: its header and what follows.
struct Reply {
    header: OutHeader,
    body: Vec<u8>,
}

impl Reply {
    /// The body as `T`, checking that the request succeeded.
    fn ok<T: ByteValued>(&self) -> T {
        assert_eq!(self.header.error, 0, "the request failed");
        T::from_slice(&self.body[..std::mem::size_of::<T>()])
            .copied()
            .unwrap()
    }
}

impl Client {
    /// Sends `opcode` on `nodeid` with the request `body` (its pieces in
    /// one descriptor), returns the reply.
    fn call(&mut self, opcode: Opcode, nodeid: u64, body: &[&[u8]]) -> Reply {
        self.unique += 1;
        let body = body.concat();
        let header = InHeader {
            len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
            opcode: opcode as u32,
            unique: self.unique,
            nodeid,
            // SAFETY: getuid and getgid cannot fail.
            uid: unsafe { libc::getuid() },
            // SAFETY: as above.
            gid: unsafe { libc::getgid() },
            pid: std::process::id(),
            padding: 0,
        };
        let mut descs = vec![Desc::Read(header.as_slice().to_vec())];
        if !body.is_empty() {
            descs.push(Desc::Read(body));
        }
        descs.push(Desc::Write(REPLY_ROOM));
        let (used, written) = self.queue.submit(&descs);
        let reply = &written[0][..used as usize];
        let header = *OutHeader::from_slice(&reply[..OUT_HEADER_LEN]).unwrap();
        assert_eq!(header.unique, self.unique);
        assert_eq!(header.len, used, "the reply fills what the device used");
        Reply {
            header,
            body: reply[OUT_HEADER_LEN..].to_vec(),
        }
    }

    fn init(&mut self) -> InitOut {
        let init = InitIn {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR_VERSION,
            max_readahead: 1 << 17,
            flags: 0,
        };
        self.call(Opcode::Init, 0, &[init.as_slice()]).ok()
    }

    fn lookup(&mut self, name: &str) -> Reply {
        let name = format!("{name}\0");
        self.call(Opcode::Lookup, ROOT_ID, &[name.as_bytes()])
    }

    fn open(&mut self, nodeid: u64, flags: i32) -> Reply {
        let open = OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        };
        self.call(Opcode::Open, nodeid, &[open.as_slice()])
    }

    fn create(&mut self, name: &str) -> Reply {
        let create = CreateIn {
            flags: (libc::O_WRONLY | libc::O_CREAT) as u32,
            mode: 0o644,
            umask: 0o022,
            fuse_flags: 0,
        };
        let name = format!("{name}\0");
        self.call(
            Opcode::Create,
            ROOT_ID,
            &[create.as_slice(), name.as_bytes()],
        )
    }
}

#[test]
fn a_file_written_on_the_host_is_looked_up_and_read() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), b"hello from the host\n").unwrap();
    let mut client = client(dir.path(), false);
    let init = client.init();
    assert_eq!(init.major, KERNEL_VERSION);

    let entry: EntryOut = client.lookup("hello.txt").ok();
    assert_eq!(entry.attr.size, 20);
    assert_eq!(entry.attr.mode & libc::S_IFMT, libc::S_IFREG);
    let getattr = GetattrIn::default();
    let attr: AttrOut = client
        .call(Opcode::Getattr, entry.nodeid, &[getattr.as_slice()])
        .ok();
    assert_eq!(attr.attr.ino, entry.attr.ino);
    assert_eq!(attr.attr.size, 20);

    let open: OpenOut = client.open(entry.nodeid, libc::O_RDONLY).ok();
    let read = ReadIn {
        fh: open.fh,
        size: 4096,
        ..Default::default()
    };
    let data = client.call(Opcode::Read, entry.nodeid, &[read.as_slice()]);
    assert_eq!(data.header.error, 0);
    assert_eq!(data.body, b"hello from the host\n");

    let missing = client.lookup("missing.txt");
    assert_eq!(missing.header.error, -libc::ENOENT);
}

#[test]
fn a_file_the_guest_creates_and_writes_is_on_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let mut client = client(dir.path(), false);
    client.init();
    let reply = client.create("new.txt");
    let entry: EntryOut = reply.ok();
    let open = *OpenOut::from_slice(&reply.body[std::mem::size_of::<EntryOut>()..][..16]).unwrap();
    let data = b"written by the guest";
    let write = WriteIn {
        fh: open.fh,
        size: data.len() as u32,
        ..Default::default()
    };
    let written: WriteOut = client
        .call(Opcode::Write, entry.nodeid, &[write.as_slice(), data])
        .ok();
    assert_eq!(written.size as usize, data.len());
    assert_eq!(std::fs::read(dir.path().join("new.txt")).unwrap(), data);
}

#[test]
fn a_read_only_share_refuses_changes_and_serves_reads() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kept.txt"), b"kept").unwrap();
    let mut client = client(dir.path(), true);
    client.init();
    assert_eq!(client.create("new.txt").header.error, -libc::EROFS);
    assert!(!dir.path().join("new.txt").exists());
    let entry: EntryOut = client.lookup("kept.txt").ok();
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        assert_eq!(client.open(entry.nodeid, flags).header.error, -libc::EROFS);
    }
    let name = b"kept.txt\0";
    let unlink = client.call(Opcode::Unlink, ROOT_ID, &[name]);
    assert_eq!(unlink.header.error, -libc::EROFS);
    let open: OpenOut = client.open(entry.nodeid, libc::O_RDONLY).ok();
    let read = ReadIn {
        fh: open.fh,
        size: 64,
        ..Default::default()
    };
    let data = client.call(Opcode::Read, entry.nodeid, &[read.as_slice()]);
    assert_eq!(data.body, b"kept");
    assert_eq!(std::fs::read(dir.path().join("kept.txt")).unwrap(), b"kept");
}

#[test]
fn malformed_requests_are_refused_and_the_device_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut client = client(dir.path(), false);
    // Shorter than a FUSE header: nothing to answer.
    let (used, _) = client
        .queue
        .submit(&[Desc::Read(vec![1, 2, 3]), Desc::Write(REPLY_ROOM)]);
    assert_eq!(used, 0);
    // A request and no room for a reply.
    let header = InHeader {
        len: std::mem::size_of::<InHeader>() as u32,
        opcode: Opcode::Getattr as u32,
        unique: 77,
        nodeid: ROOT_ID,
        ..Default::default()
    };
    let (used, _) = client
        .queue
        .submit(&[Desc::Read(header.as_slice().to_vec())]);
    assert_eq!(used, 0);
    // A SETATTR without its body: the server cannot decode it.
    let setattr = client.call(Opcode::Setattr, ROOT_ID, &[]);
    assert_eq!(setattr.header.error, -libc::EINVAL);
    let mut header = header;
    // An opcode in the gaps of fuse-backend-rs's enum.
    header.opcode = 7;
    let (used, written) = client.queue.submit(&[
        Desc::Read(header.as_slice().to_vec()),
        Desc::Write(REPLY_ROOM),
    ]);
    let reply = *OutHeader::from_slice(&written[0][..OUT_HEADER_LEN]).unwrap();
    assert_eq!(
        (used as usize, reply.error),
        (OUT_HEADER_LEN, -libc::ENOSYS)
    );
    // A header that claims more than it carries.
    header.opcode = Opcode::Lookup as u32;
    header.len = 1 << 30;
    let (_, written) = client.queue.submit(&[
        Desc::Read(header.as_slice().to_vec()),
        Desc::Write(REPLY_ROOM),
    ]);
    let reply = *OutHeader::from_slice(&written[0][..OUT_HEADER_LEN]).unwrap();
    assert_eq!(reply.error, -libc::ENOMEM);
    // Still serving.
    assert_eq!(client.init().major, KERNEL_VERSION);
}

#[test]
fn bad_configurations_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fs = |tag: &str, shared_dir: &Path| {
        Fs::new(FsConfig {
            tag: tag.into(),
            shared_dir: shared_dir.to_owned(),
            read_only: false,
        })
        .err()
    };
    assert!(fs("", dir.path()).is_some());
    assert!(fs(&"t".repeat(37), dir.path()).is_some());
    assert!(fs(&"t".repeat(36), dir.path()).is_none());
    assert!(fs(TAG, &dir.path().join("missing")).is_some());
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    assert!(fs(TAG, &file).is_some());
}

/// The whole path a guest takes: discovery and the tag through the
/// virtio-mmio registers, both queues set up, DRIVER_OK, then FUSE INIT
/// notified through the QueueNotify register.
#[test]
fn works_through_the_mmio_transport() {
    let dir = tempfile::tempdir().unwrap();
    let (device, event_loop) = device(dir.path(), false);
    let memory = create_guest_memory(MEMORY_SIZE).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut transport = mmio_transport(Box::new(device.clone()), &memory, &irq, DEVICE_TYPE);
    let mut config = [0u8; 40];
    transport.read(u64::from(VIRTIO_MMIO_CONFIG), &mut config);
    assert_eq!(&config[..TAG.len()], TAG.as_bytes());
    assert!(config[TAG.len()..36].iter().all(|&b| b == 0));
    assert_eq!(config[36..], 1u32.to_le_bytes(), "one request queue");
    let mut rings = set_up_through_mmio(&mut transport, &memory, 0, &RING_BASES);
    let mut client = Client {
        queue: QueueDriver {
            memory,
            ring: rings.remove(REQUEST_QUEUE),
            kick: Kick::Mmio(Box::new(transport)),
            queue: REQUEST_QUEUE as u16,
            buffers: BUFFERS,
        },
        unique: 0,
        _device: device,
        _event_loop: event_loop,
    };
    assert_eq!(client.init().major, KERNEL_VERSION);
    assert!(irq.read().unwrap() > 0, "the reply raised the interrupt");
}
