//! Figures of the builtin VMM that do not need a bootable guest kernel, so
//! they run on every KVM host, PVM included:
//! - VM creation to first guest instruction: memory, VM, devices, vCPU,
//!   registers, and the guest's first instruction (an `out` to the i8042
//!   reset line, so the first exit is also the last);
//! - the VMM's own memory per VM: process RSS growth per live VM, minus
//!   the guest memory the payload touched (one page), with 1 and 20 VMs.

use std::time::{Duration, Instant};

use kvm_bindings::kvm_regs;
use runv_vmm::{devices::add_legacy_devices, memory::create_guest_memory, VcpuStop, Vm};
use vm_memory::{Bytes, GuestAddress};

const LOAD_ADDRESS: u64 = 0x1000;
/// `mov al, 0xfe; out 0x64, al`: reset through the i8042.
const RESET_PAYLOAD: &[u8] = &[0xb0, 0xfe, 0xe6, 0x64];
const GUEST_RAM: u64 = 128 << 20;
const RUNS: usize = 50;

/// A VM whose vCPU has executed its first instruction, kept alive so that
/// its memory can be counted.
struct LiveVm {
    _vm: Vm,
    _vcpu: runv_vmm::Vcpu,
}

fn create_and_run_first_instruction() -> LiveVm {
    let memory = create_guest_memory(GUEST_RAM).expect("guest memory");
    memory
        .write_slice(RESET_PAYLOAD, GuestAddress(LOAD_ADDRESS))
        .expect("payload");
    let mut vm = Vm::new(memory).expect("KVM VM");
    add_legacy_devices(&mut vm, Box::new(std::io::sink())).expect("devices");
    let mut vcpu = vm.create_vcpu(0, 1).expect("vCPU");
    let mut sregs = vcpu.fd().get_sregs().expect("sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.fd().set_sregs(&sregs).expect("set sregs");
    vcpu.fd()
        .set_regs(&kvm_regs {
            rip: LOAD_ADDRESS,
            rflags: 2,
            ..Default::default()
        })
        .expect("set regs");
    assert_eq!(vcpu.run(&vm).expect("run"), VcpuStop::Reset);
    LiveVm {
        _vm: vm,
        _vcpu: vcpu,
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn main() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        println!("SKIPPED: no usable /dev/kvm: {e}");
        return;
    }
    let backend = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        "KVM (PVM backend)"
    } else {
        "KVM"
    };
    println!(
        "runv-vmm benchmarks on {backend}, {} MiB guest RAM",
        GUEST_RAM >> 20
    );

    // Warm up the code paths and the kernel's KVM caches once.
    drop(create_and_run_first_instruction());
    let mut times: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            let vm = create_and_run_first_instruction();
            let elapsed = start.elapsed();
            drop(vm);
            elapsed
        })
        .collect();
    times.sort();
    println!(
        "VM creation to first guest instruction: median {:.3} ms, p95 {:.3} ms ({RUNS} runs)",
        percentile(&times, 50).as_secs_f64() * 1000.0,
        percentile(&times, 95).as_secs_f64() * 1000.0,
    );

    for count in [1usize, 20] {
        let before = rss_kib();
        let vms: Vec<LiveVm> = (0..count)
            .map(|_| create_and_run_first_instruction())
            .collect();
        let after = rss_kib();
        // The payload touched one 4 KiB guest page per VM.
        let per_vm = (after.saturating_sub(before) as f64 / count as f64) - 4.0;
        println!(
            "VMM memory per VM with {count:>2} VMs: {per_vm:.0} KiB (RSS {before} -> {after} KiB); goal < 3072 KiB"
        );
        drop(vms);
    }
    println!(
        "(memory is user-space RSS: KVM's in-kernel VM and vCPU state is not in it; the VMM has \
         no virtio devices or vCPU threads yet, so these figures will grow)"
    );
}
