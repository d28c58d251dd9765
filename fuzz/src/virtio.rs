//! A hostile guest driver for runv's virtio devices: the device sits
//! behind its production virtio-mmio transport and is served by an event
//! manager on the fuzzer's thread, exactly as the VM's event loop serves
//! it, but one step at a time so that every input is handled before the
//! next. The driver sets the device up normally (every offered feature,
//! every queue at a fixed place), then the input's [`Step`]s write guest
//! memory, kick queues, poke registers and act on the host side.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use runv_vmm::{
    event_loop::Subscriber,
    memory::{create_guest_memory, GuestMemory},
    virtio::{mmio::MmioTransport, VirtioDevice},
    BusDevice,
};
use virtio_bindings::{
    virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_FEATURES_OK,
    },
    virtio_mmio::*,
    virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE},
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::script::{steps, Script, Step};

/// Guest RAM: small, so that random addresses often land in it.
pub const MEMORY_SIZE: u64 = 0x1_0000;
/// The size the driver gives every queue.
pub const QUEUE_SIZE: u16 = 16;
/// Queue `n`'s rings lie at `n * RING_STRIDE`: descriptors first, then
/// the avail and used rings at these offsets.
pub const RING_STRIDE: u64 = 0x400;
pub const AVAIL_OFFSET: u64 = 0x100;
pub const USED_OFFSET: u64 = 0x200;
/// Where the seeds put buffers: above every queue's rings.
pub const BUFFERS: u64 = 0x1000;
/// Event-loop rounds after one step, at most: a device that always has
/// work (a backend that is always readable) must not hang the fuzzer.
const MAX_ROUNDS: usize = 16;

/// A device set up by a driver that then does what the input says.
pub struct HostileDriver {
    memory: GuestMemory,
    transport: MmioTransport,
    events: EventManager<Subscriber>,
    queues: usize,
}

impl HostileDriver {
    /// Puts `device` behind a transport and `subscriber` (the same device,
    /// as the event loop holds it) on an event manager, then sets the
    /// device up through the transport's registers.
    pub fn new(device: Box<dyn VirtioDevice>, subscriber: Subscriber) -> HostileDriver {
        let memory = create_guest_memory(MEMORY_SIZE).expect("guest memory");
        let queues = device.queue_max_sizes().len();
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("irq eventfd");
        let transport = MmioTransport::new(device, memory.clone(), irq).expect("transport");
        let mut events = EventManager::new().expect("event manager");
        events.add_subscriber(subscriber);
        let mut driver = HostileDriver {
            memory,
            transport,
            events,
            queues,
        };
        driver.set_up();
        driver.settle();
        driver
    }

    /// Shares a device for both sides of [`HostileDriver::new`].
    pub fn for_shared<D>(device: Arc<Mutex<D>>) -> HostileDriver
    where
        D: MutEventSubscriber + Send + 'static,
        Arc<Mutex<D>>: VirtioDevice + 'static,
    {
        HostileDriver::new(Box::new(device.clone()), device)
    }

    /// Runs the input's steps; `host` carries out the host actions.
    pub fn run(&mut self, input: &[u8], mut host: impl FnMut(u8, &[u8])) {
        for step in steps(input) {
            match step {
                Step::Write { address, bytes } => self.write_memory(address, bytes),
                Step::Kick { queue } => {
                    self.register(VIRTIO_MMIO_QUEUE_NOTIFY, u32::from(queue));
                }
                Step::Host { action, bytes } => host(action, bytes),
                Step::Register { offset, value } => self.register(u32::from(offset), value),
            }
            self.settle();
        }
    }

    /// The normal driver's handshake (virtio spec 3.1.1).
    fn set_up(&mut self) {
        let mut status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        self.register(VIRTIO_MMIO_STATUS, status);
        for select in 0..2 {
            self.register(VIRTIO_MMIO_DEVICE_FEATURES_SEL, select);
            let offered = self.read_register(VIRTIO_MMIO_DEVICE_FEATURES);
            self.register(VIRTIO_MMIO_DRIVER_FEATURES_SEL, select);
            self.register(VIRTIO_MMIO_DRIVER_FEATURES, offered);
        }
        status |= VIRTIO_CONFIG_S_FEATURES_OK;
        self.register(VIRTIO_MMIO_STATUS, status);
        for queue in 0..self.queues {
            let base = queue as u64 * RING_STRIDE;
            self.register(VIRTIO_MMIO_QUEUE_SEL, queue as u32);
            self.register(VIRTIO_MMIO_QUEUE_NUM, u32::from(QUEUE_SIZE));
            for (low, address) in [
                (VIRTIO_MMIO_QUEUE_DESC_LOW, base),
                (VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + AVAIL_OFFSET),
                (VIRTIO_MMIO_QUEUE_USED_LOW, base + USED_OFFSET),
            ] {
                self.register(low, address as u32);
            }
            self.register(VIRTIO_MMIO_QUEUE_READY, 1);
        }
        self.register(VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_DRIVER_OK);
    }

    fn write_memory(&self, address: u16, bytes: &[u8]) {
        let room = (MEMORY_SIZE - u64::from(address)) as usize;
        let bytes = &bytes[..bytes.len().min(room)];
        self.memory
            .write_slice(bytes, GuestAddress(u64::from(address)))
            .expect("within guest memory");
    }

    fn register(&mut self, offset: u32, value: u32) {
        self.transport
            .write(u64::from(offset), &value.to_le_bytes());
    }

    fn read_register(&mut self, offset: u32) -> u32 {
        let mut value = [0; 4];
        self.transport.read(u64::from(offset), &mut value);
        u32::from_le_bytes(value)
    }

    /// Lets the device handle what is pending, as the event loop would.
    fn settle(&mut self) {
        for _ in 0..MAX_ROUNDS {
            match self.events.run_with_timeout(0) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

/// A split-ring descriptor as the driver writes it.
pub fn descriptor(address: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut bytes = [0; 16];
    bytes[..8].copy_from_slice(&address.to_le_bytes());
    bytes[8..12].copy_from_slice(&len.to_le_bytes());
    bytes[12..14].copy_from_slice(&flags.to_le_bytes());
    bytes[14..].copy_from_slice(&next.to_le_bytes());
    bytes
}

/// One buffer of a seed's chain.
pub enum Part<'a> {
    /// Bytes for the device to read.
    Read(&'a [u8]),
    /// Room of this many bytes for the device to write.
    Write(u32),
}

/// Room for each descriptor's buffer in a seed.
const SEED_BUFFER: u64 = 0x400;

/// For seeds: `script` then a chain of `parts` in descriptors 0.. of
/// `queue`, each buffer in a slot of its own, made available as the
/// driver's `avail_index`th chain and kicked. Chains are handled at once,
/// so the next seed chain may reuse the descriptors.
pub fn publish_chain(mut script: Script, queue: u8, avail_index: u16, parts: &[Part]) -> Script {
    let rings = u64::from(queue) * RING_STRIDE;
    let buffers = BUFFERS + u64::from(queue) * 0x3000;
    for (index, part) in parts.iter().enumerate() {
        let address = buffers + index as u64 * SEED_BUFFER;
        let (len, mut flags) = match part {
            Part::Read(bytes) => {
                script = script.write(address as u16, bytes);
                (bytes.len() as u32, 0)
            }
            Part::Write(len) => (*len, VRING_DESC_F_WRITE as u16),
        };
        if index + 1 < parts.len() {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        let desc = descriptor(address, len, flags, index as u16 + 1);
        script = script.write((rings + 16 * index as u64) as u16, &desc);
    }
    let slot = rings + AVAIL_OFFSET + 4 + 2 * u64::from(avail_index % QUEUE_SIZE);
    script
        .write(slot as u16, &0u16.to_le_bytes())
        .write(
            (rings + AVAIL_OFFSET + 2) as u16,
            &avail_index.wrapping_add(1).to_le_bytes(),
        )
        .kick(queue)
}
