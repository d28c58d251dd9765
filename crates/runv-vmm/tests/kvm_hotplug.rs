//! Hot-plug on real KVM with a 16-bit payload of our own: the guest reads
//! an empty virtio-mmio slot (a placeholder, device ID 0), the host attaches
//! a device while the vCPU runs, and the guest then finds it, drives it to
//! DRIVER_OK and notifies its queue through the ioeventfd the device
//! manager registered. Skipped, saying why, on hosts without a usable
//! /dev/kvm.

mod common;
mod real_mode;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{start_in_real_mode, Console};
use real_mode::{collect_ends, spawn_all, stop_all, GUEST_TIMEOUT};
use runv_vmm::testing::kvm_usable;
use runv_vmm::{
    device_manager::{DeviceManager, SlotIndex},
    devices::add_legacy_devices,
    memory::{create_guest_memory, MMIO_GAP_START},
    virtio::{Activation, VirtioDevice},
    VcpuStop, Vm,
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const LOAD_ADDRESS: u64 = 0x1000;
const VSOCK_DEVICE_ID: u32 = 19;

/// What the device saw of its driver.
#[derive(Default)]
struct Seen {
    /// Each activation's queue eventfds.
    activations: Vec<Vec<EventFd>>,
    /// Notifications that reached the device through the transport
    /// instead of the ioeventfd.
    notified: Vec<u16>,
}

/// A vsock-typed device with one queue.
struct TestDevice(Arc<Mutex<Seen>>);

impl VirtioDevice for TestDevice {
    fn device_type(&self) -> u32 {
        VSOCK_DEVICE_ID
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
    fn activate(&mut self, activation: Activation) -> Result<(), String> {
        self.0
            .lock()
            .unwrap()
            .activations
            .push(activation.queue_events);
        Ok(())
    }
    fn queue_notify(&mut self, queue: u16) {
        self.0.lock().unwrap().notified.push(queue);
    }
    fn reset(&mut self) {}
}

/// With DS at slot 0's window. Rings at guest address 0 are valid enough
/// for activation: aligned and inside RAM.
#[rustfmt::skip]
const PROBE_WAIT_THEN_DRIVE: &[u8] = &[
    0xba, 0xf8, 0x03,                   // mov dx, 0x3f8
    0x66, 0xa1, 0x00, 0x00, 0xee,       // mov eax, [0x00] (MagicValue); out: 'v'
    0x66, 0xa1, 0x04, 0x00,             // mov eax, [0x04] (Version)
    0x04, b'0', 0xee,                   // add al, '0'; out: '2'
    0x66, 0xa1, 0x08, 0x00,             // mov eax, [0x08] (DeviceID)
    0x04, b'0', 0xee,                   // add al, '0'; out: '0', a placeholder
    0x66, 0xa1, 0x08, 0x00,             // wait: mov eax, [0x08]
    0x66, 0x85, 0xc0,                   // test eax, eax
    0x74, 0xf7,                         // jz wait      (until the host plugs a device)
    0xee,                               // out: the device ID
    0x66, 0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1
    0x66, 0xa3, 0x44, 0x00,             // mov [0x44], eax (QueueReady, queue 0)
    0x66, 0xa3, 0x24, 0x00,             // mov [0x24], eax (DriverFeaturesSel = 1)
    0x66, 0xa3, 0x20, 0x00,             // mov [0x20], eax (DriverFeatures: VERSION_1)
    0x66, 0xb8, 0x0b, 0x00, 0x00, 0x00, // mov eax, ACKNOWLEDGE | DRIVER | FEATURES_OK
    0x66, 0xa3, 0x70, 0x00,             // mov [0x70], eax (Status)
    0x66, 0xb8, 0x0f, 0x00, 0x00, 0x00, // mov eax, ... | DRIVER_OK
    0x66, 0xa3, 0x70, 0x00,             // mov [0x70], eax
    0x66, 0x31, 0xc0,                   // xor eax, eax
    0x66, 0xa3, 0x50, 0x00,             // mov [0x50], eax (QueueNotify: queue 0)
    0x66, 0xa1, 0x70, 0x00, 0xee,       // mov eax, [0x70] (Status); out
    0xb0, 0xfe, 0xe6, 0x64,             // i8042 reset
];

/// Polls `done` until it holds or `timeout` passes.
fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

#[test]
fn a_device_plugged_while_the_guest_runs_is_found_and_driven() {
    if !kvm_usable() {
        return;
    }
    let memory = create_guest_memory(2 << 20).unwrap();
    memory
        .write_slice(PROBE_WAIT_THEN_DRIVE, GuestAddress(LOAD_ADDRESS))
        .unwrap();
    let mut vm = Vm::new(memory).expect("KVM VM");
    let console = Console::default();
    add_legacy_devices(&mut vm, Box::new(console.clone())).unwrap();
    let devices = DeviceManager::new(&mut vm, 2).unwrap();
    let vcpu = vm.create_vcpu(0, 1).unwrap();
    start_in_real_mode(&vcpu, LOAD_ADDRESS, MMIO_GAP_START);
    let vm = Arc::new(vm);
    let (handles, ends) = spawn_all(&vm, vec![vcpu]);

    let saw_empty_slot = wait_until(GUEST_TIMEOUT, || console.bytes().len() >= 3);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let slot = devices.attach(&vm, Box::new(TestDevice(seen.clone())));
    let stops = collect_ends(&ends, 1, GUEST_TIMEOUT);
    stop_all(handles);

    let output = console.bytes();
    assert!(saw_empty_slot, "the guest never read the slot: {output:?}");
    assert_eq!(slot.unwrap(), SlotIndex(0));
    assert_eq!(
        stops,
        Some(vec![Ok(VcpuStop::Reset)]),
        "console: {output:?}"
    );
    assert_eq!(
        output,
        [b'v', b'2', b'0', VSOCK_DEVICE_ID as u8, 0x0f],
        "magic, version 2, placeholder ID 0, then the plugged device's ID and DRIVER_OK \
         without NEEDS_RESET"
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen.activations.len(), 1, "the guest activated the device");
    assert_eq!(
        seen.activations[0][0].read().unwrap(),
        1,
        "the queue notification arrived on the queue's eventfd"
    );
    assert!(
        seen.notified.is_empty(),
        "KVM took the notification in the kernel, without an exit"
    );
}
