//! The guest's side of virtio queues, for device tests: split rings in
//! guest memory driven by hand, and a device set up either directly or
//! through virtio-mmio registers.

use std::{
    collections::HashMap,
    sync::{atomic::AtomicU32, Arc},
    time::{Duration, Instant},
};

use virtio_bindings::{
    virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
    },
    virtio_mmio::*,
    virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE},
};
use virtio_queue::{
    desc::{split::Descriptor, RawDescriptor},
    mock::MockSplitQueue,
    Queue, QueueT,
};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{mmio::MmioTransport, Activation, Interrupt, VirtioDevice};
use crate::{bus::BusDevice, memory::GuestMemory};

/// The size of every test ring.
pub(crate) const RING_SIZE: u16 = 64;
const USED_RING_OFFSET: u64 = 0x2000;
pub(crate) const WAIT: Duration = Duration::from_secs(5);

/// One split ring, driven from the driver's side through guest memory.
pub(crate) struct Ring {
    pub(crate) desc: GuestAddress,
    pub(crate) avail: GuestAddress,
    pub(crate) used: GuestAddress,
    pub(crate) next_avail: u16,
    next_used: u16,
    pub(crate) free: Vec<u16>,
    pub(crate) chains: HashMap<u16, Vec<u16>>,
}

impl Ring {
    pub(crate) fn new(memory: &GuestMemory, base: u64) -> (Ring, Queue) {
        let mock = MockSplitQueue::create(memory, GuestAddress(base), RING_SIZE);
        let mut queue = mock.create_queue::<Queue>().unwrap();
        // The mock places the used ring right after the first `RING_SIZE`
        // bytes of the avail ring, over its second half: move it clear.
        let used = GuestAddress(base + USED_RING_OFFSET);
        queue.set_used_ring_address(Some(used.raw_value() as u32), Some(0));
        memory.write_obj(0u16, used.unchecked_add(2)).unwrap();
        let ring = Ring {
            desc: mock.desc_table_addr(),
            avail: mock.avail_addr(),
            used,
            next_avail: 0,
            next_used: 0,
            free: (0..RING_SIZE).rev().collect(),
            chains: HashMap::new(),
        };
        (ring, queue)
    }

    pub(crate) fn write_desc(&self, memory: &GuestMemory, index: u16, desc: Descriptor) {
        let at = self.desc.unchecked_add(16 * u64::from(index));
        memory.write_obj(RawDescriptor::from(desc), at).unwrap();
    }

    /// Makes `head` available to the device.
    pub(crate) fn publish(&mut self, memory: &GuestMemory, head: u16) {
        let slot = u64::from(self.next_avail % RING_SIZE);
        memory
            .write_obj(head, self.avail.unchecked_add(4 + 2 * slot))
            .unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
        memory
            .write_obj(self.next_avail, self.avail.unchecked_add(2))
            .unwrap();
    }

    /// Writes a chain of `(len, write-only)` per descriptor, each at the
    /// address `address_of` its index, without publishing it yet.
    pub(crate) fn add_chain(
        &mut self,
        memory: &GuestMemory,
        parts: &[(u32, bool)],
        address_of: impl Fn(u16) -> u64,
    ) -> Vec<u16> {
        let indices: Vec<u16> = (0..parts.len())
            .map(|_| self.free.pop().expect("a free descriptor"))
            .collect();
        for (position, (&(len, write), &index)) in parts.iter().zip(&indices).enumerate() {
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            let next = indices.get(position + 1).copied().unwrap_or(0);
            if position + 1 < indices.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(
                memory,
                index,
                Descriptor::new(address_of(index), len, flags, next),
            );
        }
        self.chains.insert(indices[0], indices.clone());
        indices
    }

    /// Adds a chain of descriptors whose buffers need no contents.
    pub(crate) fn add_chain_now(
        &mut self,
        memory: &GuestMemory,
        parts: &[(u32, bool)],
        address_of: impl Fn(u16) -> u64,
    ) -> Vec<u16> {
        let indices = self.add_chain(memory, parts, address_of);
        self.publish(memory, indices[0]);
        indices
    }

    /// Lets the chain at `head` be reused.
    pub(crate) fn release(&mut self, head: u16) {
        if let Some(indices) = self.chains.remove(&head) {
            self.free.extend(indices);
        }
    }

    /// The chains the device returned since the last call: head and length.
    /// Their buffers stay ours until released.
    pub(crate) fn take_used(&mut self, memory: &GuestMemory) -> Vec<(u16, u32)> {
        let used_idx: u16 = memory.read_obj(self.used.unchecked_add(2)).unwrap();
        let mut returned = Vec::new();
        while self.next_used != used_idx {
            let at = self
                .used
                .unchecked_add(4 + 8 * u64::from(self.next_used % RING_SIZE));
            let id: u32 = memory.read_obj(at).unwrap();
            let len: u32 = memory.read_obj(at.unchecked_add(4)).unwrap();
            self.next_used = self.next_used.wrapping_add(1);
            returned.push((id as u16, len));
        }
        returned
    }
}

/// Activates `device` directly, without a transport, with one ring per
/// entry of `ring_bases` and the guest interrupt on `irq`; returns the
/// rings and the eventfds that kick each queue.
pub(crate) fn activate_directly(
    device: &mut dyn VirtioDevice,
    memory: &GuestMemory,
    ring_bases: &[u64],
    irq: &EventFd,
) -> (Vec<Ring>, Vec<EventFd>) {
    let features = device.features() | 1 << VIRTIO_F_VERSION_1;
    activate_with_features(device, memory, ring_bases, irq, features)
}

/// [`activate_directly`] with the driver accepting `features` only.
pub(crate) fn activate_with_features(
    device: &mut dyn VirtioDevice,
    memory: &GuestMemory,
    ring_bases: &[u64],
    irq: &EventFd,
    features: u64,
) -> (Vec<Ring>, Vec<EventFd>) {
    let (rings, queues): (Vec<Ring>, Vec<Queue>) = ring_bases
        .iter()
        .map(|&base| Ring::new(memory, base))
        .unzip();
    let kicks: Vec<EventFd> = ring_bases
        .iter()
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let activation = Activation {
        memory: memory.clone(),
        queues,
        queue_events: kicks.iter().map(|e| e.try_clone().unwrap()).collect(),
        features,
        interrupt: Interrupt {
            status: Arc::new(AtomicU32::new(0)),
            irq: Arc::new(irq.try_clone().unwrap()),
        },
    };
    device.activate(activation).unwrap();
    (rings, kicks)
}

/// `device` behind a virtio-mmio transport whose interrupt is `irq`, as
/// a slot holds it; checks that the transport reports `device_type`.
pub(crate) fn mmio_transport(
    device: Box<dyn VirtioDevice>,
    memory: &GuestMemory,
    irq: &EventFd,
    device_type: u32,
) -> MmioTransport {
    let mut transport =
        MmioTransport::new(device, memory.clone(), irq.try_clone().unwrap()).unwrap();
    assert_eq!(
        mmio_read(&mut transport, VIRTIO_MMIO_DEVICE_ID),
        device_type
    );
    transport
}

pub(crate) fn mmio_read(transport: &mut MmioTransport, offset: u32) -> u32 {
    let mut data = [0u8; 4];
    transport.read(u64::from(offset), &mut data);
    u32::from_le_bytes(data)
}

pub(crate) fn mmio_write(transport: &mut MmioTransport, offset: u32, value: u32) {
    transport.write(u64::from(offset), &value.to_le_bytes())
}

/// What a driver does through the registers: status handshake, accepting
/// `features` (VERSION_1 is added), one ring per entry of `ring_bases`,
/// DRIVER_OK; checks that the device took it.
pub(crate) fn set_up_through_mmio(
    transport: &mut MmioTransport,
    memory: &GuestMemory,
    features: u64,
    ring_bases: &[u64],
) -> Vec<Ring> {
    let features = features | 1 << VIRTIO_F_VERSION_1;
    mmio_write(transport, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    let driver = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    mmio_write(transport, VIRTIO_MMIO_STATUS, driver);
    for select in 0..2 {
        mmio_write(transport, VIRTIO_MMIO_DRIVER_FEATURES_SEL, select);
        mmio_write(
            transport,
            VIRTIO_MMIO_DRIVER_FEATURES,
            (features >> (32 * select)) as u32,
        );
    }
    let features_ok = driver | VIRTIO_CONFIG_S_FEATURES_OK;
    mmio_write(transport, VIRTIO_MMIO_STATUS, features_ok);
    let rings = ring_bases
        .iter()
        .enumerate()
        .map(|(index, &base)| {
            let (ring, _) = Ring::new(memory, base);
            mmio_write(transport, VIRTIO_MMIO_QUEUE_SEL, index as u32);
            mmio_write(transport, VIRTIO_MMIO_QUEUE_NUM, u32::from(RING_SIZE));
            for (low, address) in [
                (VIRTIO_MMIO_QUEUE_DESC_LOW, ring.desc),
                (VIRTIO_MMIO_QUEUE_AVAIL_LOW, ring.avail),
                (VIRTIO_MMIO_QUEUE_USED_LOW, ring.used),
            ] {
                mmio_write(transport, low, address.raw_value() as u32);
                mmio_write(transport, low + 4, (address.raw_value() >> 32) as u32);
            }
            mmio_write(transport, VIRTIO_MMIO_QUEUE_READY, 1);
            ring
        })
        .collect();
    mmio_write(
        transport,
        VIRTIO_MMIO_STATUS,
        features_ok | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    let status = mmio_read(transport, VIRTIO_MMIO_STATUS);
    assert_ne!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0, "features refused");
    assert_eq!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0, "activation failed");
    rings
}

impl Ring {
    /// Waits for the device to return the chain at `head`; returns the
    /// length it used. Other chains returned meanwhile are dropped.
    pub(crate) fn wait_used(&mut self, memory: &GuestMemory, head: u16) -> u32 {
        let deadline = Instant::now() + WAIT;
        loop {
            for (returned, len) in self.take_used(memory) {
                self.release(returned);
                if returned == head {
                    return len;
                }
            }
            assert!(Instant::now() < deadline, "chain {head} never returned");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// One descriptor of a test chain.
pub(crate) enum Desc {
    /// Bytes for the device to read.
    Read(Vec<u8>),
    /// Room for the device to write.
    Write(u32),
}

/// How the driver notifies a queue.
pub(crate) enum Kick {
    /// The queue's eventfd, as KVM's ioeventfd would signal it.
    Eventfd(EventFd),
    /// The transport's QueueNotify register.
    Mmio(Box<MmioTransport>),
}

/// One queue of a device under test, driven from the guest's side: each
/// descriptor's buffer sits at `buffers + index * BUFFER_SLOT`.
pub(crate) struct QueueDriver {
    pub(crate) memory: GuestMemory,
    pub(crate) ring: Ring,
    pub(crate) kick: Kick,
    pub(crate) queue: u16,
    pub(crate) buffers: u64,
}

/// Room for each descriptor's data.
pub(crate) const BUFFER_SLOT: u64 = 0x1_0000;

impl QueueDriver {
    pub(crate) fn buffer(&self, index: u16) -> u64 {
        self.buffers + u64::from(index) * BUFFER_SLOT
    }

    /// Publishes a chain of `descs`, kicks, and waits for the device to
    /// return it; returns the used length and each writable buffer.
    pub(crate) fn submit(&mut self, descs: &[Desc]) -> (u32, Vec<Vec<u8>>) {
        let parts: Vec<(u32, bool)> = descs
            .iter()
            .map(|desc| match desc {
                Desc::Read(bytes) => (bytes.len() as u32, false),
                Desc::Write(len) => (*len, true),
            })
            .collect();
        let buffers = self.buffers;
        let indices = self.ring.add_chain(&self.memory, &parts, |index| {
            buffers + u64::from(index) * BUFFER_SLOT
        });
        for (desc, &index) in descs.iter().zip(&indices) {
            let fill = match desc {
                Desc::Read(bytes) => bytes.clone(),
                Desc::Write(len) => vec![0xee; *len as usize],
            };
            self.memory
                .write_slice(&fill, GuestAddress(self.buffer(index)))
                .unwrap();
        }
        self.ring.publish(&self.memory, indices[0]);
        self.kick();
        let used = self.ring.wait_used(&self.memory, indices[0]);
        let written = descs
            .iter()
            .zip(&indices)
            .filter_map(|(desc, &index)| {
                let Desc::Write(len) = desc else {
                    return None;
                };
                let mut bytes = vec![0; *len as usize];
                self.memory
                    .read_slice(&mut bytes, GuestAddress(self.buffer(index)))
                    .unwrap();
                Some(bytes)
            })
            .collect();
        (used, written)
    }

    pub(crate) fn kick(&mut self) {
        match &mut self.kick {
            Kick::Eventfd(event) => event.write(1).unwrap(),
            Kick::Mmio(transport) => {
                mmio_write(transport, VIRTIO_MMIO_QUEUE_NOTIFY, u32::from(self.queue))
            }
        }
    }
}
