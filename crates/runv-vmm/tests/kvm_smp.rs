//! SMP on real KVM with 16-bit payloads of our own: application processors
//! wait for the guest to start them, the boot vCPU starts one with
//! INIT-SIPI-SIPI through its in-kernel local APIC, a guest reset on one
//! vCPU ends them all, and kicks end vCPUs wherever they are. Skipped,
//! saying why, on hosts without a usable /dev/kvm.

mod common;
mod real_mode;

use std::sync::Arc;

use common::{start_in_real_mode, Console};
use kvm_bindings::{KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED};
use real_mode::{collect_ends, spawn_all, stop_all, GUEST_TIMEOUT};
use runv_vmm::testing::kvm_usable;
use runv_vmm::{devices::add_legacy_devices, memory::create_guest_memory, mptable, VcpuStop, Vm};
use vm_memory::{Bytes, GuestAddress};

const BSP_CODE: u64 = 0x1000;
/// An AP started with SIPI vector 0x02 runs real-mode code from 0x2000.
const AP_VECTOR: u8 = 0x02;
const AP_CODE: u64 = (AP_VECTOR as u64) << 12;
/// The local APIC's ID register.
const APIC_ID_REGISTER: usize = 0x20;

/// A VM with 2 MiB of RAM, COM1 and the i8042, `bsp` and `ap` code loaded.
fn vm_with(bsp: &[u8], ap: &[u8]) -> (Vm, Console) {
    let memory = create_guest_memory(2 << 20).unwrap();
    memory.write_slice(bsp, GuestAddress(BSP_CODE)).unwrap();
    memory.write_slice(ap, GuestAddress(AP_CODE)).unwrap();
    let mut vm = Vm::new(memory).expect("KVM VM");
    let console = Console::default();
    add_legacy_devices(&mut vm, Box::new(console.clone())).unwrap();
    (vm, console)
}

#[test]
fn aps_have_their_apic_ids_and_wait_to_be_started() {
    if !kvm_usable() {
        return;
    }
    let (vm, _) = vm_with(&[], &[]);
    let vcpus: Vec<_> = (0..3).map(|id| vm.create_vcpu(id, 3).unwrap()).collect();
    for vcpu in &vcpus {
        let id = vcpu.id();
        let expected = if id == 0 {
            KVM_MP_STATE_RUNNABLE
        } else {
            KVM_MP_STATE_UNINITIALIZED
        };
        assert_eq!(
            vcpu.fd().get_mp_state().unwrap().mp_state,
            expected,
            "vCPU {id}"
        );
        let lapic = vcpu.fd().get_lapic().unwrap();
        let apic_id = u32::from_le_bytes(
            lapic.regs[APIC_ID_REGISTER..APIC_ID_REGISTER + 4]
                .iter()
                .map(|&b| b as u8)
                .collect::<Vec<_>>()
                .try_into()
                .unwrap(),
        );
        assert_eq!(u64::from(apic_id >> 24), id, "local APIC ID of vCPU {id}");
        let cpuid = vcpu
            .fd()
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        let leaf1 = cpuid.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(
            u64::from(leaf1.ebx >> 24),
            id,
            "CPUID initial APIC ID of vCPU {id}"
        );
    }
    let memory = vm.memory();
    mptable::write(memory, 3).unwrap();
    let mut pointer = [0u8; 4];
    memory
        .read_slice(&mut pointer, GuestAddress(mptable::ADDRESS))
        .unwrap();
    assert_eq!(&pointer, b"_MP_");
}

#[rustfmt::skip]
const START_AP_THEN_HALT: &[u8] = &[
    // As an OS does before its first IPI (from a software-disabled local
    // APIC, KVM delivered none in our tests).
    0x66, 0xb8, 0xff, 0x01, 0x00, 0x00, // mov eax, 0x1ff        (APIC enabled, spurious vector 0xff)
    0x66, 0xa3, 0xf0, 0x00,             // mov [0xf0], eax       (spurious interrupt vector register)
    0x66, 0xb8, 0x00, 0x00, 0x00, 0x01, // mov eax, 0x01000000   (destination APIC ID 1)
    0x66, 0xa3, 0x10, 0x03,             // mov [0x310], eax      (ICR high)
    0x66, 0xb8, 0x00, 0x45, 0x00, 0x00, // mov eax, 0x4500       (INIT, assert)
    0x66, 0xa3, 0x00, 0x03,             // mov [0x300], eax      (ICR low: send)
    0x66, 0xb8, AP_VECTOR, 0x46, 0x00, 0x00, // mov eax, 0x4600 | vector (STARTUP)
    0x66, 0xa3, 0x00, 0x03,             // mov [0x300], eax
    0x66, 0xa3, 0x00, 0x03,             // mov [0x300], eax      (the second SIPI)
    0xf4,                               // hlt                   (sleeps in KVM)
    0xeb, 0xfd,                         // jmp hlt
];

#[rustfmt::skip]
const AP_PRINTS_THEN_RESETS: &[u8] = &[
    0xba, 0xf8, 0x03,       // mov dx, 0x3f8
    0xb0, b'A', 0xee,       // mov al, 'A'; out dx, al
    0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al  (i8042 CPU reset)
    0xf4,                   // hlt (never reached)
];

#[test]
fn the_boot_vcpu_starts_an_ap_whose_reset_ends_both() {
    if !kvm_usable() {
        return;
    }
    let (vm, console) = vm_with(START_AP_THEN_HALT, AP_PRINTS_THEN_RESETS);
    let bsp = vm.create_vcpu(0, 2).unwrap();
    let ap = vm.create_vcpu(1, 2).unwrap();
    start_in_real_mode(&bsp, BSP_CODE, u64::from(mptable::LAPIC_ADDRESS));
    let vm = Arc::new(vm);
    let (handles, ends) = spawn_all(&vm, vec![bsp, ap]);
    let stops = collect_ends(&ends, 2, GUEST_TIMEOUT);
    stop_all(handles);
    let output = console.bytes();
    let stops = stops.unwrap_or_else(|| {
        panic!(
            "the vCPUs did not both end within {GUEST_TIMEOUT:?}; console: {:?}",
            String::from_utf8_lossy(&output)
        )
    });
    assert_eq!(output, b"A", "the AP ran the code the SIPI pointed at");
    assert_eq!(
        stops,
        vec![Ok(VcpuStop::Reset), Ok(VcpuStop::Reset)],
        "the AP's reset also ended the halted boot vCPU"
    );
}

#[test]
fn kicks_end_a_spinning_vcpu_and_an_ap_never_started() {
    if !kvm_usable() {
        return;
    }
    let spin = [0xeb, 0xfe]; // jmp $: never leaves guest mode by itself
    let (vm, _) = vm_with(&spin, &[]);
    let bsp = vm.create_vcpu(0, 2).unwrap();
    let ap = vm.create_vcpu(1, 2).unwrap();
    start_in_real_mode(&bsp, BSP_CODE, 0);
    let vm = Arc::new(vm);
    let (handles, ends) = spawn_all(&vm, vec![bsp, ap]);
    // Let both threads get into KVM_RUN before the kick.
    assert!(ends
        .recv_timeout(std::time::Duration::from_millis(200))
        .is_err());
    for handle in &handles {
        handle.kick();
    }
    let stops = collect_ends(&ends, 2, GUEST_TIMEOUT).expect("both vCPUs end after the kick");
    stop_all(handles);
    assert_eq!(stops, vec![Ok(VcpuStop::Kicked), Ok(VcpuStop::Kicked)]);
    assert!(!vm.control().reset_requested());
}

#[test]
fn a_kick_as_the_thread_starts_is_not_lost() {
    if !kvm_usable() {
        return;
    }
    // Kicks land anywhere from before the run to inside KVM_RUN.
    for _ in 0..20 {
        let (vm, _) = vm_with(&[0xeb, 0xfe], &[]);
        let vcpu = vm.create_vcpu(0, 1).unwrap();
        start_in_real_mode(&vcpu, BSP_CODE, 0);
        let (handles, ends) = spawn_all(&Arc::new(vm), vec![vcpu]);
        handles[0].kick();
        let stops = collect_ends(&ends, 1, GUEST_TIMEOUT);
        stop_all(handles);
        assert_eq!(stops, Some(vec![Ok(VcpuStop::Kicked)]));
    }
}
