//! The PCI root bus on real KVM: a 16-bit guest payload of our own probes
//! configuration mechanism #1 as Linux does and reads IDs through
//! 0xcf8/0xcfc. Skipped, saying why, on hosts without a usable /dev/kvm.

mod common;

use std::sync::{Arc, Mutex};

use common::{start_in_real_mode, Console};
use runv_vmm::{
    devices::add_legacy_devices,
    memory::create_guest_memory,
    pci::{PciConfigIo, PciDevice, PciRoot, CONFIG_IO_PORT, CONFIG_IO_PORT_LEN},
    VcpuStop, Vm,
};
use vm_memory::{Bytes, GuestAddress};

const LOAD_ADDRESS: u64 = 0x1000;

/// A function whose vendor and device IDs are 0xabcd and 0x1234.
struct Function;

impl PciDevice for Function {
    fn read_config(&mut self, register: usize) -> u32 {
        if register == 0 {
            0x1234_abcd
        } else {
            0
        }
    }
    fn write_config(&mut self, _register: usize, _offset: u64, _data: &[u8]) {}
}

#[rustfmt::skip]
const PROBE_THEN_RESET: &[u8] = &[
    // Linux's type-1 probe: the latch reads back what was written.
    0x66, 0xb8, 0x00, 0x00, 0x00, 0x80, // mov eax, 0x80000000 (00:00.0, register 0)
    0xba, 0xf8, 0x0c,                   // mov dx, 0xcf8
    0x66, 0xef,                         // out dx, eax
    0x66, 0xed,                         // in eax, dx
    0xba, 0xf8, 0x03,                   // mov dx, 0x3f8 (COM1)
    0xee,                               // out dx, al        (latch bits 7:0)
    0x66, 0xc1, 0xe8, 0x18,             // shr eax, 24
    0xee,                               // out dx, al        (latch bits 31:24)
    // The host bridge's vendor and device IDs, a dword at 0xcfc.
    0xba, 0xfc, 0x0c,                   // mov dx, 0xcfc
    0x66, 0xed,                         // in eax, dx
    0xba, 0xf8, 0x03,                   // mov dx, 0x3f8
    0xee,                               // out dx, al
    0x88, 0xe0, 0xee,                   // mov al, ah; out dx, al
    0x66, 0xc1, 0xe8, 0x10,             // shr eax, 16
    0xee,                               // out dx, al
    0x88, 0xe0, 0xee,                   // mov al, ah; out dx, al
    // Its class, as pci_sanity_check reads it: a word at 0xcfe.
    0x66, 0xb8, 0x08, 0x00, 0x00, 0x80, // mov eax, 0x80000008 (00:00.0, register 2)
    0xba, 0xf8, 0x0c,                   // mov dx, 0xcf8
    0x66, 0xef,                         // out dx, eax
    0xba, 0xfe, 0x0c,                   // mov dx, 0xcfe
    0xed,                               // in ax, dx
    0xba, 0xf8, 0x03,                   // mov dx, 0x3f8
    0xee,                               // out dx, al
    0x88, 0xe0, 0xee,                   // mov al, ah; out dx, al
    // Device 1's vendor ID low byte, then device 2's (absent).
    0x66, 0xb8, 0x00, 0x08, 0x00, 0x80, // mov eax, 0x80000800 (00:01.0)
    0xba, 0xf8, 0x0c,                   // mov dx, 0xcf8
    0x66, 0xef,                         // out dx, eax
    0xba, 0xfc, 0x0c,                   // mov dx, 0xcfc
    0xec,                               // in al, dx
    0xba, 0xf8, 0x03,                   // mov dx, 0x3f8
    0xee,                               // out dx, al
    0x66, 0xb8, 0x00, 0x10, 0x00, 0x80, // mov eax, 0x80001000 (00:02.0)
    0xba, 0xf8, 0x0c,                   // mov dx, 0xcf8
    0x66, 0xef,                         // out dx, eax
    0xba, 0xfc, 0x0c,                   // mov dx, 0xcfc
    0xec,                               // in al, dx
    0xba, 0xf8, 0x03,                   // mov dx, 0x3f8
    0xee,                               // out dx, al
    0xb0, 0xfe, 0xe6, 0x64,             // mov al, 0xfe; out 0x64, al (i8042 reset)
];

#[test]
fn guest_finds_the_host_bridge_through_mechanism_1() {
    if !runv_vmm::testing::kvm_usable() {
        return;
    }
    let memory = create_guest_memory(2 << 20).unwrap();
    memory
        .write_slice(PROBE_THEN_RESET, GuestAddress(LOAD_ADDRESS))
        .unwrap();
    let mut vm = Vm::new(memory).expect("KVM VM");
    let console = Console::default();
    add_legacy_devices(&mut vm, Box::new(console.clone())).unwrap();
    let mut root = PciRoot::new();
    assert_eq!(root.add_device(Arc::new(Mutex::new(Function))).unwrap(), 1);
    let config_io = PciConfigIo::new(Arc::new(Mutex::new(root)));
    vm.pio
        .insert(
            "pci config",
            CONFIG_IO_PORT,
            CONFIG_IO_PORT_LEN,
            Arc::new(Mutex::new(config_io)),
        )
        .unwrap();
    let mut vcpu = vm.create_vcpu(0, 1).unwrap();
    start_in_real_mode(&vcpu, LOAD_ADDRESS, 0);
    assert_eq!(vcpu.run(&vm).expect("the payload runs"), VcpuStop::Reset);
    assert_eq!(
        console.bytes(),
        [0x00, 0x80, 0x86, 0x80, 0x57, 0x0d, 0x00, 0x06, 0xcd, 0xff]
    );
}
