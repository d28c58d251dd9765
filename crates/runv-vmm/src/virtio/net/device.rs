//! The virtio-net device: the virtio side (queues, features, config space,
//! activation, reset) and the event-loop side (the queue kicks and the
//! tap's readiness, frames moved between them).

use std::{
    io,
    num::Wrapping,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::{atomic::Ordering, Arc, Mutex},
};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::{
    virtio_config::VIRTIO_F_VERSION_1,
    virtio_net::{
        VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
    },
};
use virtio_queue::{desc::split::Descriptor, DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::tap::{NetBackend, Tap, VNET_HDR_LEN};
use crate::{
    memory::GuestMemory,
    virtio::{
        loop_device::{drain_tx, LoopDevice},
        loop_queues::{LoopQueues, Wakeup},
        notify_used, read_config_bytes, Interrupt,
    },
    VmmError,
};

/// The virtio device ID of a network device.
pub const DEVICE_TYPE: u32 = 1;
/// receiveq1, transmitq1: one queue pair, no control queue.
const QUEUE_SIZES: &[u16] = &[256, 256];
const RX: usize = 0;
const TX: usize = 1;
/// The largest frame the tap hands over: a 64 KiB GSO packet, its
/// Ethernet and VLAN headers, and the virtio header.
const MAX_RX_FRAME: usize = VNET_HDR_LEN + 65_535 + 14 + 4;
/// Frames taken from the tap per wake-up before the loop serves others
/// (the tap stays watched, so the loop comes back at once).
const RX_BATCH: usize = 256;
/// mac, status.
const CONFIG_LEN: usize = 8;
/// Where `num_buffers` lies in the header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// The features offered besides VERSION_1 (the transport's).
///
/// - MAC and STATUS: the caller's MAC, and a link that is always up.
/// - CSUM and HOST_TSO4/6/ECN: the guest may hand over frames with a
///   partial checksum and TCP segments up to 64 KiB; the tap (and the
///   pod's veth or bridge behind it) finishes or segments them only if
///   they leave the host, and not at all when they stay local. This is
///   where throughput comes from: one exit and one writev per 64 KiB
///   instead of per 1.5 KiB.
/// - GUEST_CSUM and GUEST_TSO4/6/ECN: the other way, the host's GRO'd or
///   locally made large TCP segments reach the guest whole. They are
///   passed on to the tap with TUNSETOFFLOAD as the guest accepted them;
///   what the guest refused, the tap's kernel side does in software
///   before the frame is read.
/// - MRG_RXBUF: with GUEST_TSO and without it, Linux posts ~64 KiB of
///   buffers per receive chain ("big packets") for every small frame;
///   with it, it posts page-sized buffers and a large frame spans several
///   chains (num_buffers).
///
/// Not offered: UFO (Linux stopped making UFO frames in 4.14) and USO
/// (newer than the guest kernels we run, and needs TUN_F_USO), MTU (the
/// guest's MTU is set by the agent from the pod's network), CTRL_VQ and
/// everything behind it (promiscuous/multicast filtering, MAC changes,
/// multiqueue), EVENT_IDX.
const FEATURES: u64 = 1 << VIRTIO_NET_F_MAC
    | 1 << VIRTIO_NET_F_STATUS
    | 1 << VIRTIO_NET_F_MRG_RXBUF
    | 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_HOST_ECN
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_GUEST_ECN;

/// What to attach.
pub struct NetConfig {
    /// A tap opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`; the device
    /// makes it non-blocking and sets its header size and offloads.
    pub tap: OwnedFd,
    /// The guest interface's MAC address.
    pub mac: [u8; 6],
}

/// The driver's queues while the device runs.
struct Active {
    memory: GuestMemory,
    rx: Queue,
    tx: Queue,
    mergeable: bool,
    interrupt: Interrupt,
}

/// A virtio-net device with one queue pair. See the module documentation
/// for how to wire it.
pub struct Net {
    backend: Box<dyn NetBackend>,
    config: [u8; CONFIG_LEN],
    active: Option<Active>,
    queues: LoopQueues,
    /// Whether the event loop watches the backend for frames. It does
    /// while the device is active and the guest has receive buffers.
    backend_watched: bool,
    /// The frame in `rx_frame` that is read from the backend but waits
    /// for receive buffers: its length.
    pending: Option<usize>,
    rx_frame: Vec<u8>,
}

impl Net {
    /// A device on the caller's tap; wire the result as in the module
    /// documentation.
    pub fn new(config: NetConfig) -> Result<Arc<Mutex<Net>>, VmmError> {
        let tap =
            Tap::new(config.tap).map_err(|e| VmmError::Device(format!("virtio-net tap: {e}")))?;
        Net::with_backend(Box::new(tap), config.mac)
    }

    /// A device whose host end is `socket` (a connected datagram or
    /// seqpacket socket, one frame with its header per message) instead
    /// of a tap, which needs CAP_NET_ADMIN: for fuzzing the guest's side.
    #[cfg(feature = "fuzzing")]
    pub fn with_socket(socket: OwnedFd, mac: [u8; 6]) -> Result<Arc<Mutex<Net>>, VmmError> {
        Net::with_backend(Box::new(super::socket::SocketBackend::new(socket)), mac)
    }

    pub(crate) fn with_backend(
        backend: Box<dyn NetBackend>,
        mac: [u8; 6],
    ) -> Result<Arc<Mutex<Net>>, VmmError> {
        let queues =
            LoopQueues::new().map_err(|e| VmmError::Device(format!("virtio-net eventfd: {e}")))?;
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        Ok(Arc::new(Mutex::new(Net {
            backend,
            config,
            active: None,
            queues,
            backend_watched: false,
            pending: None,
            rx_frame: vec![0; MAX_RX_FRAME],
        })))
    }

    /// Sends every frame the guest queued on tx.
    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let backend = &mut self.backend;
        let memory = &active.memory;
        drain_tx(
            "virtio-net",
            &mut active.tx,
            memory,
            &active.interrupt,
            |chain| match tx_iovecs(chain, memory) {
                Ok(iovecs) => {
                    if let Err(e) = backend.write_frame(&iovecs) {
                        // What a full or downed link does to a frame.
                        tracing::debug!(error = %e, "virtio-net frame to the tap dropped");
                    }
                }
                Err(why) => tracing::debug!(why, "malformed virtio-net tx chain dropped"),
            },
        );
    }

    /// Moves frames from the backend into receive buffers while there are
    /// both; stops watching the backend while the guest has no buffers,
    /// and watches it again once it has.
    fn process_rx(&mut self, ops: &mut EventOps) {
        let Some(active) = self.active.as_mut() else {
            self.set_backend_watched(false, ops);
            return;
        };
        let mut delivered = false;
        let mut watch = true;
        for _ in 0..RX_BATCH {
            let len = match self.pending.take() {
                Some(len) => len,
                None => {
                    if !has_available(&active.rx, &active.memory) {
                        // Read nothing the guest has no room for: the tap
                        // queues it (and drops past its queue length).
                        watch = false;
                        break;
                    }
                    match self.backend.read_frame(&mut self.rx_frame) {
                        // End of file: not from a tap, which has no end;
                        // treated like an error.
                        Ok(0) => {
                            tracing::warn!("the virtio-net backend is closed");
                            watch = false;
                            break;
                        }
                        Ok(len) => len,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            // A tap whose interface is gone reports an
                            // error on every poll: stop watching it until
                            // the driver's next receive kick rather than
                            // spin.
                            tracing::warn!(error = %e, "cannot read from the virtio-net tap");
                            watch = false;
                            break;
                        }
                    }
                }
            };
            if len < VNET_HDR_LEN {
                tracing::debug!(len, "frame from the tap without a header dropped");
                continue;
            }
            match deliver(active, &mut self.rx_frame[..len]) {
                Delivery::Delivered => delivered = true,
                Delivery::Dropped => delivered = true,
                Delivery::NoRoom => {
                    self.pending = Some(len);
                    watch = false;
                    break;
                }
            }
        }
        if delivered {
            notify_used(&mut active.rx, &active.memory, &active.interrupt);
        }
        self.set_backend_watched(watch, ops);
    }

    fn set_backend_watched(&mut self, watch: bool, ops: &mut EventOps) {
        if watch == self.backend_watched {
            return;
        }
        let fd = self.backend.raw_fd();
        let result = if watch {
            ops.add(Events::new_raw(fd, EventSet::IN))
        } else {
            ops.remove(Events::empty_raw(fd))
        };
        match result {
            Ok(()) => self.backend_watched = watch,
            Err(e) => {
                tracing::error!(error = %e, watch, "cannot change the watch on the virtio-net tap")
            }
        }
    }

    fn backend_fd(&self) -> RawFd {
        self.backend.raw_fd()
    }
}

/// Whether the driver has made a chain available that the device has not
/// taken yet.
fn has_available(queue: &Queue, memory: &GuestMemory) -> bool {
    queue
        .avail_idx(memory, Ordering::Acquire)
        .is_ok_and(|avail| avail != Wrapping(queue.next_avail()))
}

/// Host iovecs for a tx chain: the header and the frame, read-only
/// descriptors only, all in guest memory.
fn tx_iovecs(
    chain: DescriptorChain<&GuestMemory>,
    memory: &GuestMemory,
) -> Result<Vec<libc::iovec>, &'static str> {
    let mut iovecs = Vec::new();
    let mut total = 0usize;
    for descriptor in chain {
        if descriptor.is_write_only() {
            return Err("a write-only descriptor in a tx chain");
        }
        let len = descriptor.len() as usize;
        if len == 0 {
            continue;
        }
        let slice = memory
            .get_slice(descriptor.addr(), len)
            .map_err(|_| "a tx buffer outside guest memory")?;
        iovecs.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: len,
        });
        total += len;
    }
    if total < VNET_HDR_LEN {
        return Err("a tx chain shorter than the virtio-net header");
    }
    Ok(iovecs)
}

/// The writable buffers of an rx chain, or why it has none to offer.
fn rx_buffers(
    chain: DescriptorChain<&GuestMemory>,
    memory: &GuestMemory,
) -> Result<Vec<(GuestAddress, usize)>, &'static str> {
    let descriptors: Vec<Descriptor> = chain.collect();
    let mut buffers = Vec::with_capacity(descriptors.len());
    for descriptor in descriptors {
        if !descriptor.is_write_only() {
            return Err("a read-only descriptor in an rx chain");
        }
        let len = descriptor.len() as usize;
        if len == 0 {
            continue;
        }
        if !memory.check_range(descriptor.addr(), len) {
            return Err("an rx buffer outside guest memory");
        }
        buffers.push((descriptor.addr(), len));
    }
    // Every buffer must hold at least a header (virtio spec 5.1.6.3.1).
    if buffers.iter().map(|&(_, len)| len).sum::<usize>() < VNET_HDR_LEN {
        return Err("an rx chain shorter than the virtio-net header");
    }
    Ok(buffers)
}

enum Delivery {
    /// In the used ring.
    Delivered,
    /// Too large for a receive chain without MRG_RXBUF: dropped, the
    /// chain kept for the next frame.
    Dropped,
    /// The driver has not made enough buffers available: nothing changed.
    NoRoom,
}

/// Puts `frame` (header included) into receive chains: one without
/// MRG_RXBUF, as many as it takes with it, with `num_buffers` set.
/// Malformed chains met on the way are returned empty before the frame.
fn deliver(active: &mut Active, frame: &mut [u8]) -> Delivery {
    let memory = &active.memory;
    let start = active.rx.next_avail();
    let mut discarded: Vec<u16> = Vec::new();
    let mut chains: Vec<(u16, Vec<(GuestAddress, usize)>)> = Vec::new();
    let mut room = 0usize;
    while room < frame.len() {
        let Some(chain) = active.rx.pop_descriptor_chain(memory) else {
            // The buffers taken stay available; the malformed ones are
            // met again next time.
            active.rx.set_next_avail(start);
            return Delivery::NoRoom;
        };
        let head = chain.head_index();
        match rx_buffers(chain, memory) {
            Ok(buffers) => {
                let len: usize = buffers.iter().map(|&(_, len)| len).sum();
                if !active.mergeable && len < frame.len() {
                    tracing::debug!(
                        len,
                        frame = frame.len(),
                        "frame larger than the rx buffer dropped"
                    );
                    active.rx.go_to_previous_position();
                    publish_used(
                        active,
                        &discarded.iter().map(|&head| (head, 0)).collect::<Vec<_>>(),
                    );
                    return Delivery::Dropped;
                }
                room += len;
                chains.push((head, buffers));
            }
            Err(why) => {
                tracing::debug!(why, "malformed virtio-net rx chain returned unused");
                discarded.push(head);
            }
        }
    }
    frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&(chains.len() as u16).to_le_bytes());
    let mut used: Vec<(u16, u32)> = discarded.iter().map(|&head| (head, 0)).collect();
    let mut rest: &[u8] = frame;
    for (head, buffers) in &chains {
        let mut written = 0usize;
        for &(address, len) in buffers {
            if rest.is_empty() {
                break;
            }
            let take = len.min(rest.len());
            if let Err(e) = memory.write_slice(&rest[..take], address) {
                tracing::warn!(error = %e, "cannot write a virtio-net rx buffer");
            }
            rest = &rest[take..];
            written += take;
        }
        used.push((*head, written as u32));
    }
    publish_used(active, &used);
    Delivery::Delivered
}

/// Returns `entries` to the driver in one step: a driver that polls the
/// used ring must never see the first chain of a merged frame before the
/// others (Linux drops the frame when a buffer it announced is missing).
/// Every entry but the last is written straight into the ring, the last
/// through the queue, whose release store of the index publishes them all.
fn publish_used(active: &mut Active, entries: &[(u16, u32)]) {
    let Some((&(last_head, last_len), earlier)) = entries.split_last() else {
        return;
    };
    let queue = &mut active.rx;
    let size = queue.size();
    let first = queue.next_used();
    for (position, &(head, len)) in earlier.iter().enumerate() {
        let slot = first.wrapping_add(position as u16) % size;
        let at = GuestAddress(queue.used_ring()).unchecked_add(4 + 8 * u64::from(slot));
        let mut element = [0u8; 8];
        element[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        element[4..].copy_from_slice(&len.to_le_bytes());
        if let Err(e) = active.memory.write_slice(&element, at) {
            tracing::warn!(error = %e, "cannot return a virtio-net rx chain");
        }
    }
    queue.set_next_used(first.wrapping_add(earlier.len() as u16));
    if let Err(e) = queue.add_used(&active.memory, last_head, last_len) {
        tracing::warn!(error = %e, "cannot return a virtio-net rx chain");
    }
}

/// The tap offloads (`TUN_F_*`) for the features the guest accepted: what
/// the guest cannot take, the tap must not hand over.
pub(crate) fn tun_offload(features: u64) -> u32 {
    let accepted = |feature: u32| features & (1 << feature) != 0;
    if !accepted(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if accepted(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if accepted(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if accepted(VIRTIO_NET_F_GUEST_ECN) && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
        flags |= libc::TUN_F_TSO_ECN;
    }
    flags
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        // The backend is watched from the first activation on.
        self.queues.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        match self.queues.process(fd, ops) {
            Wakeup::Watching => {
                self.process_tx();
                self.process_rx(ops);
            }
            Wakeup::Kicked(TX) => self.process_tx(),
            Wakeup::Kicked(RX) => self.process_rx(ops),
            Wakeup::Kicked(_) => {}
            // A reset: the backend is no longer watched.
            Wakeup::Handled => self.process_rx(ops),
            Wakeup::Other if fd == self.backend_fd() => self.process_rx(ops),
            Wakeup::Other => {
                tracing::debug!(fd, "virtio-net event for a descriptor no longer watched")
            }
        }
    }
}

impl LoopDevice for Net {
    const NAME: &'static str = "virtio-net";
    const DEVICE_TYPE: u32 = DEVICE_TYPE;
    const QUEUE_MAX_SIZES: &'static [u16] = QUEUE_SIZES;
    type Queues = [Queue; 2];

    fn features(&self) -> u64 {
        FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn take_queues(features: u64, queues: Vec<Queue>) -> Result<[Queue; 2], String> {
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            // The header would be 10 bytes, the tap's is 12.
            return Err("virtio-net needs VIRTIO_F_VERSION_1".into());
        }
        <[Queue; 2]>::try_from(queues).map_err(|_| "virtio-net needs exactly two queues".into())
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn activate(
        &mut self,
        memory: GuestMemory,
        [rx, tx]: [Queue; 2],
        features: u64,
        interrupt: Interrupt,
    ) -> Result<(), String> {
        let offload = tun_offload(features);
        self.backend
            .set_offload(offload)
            .map_err(|e| format!("setting the tap's offloads to {offload:#x}: {e}"))?;
        self.active = Some(Active {
            memory,
            rx,
            tx,
            mergeable: features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) -> Vec<Box<dyn AsRawFd + Send>> {
        self.active = None;
        self.pending = None;
        // Frames queued for a driver that is gone must not reach the next
        // one with offloads it may not accept.
        if let Err(e) = self.backend.set_offload(0) {
            tracing::debug!(error = %e, "cannot clear the tap's offloads");
        }
        Vec::new()
    }

    fn loop_queues(&mut self) -> &mut LoopQueues {
        &mut self.queues
    }
}
