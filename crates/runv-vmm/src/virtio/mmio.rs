//! The virtio-mmio transport (version 2): the register window through
//! which the guest driver discovers a device, negotiates features, sets up
//! queues, and kicks them. The guest finds each window through a
//! `virtio_mmio.device=<size>@<base>:<irq>` kernel parameter.

use std::sync::{atomic::AtomicU32, Arc};

use virtio_bindings::{
    virtio_config::{
        VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
        VIRTIO_F_VERSION_1,
    },
    virtio_mmio::*,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, Interrupt, VirtioDevice};
use crate::{bus::BusDevice, memory::GuestMemory};

/// "virt" in little-endian.
pub(crate) const MAGIC_VALUE: u32 = 0x7472_6976;
pub(crate) const MMIO_VERSION: u32 = 2;
/// The vendor ID runv reports ("RUNV" is as good as any).
const VENDOR_ID: u32 = 0x564e_5552;
/// The size of one device's register window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Where in the window the driver writes the index of a queue it notifies.
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    memory: GuestMemory,
    queues: Vec<Queue>,
    /// One per queue, for the whole life of the transport: KVM holds them
    /// as ioeventfds for the window's QUEUE_NOTIFY register.
    queue_events: Vec<EventFd>,
    interrupt: Interrupt,
    status: u32,
    activated: bool,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// Wraps `device`; `irq` is the irqfd of the window's interrupt line.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemory,
        irq: EventFd,
    ) -> std::io::Result<MmioTransport> {
        let queues = fresh_queues(device.as_ref());
        let queue_events = queues
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<_>>()?;
        Ok(MmioTransport {
            device,
            memory,
            queues,
            queue_events,
            interrupt: Interrupt {
                status: Arc::new(AtomicU32::new(0)),
                irq: Arc::new(irq),
            },
            status: 0,
            activated: false,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            config_generation: 0,
        })
    }

    /// The eventfd of each queue, in queue order, to register with KVM as
    /// ioeventfds at [`QUEUE_NOTIFY_OFFSET`] with the queue index as datamatch.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The kernel parameter that declares this window to the guest.
    pub fn kernel_param(base: u64, irq: u32) -> String {
        format!(
            "virtio_mmio.device={}K@{base:#x}:{irq}",
            MMIO_WINDOW_SIZE / 1024
        )
    }

    fn device_features(&self) -> u64 {
        self.device.features() | (1 << VIRTIO_F_VERSION_1)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn read_register(&self, offset: u32) -> u32 {
        let half = |value: u64, select: u32| match select {
            0 => value as u32,
            1 => (value >> 32) as u32,
            _ => 0,
        };
        let queue = self.queues.get(self.queue_select as usize);
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => {
                half(self.device_features(), self.device_features_select)
            }
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self
                .interrupt
                .status
                .load(std::sync::atomic::Ordering::SeqCst),
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            // No device here has shared memory regions: the spec's answer
            // for a region that does not exist is a length of all ones
            // (Linux's virtio-fs would take 0 for an empty region at 0).
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            _ => {
                tracing::debug!(offset, "read of an unknown virtio-mmio register");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        // Queue and feature setup is only allowed before the device runs.
        let setting_up = !self.activated;
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES if setting_up => match self.driver_features_select {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            VIRTIO_MMIO_QUEUE_NUM if setting_up => {
                // An invalid size (above the maximum, not a power of two)
                // is refused by the queue and left at its previous value.
                if let Some(queue) = self.selected_queue() {
                    queue.set_size(value as u16);
                }
            }
            VIRTIO_MMIO_QUEUE_READY if setting_up => {
                if let Some(queue) = self.selected_queue() {
                    queue.set_ready(value == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW | VIRTIO_MMIO_QUEUE_DESC_HIGH if setting_up => {
                let (low, high) = split(offset == VIRTIO_MMIO_QUEUE_DESC_LOW, value);
                if let Some(queue) = self.selected_queue() {
                    queue.set_desc_table_address(low, high);
                }
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW | VIRTIO_MMIO_QUEUE_AVAIL_HIGH if setting_up => {
                let (low, high) = split(offset == VIRTIO_MMIO_QUEUE_AVAIL_LOW, value);
                if let Some(queue) = self.selected_queue() {
                    queue.set_avail_ring_address(low, high);
                }
            }
            VIRTIO_MMIO_QUEUE_USED_LOW | VIRTIO_MMIO_QUEUE_USED_HIGH if setting_up => {
                let (low, high) = split(offset == VIRTIO_MMIO_QUEUE_USED_LOW, value);
                if let Some(queue) = self.selected_queue() {
                    queue.set_used_ring_address(low, high);
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY if self.activated => match u16::try_from(value) {
                // The device owns the queues now: count them on its side.
                Ok(queue) if usize::from(queue) < self.device.queue_max_sizes().len() => {
                    self.device.queue_notify(queue)
                }
                _ => tracing::debug!(value, "notify of a queue the device does not have"),
            },
            VIRTIO_MMIO_INTERRUPT_ACK => {
                self.interrupt
                    .status
                    .fetch_and(!value, std::sync::atomic::Ordering::SeqCst);
            }
            VIRTIO_MMIO_STATUS => self.set_status(value),
            _ => tracing::debug!(offset, value, "ignored virtio-mmio register write"),
        }
    }

    /// The driver's status handshake: 0 resets, FEATURES_OK is refused
    /// for features the device did not offer, DRIVER_OK activates.
    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut status = value;
        if status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.driver_features & !self.device_features() != 0
        {
            tracing::warn!(
                driver = self.driver_features,
                device = self.device_features(),
                "driver accepted features the device does not offer"
            );
            status &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        self.status = status;
        if status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !self.activated {
            if let Err(why) = self.activate() {
                tracing::warn!(device = self.device.device_type(), %why, "cannot activate");
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                self.interrupt.signal_config_change();
            }
        }
    }

    fn activate(&mut self) -> Result<(), String> {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            return Err("DRIVER_OK without FEATURES_OK".into());
        }
        for (index, queue) in self.queues.iter().enumerate() {
            if !queue.is_valid(&self.memory) {
                return Err(format!(
                    "queue {index} is not ready or lies outside guest memory"
                ));
            }
        }
        // The device owns the queues from now on; a reset makes new ones.
        let queues = std::mem::take(&mut self.queues);
        let queue_events = self
            .queue_events
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<_>>()
            .map_err(|e| format!("duplicating the queue eventfds: {e}"))?;
        self.device.activate(Activation {
            memory: self.memory.clone(),
            queues,
            queue_events,
            features: self.driver_features,
            interrupt: self.interrupt.clone(),
        })?;
        self.activated = true;
        Ok(())
    }

    /// What the driver's write of status 0 does: the device lets go of
    /// its queues and of everything it served through them.
    pub fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
        self.queues = fresh_queues(self.device.as_ref());
        self.interrupt
            .status
            .store(0, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The device's queues as the driver first finds them.
fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
        .collect()
}

/// A 32-bit half of a 64-bit queue address, as QueueT's setters take it.
fn split(low: bool, value: u32) -> (Option<u32>, Option<u32>) {
    if low {
        (Some(value), None)
    } else {
        (None, Some(value))
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        data.fill(0);
        // Registers are read as aligned 32-bit words only.
        if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_register(offset as u32).to_le_bytes());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            tracing::debug!(offset, "write to read-only virtio config space ignored");
            return;
        }
        if let (Ok(word), true) = (<[u8; 4]>::try_from(data), offset % 4 == 0) {
            self.write_register(offset as u32, u32::from_le_bytes(word));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};

    use super::*;
    use crate::memory::create_guest_memory;

    const QUEUE_MAX: u16 = 16;

    /// What the test device saw.
    #[derive(Default)]
    struct Seen {
        activations: Vec<(u64, Vec<u16>)>,
        notified: Vec<u16>,
        resets: usize,
        interrupt: Option<Interrupt>,
    }

    struct TestDevice(Arc<Mutex<Seen>>);

    impl VirtioDevice for TestDevice {
        fn device_type(&self) -> u32 {
            19
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[QUEUE_MAX]
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 0x40);
        }
        fn activate(&mut self, activation: Activation) -> Result<(), String> {
            let sizes = activation.queues.iter().map(|q| q.size()).collect();
            let mut seen = self.0.lock().unwrap();
            seen.activations.push((activation.features, sizes));
            seen.interrupt = Some(activation.interrupt);
            Ok(())
        }
        fn queue_notify(&mut self, queue: u16) {
            self.0.lock().unwrap().notified.push(queue);
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
    }

    struct Driver {
        transport: MmioTransport,
        seen: Arc<Mutex<Seen>>,
        irq: EventFd,
        memory: GuestMemory,
    }

    impl Driver {
        fn new() -> Driver {
            let seen = Arc::new(Mutex::new(Seen::default()));
            let memory = create_guest_memory(1 << 20).unwrap();
            let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let transport = MmioTransport::new(
                Box::new(TestDevice(seen.clone())),
                memory.clone(),
                irq.try_clone().unwrap(),
            )
            .unwrap();
            Driver {
                transport,
                seen,
                irq,
                memory,
            }
        }

        fn read(&mut self, offset: u32) -> u32 {
            let mut data = [0u8; 4];
            self.transport.read(u64::from(offset), &mut data);
            u32::from_le_bytes(data)
        }

        fn write(&mut self, offset: u32, value: u32) {
            self.transport
                .write(u64::from(offset), &value.to_le_bytes());
        }

        fn set_queue(
            &mut self,
            size: u32,
            desc: GuestAddress,
            avail: GuestAddress,
            used: GuestAddress,
        ) {
            let halves = |a: GuestAddress| (a.raw_value() as u32, (a.raw_value() >> 32) as u32);
            self.write(VIRTIO_MMIO_QUEUE_SEL, 0);
            self.write(VIRTIO_MMIO_QUEUE_NUM, size);
            for (low, high, addr) in [
                (
                    VIRTIO_MMIO_QUEUE_DESC_LOW,
                    VIRTIO_MMIO_QUEUE_DESC_HIGH,
                    desc,
                ),
                (
                    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                    VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                    avail,
                ),
                (
                    VIRTIO_MMIO_QUEUE_USED_LOW,
                    VIRTIO_MMIO_QUEUE_USED_HIGH,
                    used,
                ),
            ] {
                let (l, h) = halves(addr);
                self.write(low, l);
                self.write(high, h);
            }
            self.write(VIRTIO_MMIO_QUEUE_READY, 1);
        }

        /// Sets up queue 0 with `size` on rings laid out by virtio-queue's mock.
        fn set_mock_queue(&mut self, size: u32) {
            let memory = self.memory.clone();
            let mock = MockSplitQueue::new(&memory, QUEUE_MAX);
            self.set_queue(
                size,
                mock.desc_table_addr(),
                mock.avail_addr(),
                mock.used_addr(),
            );
        }

        /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the status read back.
        fn negotiate(&mut self, features: u64) -> u32 {
            self.write(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
            self.write(
                VIRTIO_MMIO_STATUS,
                VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
            );
            for select in 0..2 {
                self.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, select);
                self.write(
                    VIRTIO_MMIO_DRIVER_FEATURES,
                    (features >> (32 * select)) as u32,
                );
            }
            let status =
                VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
            self.write(VIRTIO_MMIO_STATUS, status);
            self.read(VIRTIO_MMIO_STATUS)
        }

        fn driver_ok(&mut self) -> u32 {
            let status = self.read(VIRTIO_MMIO_STATUS) | VIRTIO_CONFIG_S_DRIVER_OK;
            self.write(VIRTIO_MMIO_STATUS, status);
            self.read(VIRTIO_MMIO_STATUS)
        }
    }

    const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;

    #[test]
    fn identifies_itself_and_offers_version_1() {
        let mut driver = Driver::new();
        assert_eq!(driver.read(VIRTIO_MMIO_MAGIC_VALUE), MAGIC_VALUE);
        assert_eq!(driver.read(VIRTIO_MMIO_VERSION), 2);
        assert_eq!(driver.read(VIRTIO_MMIO_DEVICE_ID), 19);
        assert_eq!(driver.read(VIRTIO_MMIO_QUEUE_NUM_MAX), u32::from(QUEUE_MAX));
        driver.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(driver.read(VIRTIO_MMIO_DEVICE_FEATURES), 1 << 3);
        driver.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(driver.read(VIRTIO_MMIO_DEVICE_FEATURES), 1);
        let mut config = [0u8; 2];
        driver
            .transport
            .read(u64::from(VIRTIO_MMIO_CONFIG) + 4, &mut config);
        assert_eq!(config, [0x44, 0x44]);
        assert_eq!(
            MmioTransport::kernel_param(0xd000_0000, 5),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
    }

    #[test]
    fn has_no_shared_memory_region() {
        let mut driver = Driver::new();
        driver.write(VIRTIO_MMIO_SHM_SEL, 0);
        for register in [VIRTIO_MMIO_SHM_LEN_LOW, VIRTIO_MMIO_SHM_LEN_HIGH] {
            assert_eq!(driver.read(register), u32::MAX, "{register:#x}");
        }
    }

    #[test]
    fn handshake_activates_notifies_and_interrupts() {
        let mut driver = Driver::new();
        driver.set_mock_queue(u32::from(QUEUE_MAX));
        let status = driver.negotiate(VERSION_1 | 1 << 3);
        assert_ne!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        let status = driver.driver_ok();
        assert_eq!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(
            driver.seen.lock().unwrap().activations,
            vec![(VERSION_1 | 1 << 3, vec![QUEUE_MAX])]
        );

        driver.write(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        driver.write(VIRTIO_MMIO_QUEUE_NOTIFY, 7);
        assert_eq!(driver.seen.lock().unwrap().notified, vec![0]);

        let interrupt = driver.seen.lock().unwrap().interrupt.clone().unwrap();
        interrupt.signal_used_queue();
        assert_eq!(
            driver.read(VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );
        assert_eq!(driver.irq.read().unwrap(), 1);
        driver.write(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(driver.read(VIRTIO_MMIO_INTERRUPT_STATUS), 0);

        driver.write(VIRTIO_MMIO_STATUS, 0);
        assert_eq!(driver.read(VIRTIO_MMIO_STATUS), 0);
        assert_eq!(driver.seen.lock().unwrap().resets, 1);
    }

    #[test]
    fn invalid_queue_sizes_are_refused() {
        let mut driver = Driver::new();
        // Not a power of two, then above the maximum: both leave the size alone.
        driver.set_mock_queue(12);
        driver.write(VIRTIO_MMIO_QUEUE_NUM, 1024);
        driver.negotiate(VERSION_1);
        driver.driver_ok();
        assert_eq!(
            driver.seen.lock().unwrap().activations[0].1,
            vec![QUEUE_MAX]
        );
        // A smaller power of two is taken.
        let mut driver = Driver::new();
        driver.set_mock_queue(8);
        driver.negotiate(VERSION_1);
        driver.driver_ok();
        assert_eq!(driver.seen.lock().unwrap().activations[0].1, vec![8]);
    }

    #[test]
    fn rings_outside_guest_memory_fail_activation_until_reset() {
        let mut driver = Driver::new();
        let outside = GuestAddress(2 << 20);
        driver.set_queue(
            u32::from(QUEUE_MAX),
            outside,
            GuestAddress(0x1000),
            GuestAddress(0x2000),
        );
        driver.negotiate(VERSION_1);
        let status = driver.driver_ok();
        assert_ne!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert!(driver.seen.lock().unwrap().activations.is_empty());
        assert_eq!(
            driver.read(VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
        // An aligned descriptor table that runs past the end of RAM too.
        let mut driver = Driver::new();
        driver.set_queue(
            u32::from(QUEUE_MAX),
            GuestAddress((1 << 20) - 128),
            GuestAddress(0x1000),
            GuestAddress(0x2000),
        );
        driver.negotiate(VERSION_1);
        assert_ne!(driver.driver_ok() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        // After a reset the driver can set the device up properly.
        driver.write(VIRTIO_MMIO_STATUS, 0);
        driver.set_mock_queue(u32::from(QUEUE_MAX));
        driver.negotiate(VERSION_1);
        assert_eq!(driver.driver_ok() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(driver.seen.lock().unwrap().activations.len(), 1);
    }

    #[test]
    fn features_the_device_did_not_offer_are_refused() {
        let mut driver = Driver::new();
        driver.set_mock_queue(u32::from(QUEUE_MAX));
        let status = driver.negotiate(VERSION_1 | 1 << 40);
        assert_eq!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        driver.driver_ok();
        assert!(driver.seen.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn odd_accesses_and_late_setup_are_ignored() {
        let mut driver = Driver::new();
        let mut short = [0xffu8; 2];
        driver.transport.read(0, &mut short);
        assert_eq!(short, [0, 0], "registers are 32-bit");
        let mut word = [0xffu8; 4];
        driver.transport.read(2, &mut word);
        assert_eq!(word, [0; 4], "unaligned register reads give zero");
        driver
            .transport
            .write(u64::from(VIRTIO_MMIO_STATUS), &[1, 0]);
        assert_eq!(driver.read(VIRTIO_MMIO_STATUS), 0);
        driver.write(VIRTIO_MMIO_QUEUE_SEL, 9);
        driver.write(VIRTIO_MMIO_QUEUE_NUM, 4);
        assert_eq!(driver.read(VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "no queue 9");
        driver.transport.write(u64::from(VIRTIO_MMIO_CONFIG), &[1]);

        driver.set_mock_queue(u32::from(QUEUE_MAX));
        driver.negotiate(VERSION_1);
        driver.driver_ok();
        // Features cannot change once the device runs.
        driver.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        driver.write(VIRTIO_MMIO_DRIVER_FEATURES, 1 << 3);
        driver.write(VIRTIO_MMIO_STATUS, 0);
        driver.negotiate(VERSION_1);
        driver.set_mock_queue(u32::from(QUEUE_MAX));
        driver.driver_ok();
        let activations = &driver.seen.lock().unwrap().activations;
        assert_eq!(activations.len(), 2);
        assert_eq!(
            activations[1].0, VERSION_1,
            "the reset cleared old features"
        );
    }
}
