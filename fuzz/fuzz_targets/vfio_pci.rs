//! A guest's accesses to a function passed through with VFIO
//! (crates/runv-vmm/src/vfio: device.rs's configuration-space
//! virtualisation, the MSI-X capability, bars.rs's trapped BAR with the
//! MSI-X table and PBA, and pci/msix.rs routing vectors through KVM),
//! reached as in a VM: configuration space through the 0xcf8/0xcfc ports
//! and the BAR through the VM's MMIO bus.
//!
//! The function is in memory, shaped like an SR-IOV VF (a 64-bit BAR0
//! holding the MSI-X table and PBA, capabilities PCIe, MSI, MSI-X); its BAR
//! cannot be mmap-ed, so every BAR access is trapped. Each access is 11
//! bytes, as in mmio_pci (runv_fuzz::bus_access): a kind byte (bit 0
//! write, bit 1 the ports rather than the BAR, bits 2-4 the size), an
//! address and a value for writes.
//! Needs /dev/kvm; without it every input passes.
#![no_main]

use std::{
    ops::Range,
    sync::{Arc, Mutex, OnceLock},
};

use libfuzzer_sys::fuzz_target;
use runv_fuzz::bus_access;
use runv_vmm::{
    memory::create_guest_memory,
    pci::{BarAllocator, PciConfigIo, PciRoot, CONFIG_IO_PORT, CONFIG_IO_PORT_LEN},
    vfio::{HostMapping, PassthroughFunction, RegionInfo, VfioPciDevice, CONFIG_REGION},
    Bus, Vm, VmmError,
};
use vmm_sys_util::eventfd::EventFd;

const RAM: u64 = 1 << 20;
const BAR0_SIZE: u64 = 0x1_0000;

/// A VF in memory; it checks that the VMM only asks for bytes within its
/// regions, as a real function's VFIO regions would require.
struct Function {
    config: Mutex<Vec<u8>>,
    bar0: Mutex<Vec<u8>>,
}

impl Function {
    fn vf() -> Function {
        let mut config = vec![0u8; 256];
        let mut put = |at: usize, bytes: &[u8]| config[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &[0x86, 0x80, 0x4c, 0x15]); // vendor, device
        put(6, &[1 << 4]); // status: a capability list
        put(0x0b, &[0x02]); // class: Ethernet
        put(0x10, &[0b1100]); // BAR0: 64-bit, prefetchable
        put(0x34, &[0x40]); // capabilities pointer
        put(0x3d, &[1]); // INTA, which the guest must not see
        put(0x40, &[0x10, 0x50]); // PCIe, next MSI
        put(0x50, &[0x05, 0x70]); // MSI, next MSI-X
        put(0x70, &[0x11, 0x00, 3, 0]); // MSI-X, 4 vectors
        put(0x74, &0x8000u32.to_le_bytes()); // table in BAR0 at 0x8000
        put(0x78, &0x9000u32.to_le_bytes()); // PBA in BAR0 at 0x9000
        Function {
            config: Mutex::new(config),
            bar0: Mutex::new(vec![0; BAR0_SIZE as usize]),
        }
    }

    fn region(&self, index: u32) -> &Mutex<Vec<u8>> {
        match index {
            CONFIG_REGION => &self.config,
            0 => &self.bar0,
            _ => panic!("the VMM accessed region {index}, which the function does not have"),
        }
    }

    fn range(region: &[u8], offset: u64, len: usize) -> Range<usize> {
        let start = usize::try_from(offset).expect("a region offset");
        assert!(
            start
                .checked_add(len)
                .is_some_and(|end| end <= region.len()),
            "the VMM accessed {len} bytes at {offset:#x} of a {}-byte region",
            region.len()
        );
        start..start + len
    }
}

impl PassthroughFunction for Function {
    fn name(&self) -> &str {
        "0000:3b:02.1"
    }

    fn region(&self, index: u32) -> RegionInfo {
        match index {
            0 => RegionInfo {
                size: BAR0_SIZE,
                mappable: Vec::new(),
            },
            _ => RegionInfo::default(),
        }
    }

    fn read_region(&self, index: u32, offset: u64, data: &mut [u8]) {
        let region = self.region(index).lock().unwrap();
        data.copy_from_slice(&region[Function::range(&region, offset, data.len())]);
    }

    fn write_region(&self, index: u32, offset: u64, data: &[u8]) {
        let mut region = self.region(index).lock().unwrap();
        let range = Function::range(&region, offset, data.len());
        region[range].copy_from_slice(data);
    }

    fn mmap_region(&self, index: u32, _range: Range<u64>) -> Result<HostMapping, VmmError> {
        panic!("the VMM mmap-ed region {index}, which the function says cannot be")
    }

    fn enable_msix(&self, _events: &[&EventFd]) -> Result<(), VmmError> {
        Ok(())
    }

    fn disable_msix(&self) -> Result<(), VmmError> {
        Ok(())
    }

    fn reset(&self) {}
}

/// One VM for the process: making one per input would cost more than the
/// input. Each input gets a fresh MMIO bus in it, so the function attached
/// for the last input (its BAR traps, its MSI-X vectors and their GSIs) is
/// gone. None without a usable /dev/kvm.
fn vm() -> Option<&'static Mutex<Vm>> {
    static VM: OnceLock<Option<Mutex<Vm>>> = OnceLock::new();
    VM.get_or_init(|| {
        let memory = create_guest_memory(RAM).expect("guest memory");
        Vm::new(memory).ok().map(Mutex::new)
    })
    .as_ref()
}

/// Where the allocator put BAR0, read back through configuration space.
fn bar0_address(device: &mut VfioPciDevice) -> u64 {
    use runv_vmm::pci::PciDevice;
    u64::from(device.read_config(5)) << 32 | u64::from(device.read_config(4) & !0xf)
}

fuzz_target!(|input: &[u8]| {
    let Some(vm) = vm() else {
        return;
    };
    let mut vm = vm.lock().unwrap();
    vm.mmio = Bus::default();
    let mut allocator = BarAllocator::new(RAM);
    let mut device = VfioPciDevice::attach(&mut vm, &mut allocator, Arc::new(Function::vf()))
        .expect("the function attached");
    let bar0 = bar0_address(&mut device);
    let mut root = PciRoot::new();
    root.add_device(Arc::new(Mutex::new(device)))
        .expect("a PCI slot");
    let mut ports = Bus::default();
    ports
        .insert(
            "pci-config",
            CONFIG_IO_PORT,
            CONFIG_IO_PORT_LEN,
            Arc::new(Mutex::new(PciConfigIo::new(Arc::new(Mutex::new(root))))),
        )
        .expect("the config ports");

    bus_access::replay(
        input,
        &vm.mmio,
        &ports,
        |on_ports, address| match on_ports {
            false => bar0 + address % BAR0_SIZE,
            true => CONFIG_IO_PORT - 8 + address % 24,
        },
    );
});
