//! A guest's accesses of any size, offset and value to a virtio-mmio
//! register window (crates/runv-vmm/src/virtio/mmio.rs, bus.rs, a
//! virtio-net device's configuration space behind it) and to PCI
//! configuration space through the 0xcf8/0xcfc ports (pci/config_io.rs,
//! root.rs, bar.rs: the latch, the root bus's dispatch, the BAR sizing
//! protocol) of a function with three kinds of BAR.
//!
//! Each access is 11 bytes: a kind byte (bit 0 write, bit 1 the port bus,
//! bits 2-4 the size), an address and a value for writes.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use runv_fuzz::{bus_access, host};
use runv_vmm::{
    memory::create_guest_memory,
    pci::{
        Bar, BarKind, BarRegisters, PciConfigIo, PciDevice, PciRoot, BAR_COUNT, CONFIG_IO_PORT,
        CONFIG_IO_PORT_LEN, FIRST_BAR_REGISTER,
    },
    virtio::{mmio::MmioTransport, net::Net},
    Bus,
};
use vmm_sys_util::eventfd::EventFd;

const WINDOW: u64 = 0x1000;

/// A function whose configuration space is a vendor and device ID, and
/// BARs: a 64-bit prefetchable one, an I/O one and a 32-bit one.
struct Function {
    bars: BarRegisters,
}

impl Function {
    fn new() -> Function {
        let mut bars = BarRegisters::default();
        let bar = |address, size, kind, prefetchable| Bar {
            address,
            size,
            kind,
            prefetchable,
        };
        bars.set(0, bar(0x1_0000_0000, 0x4000, BarKind::Memory64, true));
        bars.set(2, bar(0xc000, 0x20, BarKind::Io, false));
        bars.set(3, bar(0xe000_0000, 0x1000, BarKind::Memory32, false));
        Function { bars }
    }

    fn bar_index(register: usize) -> Option<usize> {
        register
            .checked_sub(FIRST_BAR_REGISTER)
            .filter(|&index| index < BAR_COUNT)
    }
}

impl PciDevice for Function {
    fn read_config(&mut self, register: usize) -> u32 {
        match (register, Function::bar_index(register)) {
            (0, _) => 0x1234_8086,
            (_, Some(index)) => self.bars.read(index),
            _ => 0,
        }
    }

    fn write_config(&mut self, register: usize, offset: u64, data: &[u8]) {
        if let Some(index) = Function::bar_index(register) {
            self.bars.write(index, offset, data);
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let memory = create_guest_memory(0x1_0000).expect("guest memory");
    let (device_end, _host_end) = host::seqpacket_pair();
    let net = Net::with_socket(device_end, [0x52, 0x54, 0, 0, 0, 1]).expect("a net device");
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("an irq eventfd");
    let transport = MmioTransport::new(Box::new(net), memory, irq).expect("a transport");
    let mut mmio = Bus::default();
    mmio.insert(
        "virtio-mmio",
        WINDOW,
        WINDOW,
        Arc::new(Mutex::new(transport)),
    )
    .expect("the window");
    let mut root = PciRoot::new();
    root.add_device(Arc::new(Mutex::new(Function::new())))
        .expect("a PCI slot");
    let mut ports = Bus::default();
    let config_io = PciConfigIo::new(Arc::new(Mutex::new(root)));
    ports
        .insert(
            "pci-config",
            CONFIG_IO_PORT,
            CONFIG_IO_PORT_LEN,
            Arc::new(Mutex::new(config_io)),
        )
        .expect("the config ports");

    // Addresses near each device, so that most accesses reach one.
    bus_access::replay(input, &mmio, &ports, |on_ports, address| match on_ports {
        false => WINDOW / 2 + address % (2 * WINDOW),
        true => CONFIG_IO_PORT - 8 + address % 24,
    });
});
