//! Virtio-mmio slots declared to the guest at boot, each empty or holding
//! one device, filled and emptied while the guest runs: hot-plug without
//! PCI, ACPI or guest kernel patches (docs/hotplug.md).
//!
//! An empty slot answers as a virtio-mmio device with device ID 0, which
//! Linux's driver takes for a placeholder: its probe ends with ENODEV and
//! leaves the platform device `virtio-mmio.<slot>` unbound. Once `attach`
//! has filled the slot, the guest agent binds that platform device to the
//! driver, which probes again and finds the device. Before `detach`
//! empties the slot, the agent unbinds it.

use std::{
    fmt,
    sync::{Arc, Mutex},
};

use kvm_ioctls::IoEventAddress;
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_MAGIC_VALUE, VIRTIO_MMIO_VERSION};
use vmm_sys_util::eventfd::EventFd;

use crate::{
    bus::BusDevice,
    kvm,
    memory::MMIO_GAP_START,
    mptable::IOAPIC_PINS,
    virtio::{
        mmio::{MmioTransport, MAGIC_VALUE, MMIO_VERSION, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET},
        VirtioDevice,
    },
    vm::Vm,
    VmmError,
};

/// Slot `n` takes IOAPIC pin `FIRST_SLOT_IRQ + n`: the pins below are the
/// PIT's, the PIC cascade's and the legacy devices' (COM1 is IRQ 4).
const FIRST_SLOT_IRQ: u32 = 5;
/// As many slots as free IOAPIC pins, each with an interrupt of its own.
pub const MAX_SLOTS: usize = IOAPIC_PINS as usize - FIRST_SLOT_IRQ as usize;

/// A slot's index, which is also the guest's name for it: the platform
/// device `virtio-mmio.<index>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotIndex(pub usize);

impl fmt::Display for SlotIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The virtio-mmio slots of one VM.
pub struct DeviceManager {
    slots: Vec<Slot>,
}

/// One slot: a register window and an interrupt line, fixed at boot.
struct Slot {
    base: u64,
    irq: u32,
    /// Also on the VM's MMIO bus, where vCPUs reach it.
    window: Arc<Mutex<SlotWindow>>,
}

/// What the guest finds in a slot's window.
#[derive(Default)]
struct SlotWindow {
    device: Option<Plugged>,
}

/// A device in a slot, with the irqfd KVM holds for it.
struct Plugged {
    transport: MmioTransport,
    irq: EventFd,
}

impl DeviceManager {
    /// Reserves `count` slots at the start of the MMIO gap, one window and
    /// one interrupt each, on `vm`'s MMIO bus. Call it before the vCPUs
    /// run, and put [`DeviceManager::kernel_params`] on the command line.
    pub fn new(vm: &mut Vm, count: usize) -> Result<DeviceManager, VmmError> {
        if count > MAX_SLOTS {
            return Err(VmmError::Device(format!(
                "{count} virtio-mmio slots asked for, but there are IOAPIC pins for {MAX_SLOTS}"
            )));
        }
        let mut slots = Vec::with_capacity(count);
        for index in 0..count {
            let slot = Slot {
                base: MMIO_GAP_START + index as u64 * MMIO_WINDOW_SIZE,
                irq: FIRST_SLOT_IRQ + index as u32,
                window: Arc::default(),
            };
            vm.mmio.insert(
                "virtio-mmio slot",
                slot.base,
                MMIO_WINDOW_SIZE,
                slot.window.clone(),
            )?;
            slots.push(slot);
        }
        Ok(DeviceManager { slots })
    }

    /// The kernel parameters that declare every slot. Each names its
    /// platform device explicitly (`:<id>`), so that slot `n` is
    /// `virtio-mmio.n` in the guest whatever else is on the command line.
    pub fn kernel_params(&self) -> String {
        self.slots
            .iter()
            .enumerate()
            .map(|(index, slot)| {
                format!(
                    "{}:{index}",
                    MmioTransport::kernel_param(slot.base, slot.irq)
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Puts `device` in the first free slot, wired to KVM: its interrupt
    /// through an irqfd, each queue's notification through an ioeventfd.
    /// Before the guest boots, its first probe finds the device (cold
    /// plug); afterwards the agent must bind the slot (`PlugVirtioMmio`).
    pub fn attach(&self, vm: &Vm, device: Box<dyn VirtioDevice>) -> Result<SlotIndex, VmmError> {
        for (index, slot) in self.slots.iter().enumerate() {
            // Held from the check to the fill: concurrent attaches cannot
            // pick the same slot.
            let mut window = slot.window.lock().expect("slot lock");
            if window.device.is_none() {
                window.device = Some(slot.plug(vm, device)?);
                return Ok(SlotIndex(index));
            }
        }
        Err(VmmError::NoFreeSlot {
            slots: self.slots.len(),
        })
    }

    /// Resets every device, as its driver would. Once the VM has ended,
    /// this is how the host ends of its devices learn of it at once: the
    /// vsock device shuts every host connection down, so that no client
    /// waits on a guest that is gone.
    pub fn reset_all(&self) {
        for slot in &self.slots {
            if let Some(plugged) = slot.window.lock().expect("slot lock").device.as_mut() {
                plugged.transport.reset();
            }
        }
    }

    /// Empties `slot`: KVM lets go of the device's eventfds and the device
    /// is dropped. The guest must have unbound the slot first
    /// (`UnplugVirtioMmio`), or its driver is left with a vanished device.
    pub fn detach(&self, vm: &Vm, slot: SlotIndex) -> Result<(), VmmError> {
        let owner = self.slots.get(slot.0).ok_or(VmmError::SlotNotInUse(slot))?;
        let plugged = owner
            .window
            .lock()
            .expect("slot lock")
            .device
            .take()
            .ok_or(VmmError::SlotNotInUse(slot))?;
        owner.unwire(vm, &plugged, plugged.transport.queue_events().len())
    }
}

impl Slot {
    fn notify_address(&self) -> IoEventAddress {
        IoEventAddress::Mmio(self.base + QUEUE_NOTIFY_OFFSET)
    }

    /// Wraps `device` in a transport and registers its eventfds with KVM.
    fn plug(&self, vm: &Vm, device: Box<dyn VirtioDevice>) -> Result<Plugged, VmmError> {
        let eventfd_error = |e: std::io::Error| VmmError::Device(format!("creating an irqfd: {e}"));
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(eventfd_error)?;
        let transport = MmioTransport::new(
            device,
            vm.memory().clone(),
            irq.try_clone().map_err(eventfd_error)?,
        )
        .map_err(|e| VmmError::Device(format!("creating the queue eventfds: {e}")))?;
        vm.fd()
            .register_irqfd(&irq, self.irq)
            .map_err(kvm("KVM_IRQFD"))?;
        let plugged = Plugged { transport, irq };
        for (queue, event) in plugged.transport.queue_events().iter().enumerate() {
            // The driver writes the queue's index to QUEUE_NOTIFY: KVM
            // signals that queue's eventfd without leaving the kernel.
            if let Err(e) = vm
                .fd()
                .register_ioevent(event, &self.notify_address(), queue as u32)
            {
                if let Err(undo) = self.unwire(vm, &plugged, queue) {
                    tracing::warn!(error = %undo, "cannot undo a failed attach");
                }
                return Err(kvm("KVM_IOEVENTFD")(e));
            }
        }
        Ok(plugged)
    }

    /// Unregisters the irqfd and the first `queues` ioeventfds of
    /// `plugged`, all of them even when one fails; returns the first error.
    fn unwire(&self, vm: &Vm, plugged: &Plugged, queues: usize) -> Result<(), VmmError> {
        let mut result = Ok(());
        for (queue, event) in plugged.transport.queue_events()[..queues]
            .iter()
            .enumerate()
        {
            let unregistered = vm
                .fd()
                .unregister_ioevent(event, &self.notify_address(), queue as u32)
                .map_err(kvm("KVM_IOEVENTFD (deassign)"));
            result = result.and(unregistered);
        }
        let unregistered = vm
            .fd()
            .unregister_irqfd(&plugged.irq, self.irq)
            .map_err(kvm("KVM_IRQFD (deassign)"));
        result.and(unregistered)
    }
}

impl BusDevice for SlotWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match &mut self.device {
            Some(plugged) => plugged.transport.read(offset, data),
            None => read_placeholder(offset, data),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(plugged) = &mut self.device {
            plugged.transport.write(offset, data);
        }
    }
}

/// An empty slot's registers: the magic value and version of a virtio-mmio
/// device, then device ID 0 (a placeholder) and zero everywhere else.
fn read_placeholder(offset: u64, data: &mut [u8]) {
    data.fill(0);
    let value = match u32::try_from(offset) {
        Ok(VIRTIO_MMIO_MAGIC_VALUE) => MAGIC_VALUE,
        Ok(VIRTIO_MMIO_VERSION) => MMIO_VERSION,
        _ => return,
    };
    if data.len() == 4 {
        data.copy_from_slice(&value.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_STATUS};

    use super::*;
    use crate::{memory::create_guest_memory, virtio::Activation};

    /// A two-queue device that says when it is dropped.
    struct TestDevice {
        dropped: Arc<AtomicBool>,
    }

    impl VirtioDevice for TestDevice {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[8, 8]
        }
        fn features(&self) -> u64 {
            0
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn activate(&mut self, _activation: Activation) -> Result<(), String> {
            Ok(())
        }
        fn queue_notify(&mut self, _queue: u16) {}
        fn reset(&mut self) {}
    }

    impl Drop for TestDevice {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    fn device() -> (Box<dyn VirtioDevice>, Arc<AtomicBool>) {
        let dropped = Arc::new(AtomicBool::new(false));
        let device = TestDevice {
            dropped: dropped.clone(),
        };
        (Box::new(device), dropped)
    }

    /// A VM with `slots` slots, or None (saying why) without usable KVM.
    fn vm_with_slots(slots: usize) -> Option<(Vm, DeviceManager)> {
        if !crate::testing::kvm_usable() {
            return None;
        }
        let mut vm = Vm::new(create_guest_memory(1 << 20).unwrap()).expect("KVM VM");
        let devices = DeviceManager::new(&mut vm, slots).unwrap();
        Some((vm, devices))
    }

    fn register(vm: &Vm, slot: usize, register: u32) -> u32 {
        let mut data = [0u8; 4];
        let address = MMIO_GAP_START + slot as u64 * MMIO_WINDOW_SIZE + u64::from(register);
        assert!(
            vm.mmio.read(address, &mut data),
            "slot {slot} is on the bus"
        );
        u32::from_le_bytes(data)
    }

    #[test]
    fn an_empty_slot_reads_as_a_placeholder() {
        let mut window = SlotWindow::default();
        let mut read = |offset: u32| {
            let mut data = [0xffu8; 4];
            window.read(u64::from(offset), &mut data);
            u32::from_le_bytes(data)
        };
        assert_eq!(read(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976, "\"virt\"");
        assert_eq!(read(VIRTIO_MMIO_VERSION), 2);
        assert_eq!(read(VIRTIO_MMIO_DEVICE_ID), 0, "a placeholder");
        assert_eq!(read(VIRTIO_MMIO_STATUS), 0);
        let mut byte = [0xffu8; 1];
        window.read(u64::from(VIRTIO_MMIO_MAGIC_VALUE), &mut byte);
        assert_eq!(byte, [0], "registers are 32-bit");
        window.write(u64::from(VIRTIO_MMIO_STATUS), &1u32.to_le_bytes());
        assert!(
            window.device.is_none(),
            "writes to an empty slot do nothing"
        );
    }

    #[test]
    fn kernel_params_declare_every_slot_under_its_index() {
        let Some((_vm, devices)) = vm_with_slots(3) else {
            return;
        };
        assert_eq!(
            devices.kernel_params(),
            "virtio_mmio.device=4K@0xd0000000:5:0 \
             virtio_mmio.device=4K@0xd0001000:6:1 \
             virtio_mmio.device=4K@0xd0002000:7:2"
        );
        let Some((_vm, devices)) = vm_with_slots(MAX_SLOTS) else {
            return;
        };
        let last = devices
            .kernel_params()
            .rsplit(' ')
            .next()
            .unwrap()
            .to_owned();
        assert_eq!(
            last, "virtio_mmio.device=4K@0xd0012000:23:18",
            "IRQ 23 is the last pin"
        );
    }

    #[test]
    fn more_slots_than_free_interrupts_are_refused() {
        let Some((mut vm, _)) = vm_with_slots(0) else {
            return;
        };
        let Err(err) = DeviceManager::new(&mut vm, MAX_SLOTS + 1) else {
            panic!("20 slots accepted");
        };
        assert!(err.to_string().contains("IOAPIC pins for 19"), "{err}");
    }

    #[test]
    fn attach_fills_free_slots_in_order_until_none_is_left() {
        let Some((vm, devices)) = vm_with_slots(2) else {
            return;
        };
        assert_eq!(register(&vm, 0, VIRTIO_MMIO_DEVICE_ID), 0);
        assert_eq!(devices.attach(&vm, device().0).unwrap(), SlotIndex(0));
        assert_eq!(devices.attach(&vm, device().0).unwrap(), SlotIndex(1));
        assert_eq!(register(&vm, 0, VIRTIO_MMIO_DEVICE_ID), 2);
        assert_eq!(register(&vm, 1, VIRTIO_MMIO_DEVICE_ID), 2);
        let (third, dropped) = device();
        let err = devices.attach(&vm, third).unwrap_err();
        assert!(matches!(err, VmmError::NoFreeSlot { slots: 2 }), "{err}");
        assert!(
            dropped.load(Ordering::SeqCst),
            "a refused device is dropped"
        );
    }

    #[test]
    fn detach_empties_the_slot_for_the_next_device() {
        let Some((vm, devices)) = vm_with_slots(2) else {
            return;
        };
        let (first, dropped) = device();
        let slot = devices.attach(&vm, first).unwrap();
        devices.detach(&vm, slot).unwrap();
        assert!(
            dropped.load(Ordering::SeqCst),
            "the detached device is dropped"
        );
        assert_eq!(
            register(&vm, 0, VIRTIO_MMIO_DEVICE_ID),
            0,
            "a placeholder again"
        );
        // KVM refuses a second ioeventfd for the same address and value:
        // attaching again works only if detach unregistered them.
        assert_eq!(devices.attach(&vm, device().0).unwrap(), SlotIndex(0));
        assert_eq!(register(&vm, 0, VIRTIO_MMIO_DEVICE_ID), 2);
    }

    #[test]
    fn detaching_an_empty_or_unknown_slot_is_refused() {
        let Some((vm, devices)) = vm_with_slots(2) else {
            return;
        };
        let slot = devices.attach(&vm, device().0).unwrap();
        devices.detach(&vm, slot).unwrap();
        for slot in [slot, SlotIndex(1), SlotIndex(7)] {
            let err = devices.detach(&vm, slot).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("virtio-mmio slot {slot} holds no device")
            );
        }
    }
}
