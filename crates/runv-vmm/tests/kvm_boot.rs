//! The real guest kernel and initramfs (runv-agent as /init) booted by the
//! builtin VMM through the PVH entry. It runs where this host's KVM can
//! boot the guest: with VT-x or AMD-V, or on a PVM host given a PVM guest
//! kernel in RUNV_PVM_KERNEL. Elsewhere it prints `SKIPPED: <reason>`.
//!
//! Until the VMM has its vsock device the agent cannot serve, so the test
//! asserts that the kernel reached the agent, which then ends the VM.

mod common;

use std::{path::PathBuf, sync::mpsc, time::Duration};

use common::Console;
use runv_vmm::{boot, devices::add_legacy_devices, memory::create_guest_memory, VcpuStop, Vm};

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// The guest kernel this host can boot, or why there is none.
fn bootable_kernel() -> Result<(PathBuf, PathBuf), String> {
    let env_path = |var: &str| std::env::var_os(var).map(PathBuf::from);
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("no usable /dev/kvm: {e}"))?;
    let kernel = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        env_path("RUNV_PVM_KERNEL").ok_or(
            "this host's KVM is the PVM backend, which boots only PVM guest kernels; set \
             RUNV_PVM_KERNEL to one (scripts/build-kernel.sh --source <PVM tree> --fragment \
             guest/kernel/pvm.config)",
        )?
    } else {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if !cpuinfo.split_whitespace().any(|f| f == "vmx" || f == "svm") {
            return Err("the CPU offers neither VT-x nor AMD-V".into());
        }
        env_path("RUNV_KERNEL").ok_or("RUNV_KERNEL is not set: run through scripts/test.sh")?
    };
    let initramfs = env_path("RUNV_INITRAMFS")
        .ok_or("RUNV_INITRAMFS is not set: run through scripts/test.sh")?;
    Ok((kernel, initramfs))
}

#[test]
fn builtin_boots_the_guest_kernel_to_its_agent() {
    let (kernel, initramfs) = match bootable_kernel() {
        Ok(images) => images,
        Err(reason) => {
            println!("SKIPPED: {reason}");
            return;
        }
    };
    let memory = create_guest_memory(256 << 20).unwrap();
    let entry = boot::load(
        &memory,
        &kernel,
        &initramfs,
        "console=ttyS0 reboot=t panic=-1 runv.log_level=debug",
    )
    .expect("kernel and initramfs load");
    let mut vm = Vm::new(memory).expect("KVM VM");
    let console = Console::default();
    add_legacy_devices(&mut vm, Box::new(console.clone())).unwrap();
    let mut vcpu = vm.create_vcpu(0, 1).unwrap();
    boot::set_up_boot_vcpu(&vcpu, vm.memory(), entry).unwrap();

    let (done, stopped) = mpsc::channel();
    std::thread::spawn(move || {
        let stop = vcpu.run(&vm).map_err(|e| e.to_string());
        let _ = done.send(stop);
    });
    let stop = stopped.recv_timeout(BOOT_TIMEOUT);
    let log = String::from_utf8_lossy(&console.bytes()).into_owned();
    println!("guest console:\n{log}");
    let stop = stop.expect("the guest ends within the boot timeout");
    assert_eq!(stop, Ok(VcpuStop::Reset), "console:\n{log}");
    assert!(
        log.contains("Linux version 6."),
        "the kernel printed its banner"
    );
    assert!(
        log.contains("runv-agent"),
        "the kernel ran the agent as /init"
    );
}
