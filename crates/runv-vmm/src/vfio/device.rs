//! A passed-through function on the guest's PCI bus. Configuration space
//! is the function's own, read and written through VFIO, except what the
//! VMM owns: the BARs (placed by the VMM, as firmware would), the
//! expansion ROM (none is shown), the interrupt pin (none: MSI-X only),
//! the MSI capability (taken out of the chain) and MSI-X's Message
//! Control (enable and mask go to `MsixVectors` and VFIO's interrupts).

use std::sync::{Arc, Mutex};

use crate::{
    pci::{BarAllocator, BarRegisters, MsixVectors, PciDevice, BAR_COUNT, FIRST_BAR_REGISTER},
    vfio::{
        bars::{self, MappedPart},
        config::{self, Layout},
        function::{PassthroughFunction, CONFIG_REGION},
    },
    Vm, VmmError,
};

/// The expansion ROM BAR (byte 0x30).
const ROM_REGISTER: usize = 12;
/// Interrupt line, pin, min grant and max latency (byte 0x3c).
const INTERRUPT_REGISTER: usize = 15;
/// MSI-X Message Control bits the guest owns: enable and function mask.
const MSIX_CONTROL_GUEST_BITS: u16 = 0xc000;

/// A host function passed through to the guest.
pub struct VfioPciDevice {
    function: Arc<dyn PassthroughFunction>,
    layout: Layout,
    bars: BarRegisters,
    vectors: Arc<Mutex<MsixVectors>>,
    /// MSI-X Message Control's enable and mask bits, as the guest wrote
    /// them.
    msix_control: u16,
    /// A scratch register for the guest's driver; nothing is routed by it.
    interrupt_line: u8,
    _mapped: Vec<MappedPart>,
}

impl VfioPciDevice {
    /// Resets `function`, places its BARs with `allocator` and makes them
    /// reachable from `vm`'s guest. The device is then ready for a
    /// `PciRoot`, before the vCPUs start.
    pub fn attach(
        vm: &mut Vm,
        allocator: &mut BarAllocator,
        function: Arc<dyn PassthroughFunction>,
    ) -> Result<VfioPciDevice, VmmError> {
        function.reset();
        let layout = Layout::probe(function.as_ref())?;
        let vectors = Arc::new(Mutex::new(MsixVectors::new(
            vm.irq_routing().clone(),
            layout.msix.vectors,
        )?));
        let (bars, mapped) = bars::place(
            vm,
            allocator,
            &function,
            &layout.bars,
            &layout.msix,
            &vectors,
        )?;
        Ok(VfioPciDevice {
            function,
            layout,
            bars,
            vectors,
            msix_control: 0,
            interrupt_line: 0,
            _mapped: mapped,
        })
    }

    fn read_function(&self, register: usize) -> u32 {
        config::read_u32(self.function.as_ref(), register as u64 * 4)
    }

    fn msix_register(&self) -> usize {
        self.layout.msix.offset / 4
    }

    fn msi_register(&self) -> Option<usize> {
        self.layout.msi.map(|(offset, _)| offset / 4)
    }

    /// A guest write to the MSI-X capability's first register: only
    /// Message Control's enable and mask bits are writable.
    fn write_msix_control(&mut self, offset: u64, data: &[u8]) {
        let mut register = u32::from(self.msix_control) << 16;
        for (i, byte) in data.iter().enumerate() {
            let shift = 8 * (offset as usize + i);
            register = register & !(0xff << shift) | u32::from(*byte) << shift;
        }
        let control = (register >> 16) as u16 & MSIX_CONTROL_GUEST_BITS;
        if control == self.msix_control {
            return;
        }
        self.msix_control = control;
        if let Err(e) = self.set_msix_control(control) {
            tracing::error!(function = self.function.name(), error = %e, "MSI-X control failed");
        }
    }

    fn set_msix_control(&self, control: u16) -> Result<(), VmmError> {
        let mut vectors = self.vectors.lock().expect("MSI-X lock");
        match vectors.set_control(control)? {
            Some(true) => self.function.enable_msix(&vectors.eventfds()),
            Some(false) => self.function.disable_msix(),
            None => Ok(()),
        }
    }
}

impl PciDevice for VfioPciDevice {
    fn read_config(&mut self, register: usize) -> u32 {
        if (FIRST_BAR_REGISTER..FIRST_BAR_REGISTER + BAR_COUNT).contains(&register) {
            return self.bars.read(register - FIRST_BAR_REGISTER);
        }
        match register {
            ROM_REGISTER => 0,
            // Pin 0: no INTx.
            INTERRUPT_REGISTER => {
                self.read_function(register) & 0xffff_0000 | u32::from(self.interrupt_line)
            }
            _ => {
                let mut value = self.read_function(register);
                if register == self.msix_register() {
                    value = value & !(u32::from(MSIX_CONTROL_GUEST_BITS) << 16)
                        | u32::from(self.msix_control) << 16;
                }
                if let Some((_, patch)) = self.layout.msi {
                    if patch.at / 4 == register {
                        let shift = 8 * (patch.at % 4);
                        value = value & !(0xff << shift) | u32::from(patch.value) << shift;
                    }
                }
                value
            }
        }
    }

    fn write_config(&mut self, register: usize, offset: u64, data: &[u8]) {
        if (FIRST_BAR_REGISTER..FIRST_BAR_REGISTER + BAR_COUNT).contains(&register) {
            self.bars.write(register - FIRST_BAR_REGISTER, offset, data);
            return;
        }
        match register {
            ROM_REGISTER => {}
            INTERRUPT_REGISTER => {
                if offset == 0 {
                    self.interrupt_line = data[0];
                }
            }
            _ if register == self.msix_register() => self.write_msix_control(offset, data),
            // MSI's enable is there: MSI is not wired, and hidden.
            _ if Some(register) == self.msi_register() => {}
            _ => self
                .function
                .write_region(CONFIG_REGION, register as u64 * 4 + offset, data),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        memory::create_guest_memory,
        pci::{Bar, BarKind},
        vfio::fake::{FakeFunction, MSIX_VECTORS},
    };

    /// Where the fake's BAR0 lands is the allocator's business; tests read
    /// it back from the registers.
    fn attach(function: FakeFunction) -> (Vm, VfioPciDevice, Arc<FakeFunction>) {
        let mut vm = Vm::new(create_guest_memory(64 << 20).unwrap()).unwrap();
        let mut allocator = BarAllocator::new(64 << 20);
        let function = Arc::new(function);
        let device = VfioPciDevice::attach(&mut vm, &mut allocator, function.clone()).unwrap();
        (vm, device, function)
    }

    fn bar0(device: &VfioPciDevice) -> Bar {
        device.bars.get(0).unwrap()
    }

    /// Reads a 64-bit BAR the way a guest does.
    fn guest_bar0_address(device: &mut VfioPciDevice) -> u64 {
        let low = device.read_config(4) & !0xf;
        let high = device.read_config(5);
        u64::from(high) << 32 | u64::from(low)
    }

    #[test]
    fn the_function_is_reset_and_its_bar_placed_with_its_type() {
        if !crate::testing::kvm_usable() {
            return;
        }
        let (_vm, mut device, function) = attach(FakeFunction::vf());
        assert_eq!(function.state.lock().unwrap().resets, 1);
        let bar = bar0(&device);
        assert_eq!(bar.size, FakeFunction::BAR0_SIZE);
        assert_eq!(bar.kind, BarKind::Memory64);
        assert!(bar.prefetchable);
        assert_eq!(bar.address % bar.size, 0);
        // Type bits: 64-bit, prefetchable.
        assert_eq!(device.read_config(4) & 0xf, 0b1100);
        assert_eq!(guest_bar0_address(&mut device), bar.address);
        // Sizing: all ones in, the size mask out.
        device.write_config(4, 0, &[0xff; 4]);
        device.write_config(5, 0, &[0xff; 4]);
        assert_eq!(
            device.read_config(4) & !0xf,
            !(FakeFunction::BAR0_SIZE as u32 - 1) & !0xf
        );
        assert_eq!(device.read_config(5), u32::MAX);
        // No expansion ROM.
        assert_eq!(device.read_config(ROM_REGISTER), 0);
    }

    #[test]
    fn ordinary_registers_are_the_functions_own() {
        if !crate::testing::kvm_usable() {
            return;
        }
        let (_vm, mut device, function) = attach(FakeFunction::vf());
        let id = device.read_config(0);
        assert_eq!(id & 0xffff, u32::from(FakeFunction::VENDOR));
        assert_eq!(id >> 16, u32::from(FakeFunction::DEVICE));
        // Command: memory space and bus master reach the function.
        device.write_config(1, 0, &[0x06, 0x04]);
        assert_eq!(function.state.lock().unwrap().config[4..6], [0x06, 0x04]);
        // The interrupt pin reads 0; the line is the guest's scratch.
        device.write_config(INTERRUPT_REGISTER, 0, &[11]);
        assert_eq!(device.read_config(INTERRUPT_REGISTER) & 0xffff, 11);
        assert_eq!(function.state.lock().unwrap().config[0x3c], 0);
    }

    #[test]
    fn the_function_answers_on_the_root_bus() {
        if !crate::testing::kvm_usable() {
            return;
        }
        let (_vm, device, _function) = attach(FakeFunction::vf());
        let mut root = crate::pci::PciRoot::new();
        let number = root.add_device(Arc::new(Mutex::new(device))).unwrap();
        let id = root.read_config(0, number, 0, 0);
        assert_eq!(id & 0xffff, u32::from(FakeFunction::VENDOR));
        // Ethernet controller.
        assert_eq!(root.read_config(0, number, 0, 2) >> 24, 0x02);
    }

    #[test]
    fn the_capability_chain_skips_msi() {
        if !crate::testing::kvm_usable() {
            return;
        }
        let (_vm, mut device, function) = attach(FakeFunction::vf());
        let mut chain = Vec::new();
        let mut next = device.read_config(0x34 / 4) as u8;
        while next != 0 {
            let header = device.read_config(usize::from(next) / 4);
            chain.push(header as u8);
            next = (header >> 8) as u8;
        }
        assert_eq!(chain, vec![0x10, 0x11]);
        // MSI's enable is refused.
        device.write_config(FakeFunction::MSI_CAP / 4, 2, &[1]);
        assert_eq!(
            function.state.lock().unwrap().config[FakeFunction::MSI_CAP + 2],
            0
        );
    }

    #[test]
    fn msix_enable_hands_one_eventfd_per_vector_to_the_function() {
        if !crate::testing::kvm_usable() {
            return;
        }
        let (_vm, mut device, function) = attach(FakeFunction::vf());
        let register = FakeFunction::MSIX_CAP / 4;
        // Enable, as a 16-bit write of Message Control.
        device.write_config(register, 2, &[0x00, 0x80]);
        assert_eq!(
            function.state.lock().unwrap().msix_events,
            Some(usize::from(MSIX_VECTORS))
        );
        let control = (device.read_config(register) >> 16) as u16;
        assert_eq!(control, 0x8000 | (MSIX_VECTORS - 1));
        device.write_config(register, 2, &[0x00, 0x00]);
        assert_eq!(function.state.lock().unwrap().msix_events, None);
    }

    #[test]
    fn the_msix_page_is_trapped_and_split_between_vectors_and_function() {
        if !crate::testing::kvm_usable() {
            return;
        }
        let (vm, device, function) = attach(FakeFunction::vf());
        let bar = bar0(&device).address;
        // Vector 1's message data, through the bus.
        let entry = bar + FakeFunction::TABLE + 16 + 8;
        assert!(vm.mmio.write(entry, &0x4041u32.to_le_bytes()));
        let mut data = [0u8; 4];
        assert!(vm.mmio.read(entry, &mut data));
        assert_eq!(u32::from_le_bytes(data), 0x4041);
        let mut from_vectors = [0u8; 4];
        device
            .vectors
            .lock()
            .unwrap()
            .read_table(16 + 8, &mut from_vectors);
        assert_eq!(from_vectors, data);
        // The rest of the page is the function's.
        let beyond_table = FakeFunction::TABLE + 0x100;
        assert!(vm.mmio.write(bar + beyond_table, &[0xab]));
        assert_eq!(
            function.state.lock().unwrap().bar0[beyond_table as usize],
            0xab
        );
        // The other pages are mapped, not trapped.
        assert!(!vm.mmio.write(bar, &[1]));
        assert_eq!(
            function.state.lock().unwrap().mmaps,
            vec![
                0..FakeFunction::TABLE,
                FakeFunction::PBA + 0x1000..FakeFunction::BAR0_SIZE
            ]
        );
    }

    #[test]
    fn a_bar_that_cannot_be_mmaped_is_trapped_whole() {
        if !crate::testing::kvm_usable() {
            return;
        }
        let (vm, device, function) = attach(FakeFunction::vf_without_mmap());
        let bar = bar0(&device).address;
        assert!(vm.mmio.write(bar + 0x10, &[0x5a]));
        assert_eq!(function.state.lock().unwrap().bar0[0x10], 0x5a);
        assert!(function.state.lock().unwrap().mmaps.is_empty());
    }

    /// Found by the vfio_pci fuzz target: a guest access that starts in
    /// the BAR's last bytes and runs past its end was passed to the
    /// function, past the end of its region.
    #[test]
    fn an_access_past_the_end_of_a_bar_does_not_reach_the_function() {
        if !crate::testing::kvm_usable() {
            return;
        }
        let (vm, device, function) = attach(FakeFunction::vf_without_mmap());
        let last = bar0(&device).address + FakeFunction::BAR0_SIZE - 1;
        let mut data = [0u8; 16];
        assert!(!vm.mmio.read(last, &mut data));
        assert!(!vm.mmio.write(last - 3, &[0x5a; 8]));
        assert!(function.state.lock().unwrap().bar0.iter().all(|&b| b == 0));
        assert!(vm.mmio.write(last, &[0x5a]));
        assert_eq!(
            function.state.lock().unwrap().bar0[last as usize & 0xffff],
            0x5a
        );
    }

    #[test]
    fn a_function_without_msix_is_refused() {
        if !crate::testing::kvm_usable() {
            return;
        }
        let mut vm = Vm::new(create_guest_memory(64 << 20).unwrap()).unwrap();
        let mut allocator = BarAllocator::new(64 << 20);
        let error = VfioPciDevice::attach(
            &mut vm,
            &mut allocator,
            Arc::new(FakeFunction::without_msix()),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(error.contains(FakeFunction::NAME), "{error}");
    }
}
