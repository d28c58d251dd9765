//! The device end to end: a driver plays the guest on hand-driven rings in
//! guest memory, a real event loop runs the device, and the host end is
//! either a socket pair standing in for the tap (frames keep their
//! boundaries, as on a tap) or a real tap in a network namespace of its
//! own.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use virtio_bindings::{
    virtio_config::VIRTIO_F_VERSION_1, virtio_mmio::VIRTIO_MMIO_CONFIG, virtio_net::*,
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{
    device::tun_offload,
    tap::{read_fd, NetBackend, Tap, VNET_HDR_LEN},
    Net, NetConfig, DEVICE_TYPE,
};
use crate::{
    bus::BusDevice,
    event_loop::EventLoop,
    memory::{create_guest_memory, GuestMemory},
    virtio::{
        test_driver::{
            activate_with_features, mmio_transport, Desc, Kick, QueueDriver, Ring, BUFFER_SLOT,
            WAIT,
        },
        VirtioDevice,
    },
};

const MEMORY_SIZE: u64 = 16 << 20;
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x4000;
const RX_BUFFERS: u64 = 0x10_0000;
const TX_BUFFERS: u64 = 0x50_0000;
const MAC: [u8; 6] = [0x02, 0x52, 0x55, 0x4e, 0x56, 0x01];
/// An ethertype for local experiments: nothing else on a tap uses it.
const ETHERTYPE: u16 = 0x88b5;
/// How long a test waits to be sure something does not happen.
const SETTLE: Duration = Duration::from_millis(200);

/// Every feature the device offers, and VERSION_1.
fn all_features() -> u64 {
    let net = Net::with_backend(Box::new(Mock::pair().0), MAC).unwrap();
    net.features() | 1 << VIRTIO_F_VERSION_1
}

/// What the device took from the mock.
#[derive(Default)]
struct Reads {
    /// Frames read.
    frames: AtomicUsize,
    /// Reads tried, frames or not.
    attempts: AtomicUsize,
}

impl Reads {
    fn frames(&self) -> usize {
        self.frames.load(Ordering::SeqCst)
    }

    fn attempts(&self) -> usize {
        self.attempts.load(Ordering::SeqCst)
    }
}

/// The socket-pair stand-in for a tap.
struct Mock {
    fd: OwnedFd,
    reads: Arc<Reads>,
    offloads: Arc<Mutex<Vec<u32>>>,
}

impl Mock {
    /// The device's end and the host's.
    fn pair() -> (Mock, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair fills the two descriptors.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "socketpair: {}", io::Error::last_os_error());
        // SAFETY: both are new descriptors we own.
        let (device, host) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mock = Mock {
            fd: device,
            reads: Arc::default(),
            offloads: Arc::default(),
        };
        (mock, host)
    }
}

impl NetBackend for Mock {
    fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reads.attempts.fetch_add(1, Ordering::SeqCst);
        let len = read_fd(self.fd.as_raw_fd(), buf)?;
        self.reads.frames.fetch_add(1, Ordering::SeqCst);
        Ok(len)
    }

    fn write_frame(&mut self, iovecs: &[libc::iovec]) -> io::Result<usize> {
        super::tap::writev_fd(self.fd.as_raw_fd(), iovecs)
    }

    fn set_offload(&mut self, tun_flags: u32) -> io::Result<()> {
        self.offloads.lock().unwrap().push(tun_flags);
        Ok(())
    }
}

/// The guest side of one net device.
struct Guest {
    rx: QueueDriver,
    tx: QueueDriver,
    device: Arc<Mutex<Net>>,
    _event_loop: EventLoop,
}

impl Guest {
    /// A device on `backend` on an event loop, activated with `features`.
    fn new(backend: Box<dyn NetBackend>, features: u64) -> Guest {
        let device = Net::with_backend(backend, MAC).unwrap();
        let event_loop = EventLoop::spawn("net-test").unwrap();
        event_loop.add_subscriber(device.clone()).unwrap();
        let memory = create_guest_memory(MEMORY_SIZE).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (mut rings, mut kicks) = activate_with_features(
            &mut device.clone(),
            &memory,
            &[RX_RING, TX_RING],
            &irq,
            features,
        );
        let driver = |ring: Ring, kick, queue, buffers| QueueDriver {
            memory: memory.clone(),
            ring,
            kick: Kick::Eventfd(kick),
            queue,
            buffers,
        };
        let rx = driver(rings.remove(0), kicks.remove(0), 0, RX_BUFFERS);
        let tx = driver(rings.remove(0), kicks.remove(0), 1, TX_BUFFERS);
        Guest {
            rx,
            tx,
            device,
            _event_loop: event_loop,
        }
    }

    /// On the mock, with every feature.
    fn mock() -> (Guest, OwnedFd, Arc<Reads>, Arc<Mutex<Vec<u32>>>) {
        Guest::mock_with(all_features())
    }

    fn mock_with(features: u64) -> (Guest, OwnedFd, Arc<Reads>, Arc<Mutex<Vec<u32>>>) {
        let (mock, host) = Mock::pair();
        let (reads, offloads) = (mock.reads.clone(), mock.offloads.clone());
        (Guest::new(Box::new(mock), features), host, reads, offloads)
    }

    /// Posts one receive chain of write-only buffers of these lengths;
    /// returns its head. Kicks.
    fn post_rx(&mut self, lens: &[u32]) -> u16 {
        let parts: Vec<(u32, bool)> = lens.iter().map(|&len| (len, true)).collect();
        self.post_rx_parts(&parts)
    }

    fn post_rx_parts(&mut self, parts: &[(u32, bool)]) -> u16 {
        let buffers = self.rx.buffers;
        let indices = self.rx.ring.add_chain(&self.rx.memory, parts, |index| {
            buffers + u64::from(index) * BUFFER_SLOT
        });
        for &index in &indices {
            self.rx
                .memory
                .write_slice(&[0xee; 64], GuestAddress(self.rx.buffer(index)))
                .unwrap();
        }
        self.rx.ring.publish(&self.rx.memory, indices[0]);
        self.rx.kick();
        indices[0]
    }

    /// Waits until the device has returned `count` receive chains; returns
    /// them in used-ring order (head, length).
    fn wait_rx_used(&mut self, count: usize) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + WAIT;
        let mut used = Vec::new();
        while used.len() < count {
            used.extend(self.rx.ring.take_used(&self.rx.memory));
            assert!(
                Instant::now() < deadline,
                "only {} of {count} rx chains returned",
                used.len()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        used
    }

    /// Waits until the device has returned one receive chain, which must
    /// be `head` holding a header and a frame of `frame_len` bytes; returns
    /// what it wrote.
    fn wait_rx_frame(&mut self, head: u16, frame_len: usize) -> Vec<u8> {
        let used = self.wait_rx_used(1);
        let len = (VNET_HDR_LEN + frame_len) as u32;
        assert_eq!(used, vec![(head, len)]);
        self.rx_bytes(head, len)
    }

    /// Posts one receive buffer of `len` bytes and checks that the frame
    /// the device holds or the tap has queued, `frame`, lands in it whole.
    fn receive_in_new_buffer(&mut self, len: u32, frame: &[u8]) {
        let head = self.post_rx(&[len]);
        assert_eq!(
            self.wait_rx_frame(head, frame.len())[VNET_HDR_LEN..],
            *frame
        );
    }

    /// Transmits `frame` after a plain header in one descriptor, as Linux
    /// lays out small frames, and checks that both reach `host` whole.
    fn transmit_plain(&mut self, host: &OwnedFd, frame: &[u8]) {
        let packet = [plain_header(), frame.to_vec()].concat();
        let (used, _) = self.tx.submit(&[Desc::Read(packet.clone())]);
        assert_eq!(used, 0, "a tx chain's used length is 0");
        assert_eq!(recv_timeout(host, WAIT).unwrap(), packet);
    }

    /// What the device wrote into the chain at `head`, `len` bytes over its
    /// descriptors in order.
    fn rx_bytes(&self, head: u16, len: u32) -> Vec<u8> {
        let indices = self.rx.ring.chains[&head].clone();
        let mut bytes = Vec::new();
        let mut left = len as usize;
        for index in indices {
            let at = self.rx.buffer(index);
            let take = left.min(BUFFER_SLOT as usize);
            let mut chunk = vec![0u8; take];
            self.rx
                .memory
                .read_slice(&mut chunk, GuestAddress(at))
                .unwrap();
            // Only the descriptor's own length counts.
            let desc_len = descriptor_len(&self.rx.memory, &self.rx.ring, index) as usize;
            chunk.truncate(desc_len.min(take));
            left -= chunk.len();
            bytes.extend(chunk);
            if left == 0 {
                break;
            }
        }
        bytes
    }

    /// What the device wrote into the `used` chains, one after the other:
    /// a frame merged over them.
    fn rx_bytes_of(&self, used: &[(u16, u32)]) -> Vec<u8> {
        used.iter()
            .flat_map(|&(head, len)| self.rx_bytes(head, len))
            .collect()
    }

    fn no_rx_used_for_a_while(&mut self) {
        std::thread::sleep(SETTLE);
        assert_eq!(
            self.rx.ring.take_used(&self.rx.memory),
            vec![],
            "nothing returned"
        );
    }
}

fn descriptor_len(memory: &GuestMemory, ring: &Ring, index: u16) -> u32 {
    memory
        .read_obj(GuestAddress(ring.desc.0 + 16 * u64::from(index) + 8))
        .unwrap()
}

/// An Ethernet frame of `payload_len` patterned bytes, from the guest.
fn ethernet_frame(payload_len: usize, seed: u8) -> Vec<u8> {
    let mut frame = vec![0xff; 6]; // broadcast
    frame.extend_from_slice(&MAC);
    frame.extend_from_slice(&ETHERTYPE.to_be_bytes());
    frame.extend((0..payload_len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    frame
}

/// A virtio_net_hdr_v1 of a frame that needs no offload work.
fn plain_header() -> Vec<u8> {
    vec![0; VNET_HDR_LEN]
}

/// A header asking for a partial checksum (what a tap hands over with
/// TUN_F_CSUM), num_buffers left for the device.
fn csum_header() -> Vec<u8> {
    let mut header = vec![0u8; VNET_HDR_LEN];
    header[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    header[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
    header[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    header[10..12].copy_from_slice(&0xabcdu16.to_le_bytes()); // garbage
    header
}

fn send(host: &OwnedFd, bytes: &[u8]) {
    // SAFETY: sends from a valid buffer.
    let n = unsafe { libc::send(host.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
    assert_eq!(
        n,
        bytes.len() as isize,
        "send: {}",
        io::Error::last_os_error()
    );
}

/// The next message on `fd`, waiting up to WAIT; None if none comes.
fn recv_timeout(fd: &OwnedFd, wait: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 70_000];
    loop {
        // SAFETY: receives into a valid buffer.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            buf.truncate(n as usize);
            return Some(buf);
        }
        let e = io::Error::last_os_error();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "recv: {e}");
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn num_buffers(header: &[u8]) -> u16 {
    u16::from_le_bytes([header[10], header[11]])
}

#[test]
fn the_device_is_a_network_card_with_the_mac_and_link_up() {
    let (mock, _host) = Mock::pair();
    let device = Net::with_backend(Box::new(mock), MAC).unwrap();
    let memory = create_guest_memory(MEMORY_SIZE).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut transport = mmio_transport(Box::new(device.clone()), &memory, &irq, DEVICE_TYPE);
    assert_eq!(DEVICE_TYPE, 1);
    let mut config = [0u8; 8];
    transport.read(u64::from(VIRTIO_MMIO_CONFIG), &mut config);
    assert_eq!(config[..6], MAC);
    assert_eq!(
        u16::from_le_bytes([config[6], config[7]]),
        VIRTIO_NET_S_LINK_UP as u16
    );
    // A read past the end is zero, a read at an offset is the bytes there.
    let mut byte = [0xffu8; 2];
    transport.read(u64::from(VIRTIO_MMIO_CONFIG) + 4, &mut byte);
    assert_eq!(byte, [MAC[4], MAC[5]]);
    transport.read(u64::from(VIRTIO_MMIO_CONFIG) + 8, &mut byte);
    assert_eq!(byte, [0, 0]);

    let features = device.features();
    for feature in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
    ] {
        assert_ne!(features & 1 << feature, 0, "feature {feature} offered");
    }
    for feature in [
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_MQ,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_UFO,
    ] {
        assert_eq!(features & 1 << feature, 0, "feature {feature} not offered");
    }
    assert_eq!(
        device.queue_max_sizes().len(),
        2,
        "rx and tx, no control queue"
    );
}

#[test]
fn the_tap_gets_the_offloads_the_guest_accepted() {
    let (guest, _host, _reads, offloads) = Guest::mock();
    let all = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
    assert_eq!(*offloads.lock().unwrap(), vec![all]);
    // A reset takes them back.
    guest.device.clone().reset();
    assert_eq!(*offloads.lock().unwrap(), vec![all, 0]);

    let version_1 = 1u64 << VIRTIO_F_VERSION_1;
    assert_eq!(tun_offload(version_1), 0);
    // Segments need checksum offload: TSO alone gives nothing.
    assert_eq!(tun_offload(version_1 | 1 << VIRTIO_NET_F_GUEST_TSO4), 0);
    assert_eq!(
        tun_offload(version_1 | 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO6),
        libc::TUN_F_CSUM | libc::TUN_F_TSO6
    );
    assert_eq!(
        tun_offload(version_1 | 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_ECN),
        libc::TUN_F_CSUM,
        "ECN only with TSO"
    );
}

#[test]
fn a_driver_without_version_1_is_refused() {
    let (mock, _host) = Mock::pair();
    let device = Net::with_backend(Box::new(mock), MAC).unwrap();
    let memory = create_guest_memory(MEMORY_SIZE).unwrap();
    let (_, queue_rx) = Ring::new(&memory, RX_RING);
    let (_, queue_tx) = Ring::new(&memory, TX_RING);
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let activation = crate::virtio::Activation {
        memory: memory.clone(),
        queues: vec![queue_rx, queue_tx],
        queue_events: vec![EventFd::new(0).unwrap(), EventFd::new(0).unwrap()],
        features: 1 << VIRTIO_NET_F_MAC,
        interrupt: crate::virtio::Interrupt {
            status: Arc::default(),
            irq: Arc::new(irq),
        },
    };
    let err = device.clone().activate(activation).unwrap_err();
    assert!(err.contains("VERSION_1"), "{err}");
}

#[test]
fn a_transmitted_frame_reaches_the_tap_byte_exact_with_its_header() {
    let (mut guest, host, _reads, _offloads) = Guest::mock();
    let header = csum_header();
    let frame = ethernet_frame(1000, 1);
    // Header and frame in descriptors of their own, the frame split too.
    let (used, _) = guest.tx.submit(&[
        Desc::Read(header.clone()),
        Desc::Read(frame[..300].to_vec()),
        Desc::Read(frame[300..].to_vec()),
    ]);
    assert_eq!(used, 0, "a tx chain's used length is 0");
    let sent = recv_timeout(&host, WAIT).expect("the frame reached the tap");
    assert_eq!(sent, [header, frame.clone()].concat());

    // Header and frame in one descriptor.
    guest.transmit_plain(&host, &frame);
}

#[test]
fn malformed_transmit_chains_are_returned_and_dropped() {
    let (mut guest, host, _reads, _offloads) = Guest::mock();
    let frame = ethernet_frame(64, 2);
    // A write-only descriptor in a tx chain.
    let (used, _) = guest
        .tx
        .submit(&[Desc::Read(plain_header()), Desc::Write(64)]);
    assert_eq!(used, 0);
    // Shorter than a header.
    let (used, _) = guest.tx.submit(&[Desc::Read(vec![0; 5])]);
    assert_eq!(used, 0);
    assert_eq!(recv_timeout(&host, SETTLE), None, "nothing reached the tap");
    // The queue still works.
    guest.transmit_plain(&host, &frame);
}

#[test]
fn a_received_frame_lands_in_a_buffer_with_its_header() {
    let (mut guest, host, _reads, _offloads) = Guest::mock();
    let head = guest.post_rx(&[2048]);
    let frame = ethernet_frame(200, 3);
    send(&host, &[csum_header(), frame.clone()].concat());
    let bytes = guest.wait_rx_frame(head, frame.len());
    assert_eq!(
        bytes[..10],
        csum_header()[..10],
        "the tap's header is passed on"
    );
    assert_eq!(num_buffers(&bytes), 1, "num_buffers is set");
    assert_eq!(bytes[VNET_HDR_LEN..], frame);
}

#[test]
fn a_received_frame_with_the_header_in_a_descriptor_of_its_own() {
    let (mut guest, host, _reads, _offloads) = Guest::mock();
    let head = guest.post_rx(&[VNET_HDR_LEN as u32, 1500]);
    let frame = ethernet_frame(100, 4);
    send(&host, &[plain_header(), frame.clone()].concat());
    let bytes = guest.wait_rx_frame(head, frame.len());
    assert_eq!(num_buffers(&bytes), 1);
    assert_eq!(bytes[VNET_HDR_LEN..], frame);
}

#[test]
fn with_mergeable_buffers_a_large_frame_spans_several_chains() {
    let (mut guest, host, _reads, _offloads) = Guest::mock();
    let heads: Vec<u16> = (0..4).map(|_| guest.post_rx(&[1000])).collect();
    let frame = ethernet_frame(2500 - 14, 5);
    send(&host, &[plain_header(), frame.clone()].concat());
    let used = guest.wait_rx_used(3);
    let total = VNET_HDR_LEN + frame.len();
    assert_eq!(
        used,
        vec![
            (heads[0], 1000),
            (heads[1], 1000),
            (heads[2], (total - 2000) as u32)
        ],
        "three chains, in the order posted"
    );
    let bytes = guest.rx_bytes_of(&used);
    assert_eq!(num_buffers(&bytes), 3);
    assert_eq!(bytes[VNET_HDR_LEN..], frame);

    // The fourth chain takes the next frame whole.
    let small = ethernet_frame(60, 6);
    send(&host, &[plain_header(), small.clone()].concat());
    let bytes = guest.wait_rx_frame(heads[3], small.len());
    assert_eq!(num_buffers(&bytes), 1);
}

#[test]
fn without_receive_buffers_the_tap_is_not_read_until_the_guest_adds_some() {
    let (mut guest, host, reads, _offloads) = Guest::mock();
    let first = ethernet_frame(100, 7);
    send(&host, &[plain_header(), first.clone()].concat());
    guest.no_rx_used_for_a_while();
    assert_eq!(reads.attempts(), 0, "the tap was not read, not even tried");
    guest.receive_in_new_buffer(2048, &first);
    assert_eq!(reads.frames(), 1);

    // Out of buffers again: the next frame waits in the tap.
    let second = ethernet_frame(80, 8);
    send(&host, &[plain_header(), second.clone()].concat());
    guest.no_rx_used_for_a_while();
    let attempts = reads.attempts();
    std::thread::sleep(SETTLE);
    assert_eq!(reads.attempts(), attempts, "no busy loop on the tap");
    assert_eq!(reads.frames(), 1, "the second frame is still in the tap");
    guest.receive_in_new_buffer(2048, &second);
}

#[test]
fn a_frame_waits_in_the_device_until_enough_mergeable_buffers_come() {
    let (mut guest, host, reads, _offloads) = Guest::mock();
    let first = guest.post_rx(&[1000]);
    let frame = ethernet_frame(2500, 9);
    let next = ethernet_frame(50, 10);
    send(&host, &[plain_header(), frame.clone()].concat());
    send(&host, &[plain_header(), next.clone()].concat());
    guest.no_rx_used_for_a_while();
    assert_eq!(
        reads.frames(),
        1,
        "one frame taken, the next left in the tap"
    );
    let second = guest.post_rx(&[1000]);
    guest.no_rx_used_for_a_while();
    let third = guest.post_rx(&[1000]);
    let used = guest.wait_rx_used(3);
    assert_eq!(
        used.iter().map(|&(head, _)| head).collect::<Vec<_>>(),
        vec![first, second, third]
    );
    let bytes = guest.rx_bytes_of(&used);
    assert_eq!(num_buffers(&bytes), 3);
    assert_eq!(bytes[VNET_HDR_LEN..], frame);
    guest.receive_in_new_buffer(1000, &next);
}

#[test]
fn malformed_receive_chains_are_returned_empty_and_the_frame_goes_to_the_next() {
    let (mut guest, host, _reads, _offloads) = Guest::mock();
    // A read-only descriptor, and a chain too short for a header.
    let read_only = guest.post_rx_parts(&[(1000, false)]);
    let too_short = guest.post_rx(&[8]);
    let good = guest.post_rx(&[2048]);
    let frame = ethernet_frame(300, 11);
    send(&host, &[plain_header(), frame.clone()].concat());
    let used = guest.wait_rx_used(3);
    let len = (VNET_HDR_LEN + frame.len()) as u32;
    assert_eq!(used, vec![(read_only, 0), (too_short, 0), (good, len)]);
    assert_eq!(guest.rx_bytes(good, len)[VNET_HDR_LEN..], frame);
}

#[test]
fn without_mergeable_buffers_a_frame_too_large_for_the_buffer_is_dropped() {
    let features = all_features() & !(1 << VIRTIO_NET_F_MRG_RXBUF);
    let (mut guest, host, _reads, offloads) = Guest::mock_with(features);
    assert_eq!(offloads.lock().unwrap().len(), 1);
    let head = guest.post_rx(&[500]);
    let large = ethernet_frame(1000, 12);
    send(&host, &[plain_header(), large].concat());
    guest.no_rx_used_for_a_while();
    // The buffer was kept for the next frame, which fits.
    let small = ethernet_frame(100, 13);
    send(&host, &[plain_header(), small.clone()].concat());
    let bytes = guest.wait_rx_frame(head, small.len());
    assert_eq!(num_buffers(&bytes), 1, "num_buffers is 1 without MRG_RXBUF");
    assert_eq!(bytes[VNET_HDR_LEN..], small);
}

#[test]
fn a_reset_stops_the_traffic_and_a_new_activation_starts_it() {
    let (mut guest, host, reads, _offloads) = Guest::mock();
    guest.post_rx(&[2048]);
    std::thread::sleep(SETTLE);
    let reads_before = reads.attempts();
    guest.device.clone().reset();
    let frame = ethernet_frame(60, 14);
    send(&host, &[plain_header(), frame.clone()].concat());
    std::thread::sleep(SETTLE);
    assert_eq!(
        reads.attempts(),
        reads_before,
        "a reset device reads nothing"
    );

    // The driver sets the device up again, on new rings.
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let memory = guest.rx.memory.clone();
    let (mut rings, mut kicks) = activate_with_features(
        &mut guest.device.clone(),
        &memory,
        &[RX_RING, TX_RING],
        &irq,
        all_features(),
    );
    guest.rx.ring = rings.remove(0);
    guest.rx.kick = Kick::Eventfd(kicks.remove(0));
    guest.tx.ring = rings.remove(0);
    guest.tx.kick = Kick::Eventfd(kicks.remove(0));
    guest.receive_in_new_buffer(2048, &frame);
}

#[test]
fn a_backend_that_fails_is_not_spun_on() {
    let (mut guest, host, reads, _offloads) = Guest::mock();
    // The host end gone: the device's end is readable for good, and each
    // read ends at once.
    drop(host);
    guest.post_rx(&[2048]);
    std::thread::sleep(SETTLE);
    let attempts = reads.attempts();
    assert!(attempts <= 2, "{attempts} reads of a closed backend");
    // Each receive kick tries once more, no more.
    guest.post_rx(&[2048]);
    std::thread::sleep(SETTLE);
    assert!(
        reads.attempts() <= attempts + 1,
        "{} reads",
        reads.attempts()
    );
    assert_eq!(guest.rx.ring.take_used(&guest.rx.memory), vec![]);
}

#[test]
fn a_descriptor_that_is_not_a_tap_is_refused() {
    let event = EventFd::new(0).unwrap();
    // SAFETY: a fresh descriptor of our own.
    let fd = unsafe { OwnedFd::from_raw_fd(libc::dup(event.as_raw_fd())) };
    let err = Net::new(NetConfig { tap: fd, mac: MAC })
        .err()
        .expect("an eventfd is no tap")
        .to_string();
    assert!(err.contains("not a tap"), "{err}");
}

// ---- A real tap, in a network namespace of the test's own. ----

/// Opens `/dev/net/tun` as tap `name` with `flags`.
fn open_tap(name: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: a plain open of a C string.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor of our own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut ifreq = ifreq(name);
    ifreq.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and updates the ifreq.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifreq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: an all-zero ifreq is valid.
    let mut ifreq: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in ifreq.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    ifreq
}

/// A tap and a packet socket on it for our ethertype, in a new network
/// namespace (gone with the last of the two descriptors); or why not.
struct RealTap {
    tap: OwnedFd,
    /// Sends frames out of the tap (to the device) and receives what the
    /// device wrote into it.
    packet: OwnedFd,
}

fn real_tap(flags: libc::c_int) -> Result<RealTap, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err("no /dev/net/tun".into());
    }
    std::thread::spawn(move || -> Result<RealTap, String> {
        // Only this thread moves to the new namespace.
        // SAFETY: unshare affects this thread only.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "unshare(CLONE_NEWNET): {}",
                io::Error::last_os_error()
            ));
        }
        // Keep IPv6's own chatter (router solicitations, MLD) off the tap;
        // best effort, the test filters on its ethertype anyway.
        let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
        let name = "runvtap0";
        let tap = open_tap(name, flags).map_err(|e| format!("creating a tap: {e}"))?;
        let control = socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
        let mut request = ifreq(name);
        // SAFETY: SIOCGIFFLAGS fills the flags of the named interface.
        if unsafe { libc::ioctl(control.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } < 0 {
            return Err(format!("SIOCGIFFLAGS: {}", io::Error::last_os_error()));
        }
        // SAFETY: the flags member was just filled.
        unsafe {
            request.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_NOARP) as libc::c_short;
        }
        // SAFETY: SIOCSIFFLAGS reads the ifreq.
        if unsafe { libc::ioctl(control.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } < 0 {
            return Err(format!("SIOCSIFFLAGS: {}", io::Error::last_os_error()));
        }
        let protocol = ETHERTYPE.to_be();
        let packet = socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(protocol))?;
        // SAFETY: an all-zero sockaddr_ll is valid.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = protocol;
        // SAFETY: a C string.
        address.sll_ifindex = unsafe { libc::if_nametoindex(c"runvtap0".as_ptr()) } as i32;
        // SAFETY: binds to a valid sockaddr_ll of the right length.
        let rc = unsafe {
            libc::bind(
                packet.as_raw_fd(),
                (&address as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(format!(
                "binding a packet socket: {}",
                io::Error::last_os_error()
            ));
        }
        Ok(RealTap { tap, packet })
    })
    .join()
    .expect("the namespace thread")
}

fn socket(
    domain: libc::c_int,
    kind: libc::c_int,
    protocol: libc::c_int,
) -> Result<OwnedFd, String> {
    // SAFETY: a plain socket call.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(format!("socket: {}", io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor of our own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

#[test]
fn frames_cross_a_real_tap_both_ways() {
    let RealTap { tap, packet } = match real_tap(TAP_FLAGS) {
        Ok(real) => real,
        Err(why) => {
            println!("SKIPPED: {why}");
            return;
        }
    };
    let backend = Tap::new(tap).expect("the tap is accepted");
    let mut guest = Guest::new(Box::new(backend), all_features());

    // Guest to host: the tap strips the header, the frame arrives as is.
    let frame = ethernet_frame(500, 20);
    guest
        .tx
        .submit(&[Desc::Read(plain_header()), Desc::Read(frame.clone())]);
    let arrived = recv_timeout(&packet, WAIT).expect("the frame left the tap");
    assert_eq!(arrived, frame);

    // Host to guest: a frame sent out of the tap lands in a buffer behind
    // a header. Other frames the kernel sends are skipped.
    let mut reply = vec![0u8; 6];
    reply[..6].copy_from_slice(&MAC);
    reply.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    reply.extend_from_slice(&ETHERTYPE.to_be_bytes());
    reply.extend((0..700u32).map(|i| (i % 253) as u8));
    send(&packet, &reply);
    let deadline = Instant::now() + WAIT;
    loop {
        let head = guest.post_rx(&[2048]);
        let used = guest.wait_rx_used(1);
        assert_eq!(used[0].0, head);
        let bytes = guest.rx_bytes(head, used[0].1);
        if bytes.len() >= VNET_HDR_LEN + 14
            && bytes[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == ETHERTYPE.to_be_bytes()
        {
            assert_eq!(num_buffers(&bytes), 1);
            assert_eq!(bytes[0], 0, "no offload flags on a plain frame");
            assert_eq!(bytes[VNET_HDR_LEN..], reply);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the frame never reached the guest"
        );
    }
}

#[test]
fn a_real_tap_without_a_virtio_header_is_refused() {
    let RealTap { tap, .. } = match real_tap(libc::IFF_TAP | libc::IFF_NO_PI) {
        Ok(real) => real,
        Err(why) => {
            println!("SKIPPED: {why}");
            return;
        }
    };
    let err = Tap::new(tap).err().expect("refused").to_string();
    assert!(err.contains("IFF_VNET_HDR"), "{err}");
}

#[test]
fn a_real_tap_takes_every_offload_the_guest_can_accept() {
    let RealTap { tap, .. } = match real_tap(TAP_FLAGS) {
        Ok(real) => real,
        Err(why) => {
            println!("SKIPPED: {why}");
            return;
        }
    };
    let mut backend = Tap::new(tap).unwrap();
    for features in [all_features(), 1 << VIRTIO_F_VERSION_1] {
        let flags = tun_offload(features);
        backend
            .set_offload(flags)
            .unwrap_or_else(|e| panic!("TUNSETOFFLOAD {flags:#x}: {e}"));
    }
}
