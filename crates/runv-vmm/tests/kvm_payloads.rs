//! The VMM on real KVM (PVM hosts included) with small 16-bit guest
//! payloads of our own: the vCPU loop, port I/O to the serial device, MMIO
//! reads and writes, and the guest ending itself. Skipped, saying why, on
//! hosts without a usable /dev/kvm.

mod common;

use std::sync::{Arc, Mutex};

use common::{start_in_real_mode, Console};
use runv_vmm::{
    devices::add_legacy_devices,
    memory::{create_guest_memory, MMIO_GAP_START},
    virtio::{mmio::MmioTransport, Activation, VirtioDevice},
    BusDevice, VcpuStop, Vm,
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const LOAD_ADDRESS: u64 = 0x1000;
const TEST_DEVICE_BASE: u64 = MMIO_GAP_START;

/// An MMIO device that answers reads with `b'!'` and records writes.
#[derive(Default)]
struct Probe {
    reads: Vec<u64>,
    writes: Vec<(u64, Vec<u8>)>,
}

impl BusDevice for Probe {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.reads.push(offset);
        data.fill(b'!');
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
}

struct TestVm {
    vm: Vm,
    console: Console,
    probe: Arc<Mutex<Probe>>,
}

/// A VM with 2 MiB of RAM, COM1, the i8042 and the probe, with `code` at
/// LOAD_ADDRESS; or None (after saying why) when KVM cannot be used here.
fn test_vm(code: &[u8]) -> Option<TestVm> {
    if !runv_vmm::testing::kvm_usable() {
        return None;
    }
    let memory = create_guest_memory(2 << 20).unwrap();
    memory
        .write_slice(code, GuestAddress(LOAD_ADDRESS))
        .unwrap();
    let mut vm = Vm::new(memory).expect("KVM VM");
    let console = Console::default();
    add_legacy_devices(&mut vm, Box::new(console.clone())).unwrap();
    let probe = Arc::new(Mutex::new(Probe::default()));
    vm.mmio
        .insert("probe", TEST_DEVICE_BASE, 0x1000, probe.clone())
        .unwrap();
    Some(TestVm { vm, console, probe })
}

/// Runs vCPU 0 in real mode from LOAD_ADDRESS, with DS based at the probe.
fn run_real_mode(test: &TestVm) -> Result<VcpuStop, runv_vmm::vcpu::VcpuError> {
    let mut vcpu = test.vm.create_vcpu(0, 1).unwrap();
    start_in_real_mode(&vcpu, LOAD_ADDRESS, TEST_DEVICE_BASE);
    vcpu.run(&test.vm)
}

#[rustfmt::skip]
const SERIAL_MMIO_RESET: &[u8] = &[
    0xba, 0xf8, 0x03,       // mov dx, 0x3f8     (COM1 data register)
    0xb0, b'r', 0xee,       // mov al, 'r'; out dx, al
    0xb0, b'u', 0xee,       // mov al, 'u'; out dx, al
    0xb0, b'n', 0xee,       // mov al, 'n'; out dx, al
    0xb0, b'v', 0xee,       // mov al, 'v'; out dx, al
    0xa0, 0x04, 0x00,       // mov al, [0x4]     (MMIO read from the probe)
    0xee,                   // out dx, al        (echo what the probe gave)
    0xb0, 0x5a,             // mov al, 0x5a
    0xa2, 0x08, 0x00,       // mov [0x8], al     (MMIO write to the probe)
    0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al  (i8042 CPU reset)
    0xf4,                   // hlt               (never reached)
];

#[test]
fn guest_prints_touches_mmio_and_resets() {
    let Some(test) = test_vm(SERIAL_MMIO_RESET) else {
        return;
    };
    let stop = run_real_mode(&test).expect("the payload runs");
    assert_eq!(stop, VcpuStop::Reset, "the i8042 reset line ends the run");
    assert_eq!(test.console.bytes(), b"runv!");
    let probe = test.probe.lock().unwrap();
    assert_eq!(probe.reads, vec![4]);
    assert_eq!(probe.writes, vec![(8, vec![0x5a])]);
    assert!(test.vm.control().reset_requested());
}

#[rustfmt::skip]
const UNCLAIMED_IO_THEN_RESET: &[u8] = &[
    0xe4, 0x80,             // in al, 0x80       (nobody owns port 0x80)
    0xba, 0xf8, 0x03,       // mov dx, 0x3f8
    0xee,                   // out dx, al        (prints what the bus gave)
    0xa0, 0x00, 0x20,       // mov al, [0x2000]  (past the probe: unclaimed MMIO)
    0xee,                   // out dx, al
    0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al
];

#[test]
fn unclaimed_addresses_read_all_ones_and_do_not_stop_the_guest() {
    let Some(test) = test_vm(UNCLAIMED_IO_THEN_RESET) else {
        return;
    };
    assert_eq!(run_real_mode(&test).unwrap(), VcpuStop::Reset);
    assert_eq!(test.console.bytes(), [0xff, 0xff]);
    assert!(test.probe.lock().unwrap().reads.is_empty());
}

/// The smallest virtio device: a vsock-typed device with one queue.
struct Dummy;

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        19
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
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

#[rustfmt::skip]
const VIRTIO_MMIO_REGISTERS: &[u8] = &[
    0xba, 0xf8, 0x03,                   // mov dx, 0x3f8
    0x66, 0xa1, 0x00, 0x00,             // mov eax, [0x0]    (MagicValue, 32-bit MMIO read)
    0xee,                               // out dx, al        'v'
    0x66, 0xc1, 0xe8, 0x08, 0xee,       // shr eax, 8; out   'i'
    0x66, 0xc1, 0xe8, 0x08, 0xee,       // shr eax, 8; out   'r'
    0x66, 0xc1, 0xe8, 0x08, 0xee,       // shr eax, 8; out   't'
    0x66, 0xa1, 0x08, 0x00,             // mov eax, [0x8]    (DeviceID)
    0xee,                               // out dx, al
    0x66, 0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1        (ACKNOWLEDGE)
    0x66, 0xa3, 0x70, 0x00,             // mov [0x70], eax   (Status, 32-bit MMIO write)
    0xb0, 0xfe, 0xe6, 0x64,             // i8042 reset
];

#[test]
fn guest_reads_and_writes_virtio_mmio_registers() {
    let Some(mut test) = test_vm(VIRTIO_MMIO_REGISTERS) else {
        return;
    };
    // The transport takes the probe's place in the MMIO gap.
    let memory = test.vm.memory().clone();
    let transport = MmioTransport::new(Box::new(Dummy), memory, EventFd::new(0).unwrap()).unwrap();
    test.vm.mmio = runv_vmm::Bus::default();
    test.vm
        .mmio
        .insert(
            "virtio-mmio",
            TEST_DEVICE_BASE,
            0x1000,
            Arc::new(Mutex::new(transport)),
        )
        .unwrap();
    assert_eq!(run_real_mode(&test).unwrap(), VcpuStop::Reset);
    assert_eq!(test.console.bytes(), b"virt\x13", "magic and device ID 19");
    let mut status = [0u8; 4];
    assert!(test.vm.mmio.read(TEST_DEVICE_BASE + 0x70, &mut status));
    assert_eq!(
        u32::from_le_bytes(status),
        1,
        "the guest's status write landed"
    );
}
