//! A real pod VM on the test hypervisor (QEMU, under TCG on hosts whose KVM
//! cannot run the guest; or builtin, in the nested-KVM bed) with the real
//! guest kernel and runv-agent: boot, talk, shut down, and the failures a
//! user can meet on the way. Every test checks that nothing is left behind.

use std::time::Duration;

use nix::{
    sys::signal::{self, Signal},
    unistd::Pid,
};
use runv_agent_client::{AgentError, ConnectOptions};
use runv_config::HypervisorKind;
use runv_protocol::PROTOCOL_VERSION;
use runv_sandbox::{PodVm, SandboxError};
use runv_tests::{
    assert_guest_matches, assert_nothing_left, boot_from_initramfs, initramfs_without_agent,
    is_running, only_on, spawn_vm_holder, test_config, vm_helper_programs,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_a_vm_and_talks_to_its_agent() {
    let scratch = tempfile::tempdir().unwrap();
    let config = test_config(scratch.path());
    let console = scratch.path().join("console.log");
    let spec = PodVm::spec(&config, "boot", console.clone());
    let connect = ConnectOptions::new(config.vm.agent_timeout());

    let vm = PodVm::boot(&config, spec, &connect)
        .await
        .expect("VM boots");
    let pids = vm.pids();
    let helpers = vm_helper_programs(false);
    assert_eq!(pids.len(), helpers.len(), "{helpers:?}: {pids:?}");
    assert!(pids.iter().all(|&pid| is_running(pid)));

    let details = vm.agent().guest_details().await.expect("guest details");
    assert_guest_matches(&details, &config);

    let timeline = vm.boot_timeline(&details);
    let guest = timeline.guest.expect("the agent reports its boot times");
    assert!(guest.kernel_to_init > Duration::ZERO);
    assert!(timeline.agent_ready >= timeline.hypervisor_spawn);
    println!(
        "boot timeline ({}, {}):\n{timeline}",
        config.hypervisor,
        vm.start_info().accel
    );

    let shutdown = vm.shutdown().await;
    println!("shutdown: {:?}", shutdown);
    assert!(!shutdown.forced, "the guest powered off when asked");
    assert_eq!(shutdown.exit, runv_hypervisor::VmExit::GuestShutdown);

    let log = std::fs::read_to_string(&console).unwrap();
    assert!(log.contains("runv-agent ready"), "console log:\n{log}");
    assert_nothing_left(scratch.path(), &pids, &["console.log"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_of_another_protocol_version_is_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let config = test_config(scratch.path());
    let spec = PodVm::spec(&config, "mismatch", scratch.path().join("console.log"));
    // This side pretends to be a runv of the next protocol version.
    let connect = ConnectOptions {
        protocol_version: PROTOCOL_VERSION + 1,
        ..ConnectOptions::new(config.vm.agent_timeout())
    };

    let err = PodVm::boot(&config, spec, &connect)
        .await
        .err()
        .expect("a mismatched agent is refused");
    match &err {
        SandboxError::Agent {
            source: AgentError::ProtocolMismatch { agent, ours, .. },
            ..
        } => assert_eq!((*agent, *ours), (PROTOCOL_VERSION, PROTOCOL_VERSION + 1)),
        other => panic!("expected a protocol mismatch, got: {other}"),
    }
    let message = err.to_string();
    assert!(message.contains("build-initramfs.sh"), "{message}");
    assert_nothing_left(scratch.path(), &[], &["console.log"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_that_never_answers_times_out() {
    let scratch = tempfile::tempdir().unwrap();
    let mut config = test_config(scratch.path());
    boot_from_initramfs(&mut config, initramfs_without_agent(scratch.path()));
    config.vm.agent_timeout_secs = 10;
    let spec = PodVm::spec(&config, "silent", scratch.path().join("console.log"));
    let connect = ConnectOptions::new(config.vm.agent_timeout());

    let err = PodVm::boot(&config, spec, &connect)
        .await
        .err()
        .expect("no agent, no VM");
    assert!(
        matches!(
            err,
            SandboxError::Agent {
                source: AgentError::NotReady { .. },
                ..
            }
        ),
        "{err}"
    );
    let message = err.to_string();
    assert!(message.contains("vsock port 1024"), "{message}");
    assert!(message.contains("vm.agent_timeout_secs"), "{message}");
    assert_nothing_left(scratch.path(), &[], &["console.log", "no-agent.cpio.gz"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_that_cannot_boot_is_reported() {
    let scratch = tempfile::tempdir().unwrap();
    let mut config = test_config(scratch.path());
    let not_a_kernel = scratch.path().join("not-a-kernel");
    std::fs::write(&not_a_kernel, b"this is not an ELF kernel").unwrap();
    config.vm.kernel = not_a_kernel;
    let spec = PodVm::spec(&config, "badkernel", scratch.path().join("console.log"));
    let connect = ConnectOptions::new(config.vm.agent_timeout());

    let err = PodVm::boot(&config, spec, &connect)
        .await
        .err()
        .expect("a bad kernel does not boot");
    let message = err.to_string();
    match config.hypervisor {
        // QEMU starts, and ends as the guest cannot run.
        HypervisorKind::Qemu => {
            assert!(matches!(err, SandboxError::EndedDuringBoot { .. }), "{err}");
            assert!(message.contains("qemu exited"), "{message}");
        }
        // The builtin VMM refuses the image before it makes a VM.
        HypervisorKind::Builtin => assert!(
            message.contains("cannot load guest kernel")
                && message.contains("scripts/build-kernel.sh"),
            "{message}"
        ),
    }
    assert_nothing_left(scratch.path(), &[], &["console.log", "not-a-kernel"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_vm_is_killed_and_cleaned_up() {
    let scratch = tempfile::tempdir().unwrap();
    let config = test_config(scratch.path());
    let spec = PodVm::spec(&config, "dropped", scratch.path().join("console.log"));
    let connect = ConnectOptions::new(config.vm.agent_timeout());

    let vm = PodVm::boot(&config, spec, &connect)
        .await
        .expect("VM boots");
    let pids = vm.pids();
    drop(vm);
    assert_nothing_left(scratch.path(), &pids, &["console.log"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_that_does_not_power_off_is_killed() {
    if !only_on(
        HypervisorKind::Qemu,
        "a VM frozen by stopping its processes",
    ) {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let mut config = test_config(scratch.path());
    config.vm.shutdown_timeout_secs = 2;
    let spec = PodVm::spec(&config, "frozen", scratch.path().join("console.log"));
    let connect = ConnectOptions::new(config.vm.agent_timeout());

    let vm = PodVm::boot(&config, spec, &connect)
        .await
        .expect("VM boots");
    let pids = vm.pids();
    // Freeze every process of the VM: the guest can no longer answer, and
    // QEMU cannot act on SIGTERM, only on SIGKILL.
    for &pid in &pids {
        signal::kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();
    }
    let shutdown = vm.shutdown().await;
    assert!(shutdown.forced, "{shutdown:?}");
    assert_eq!(shutdown.exit, runv_hypervisor::VmExit::Stopped);
    assert!(shutdown.duration < Duration::from_secs(10), "{shutdown:?}");
    assert_nothing_left(scratch.path(), &pids, &["console.log"]);
}

#[test]
fn killed_owner_takes_its_vm_along() {
    let scratch = tempfile::tempdir().unwrap();
    let (mut owner, pids) = spawn_vm_holder(env!("CARGO_BIN_EXE_hold-vm"), &[scratch.path()]);
    assert_eq!(
        pids.len(),
        vm_helper_programs(false).len(),
        "hold-vm printed {pids:?}"
    );
    assert!(pids.iter().all(|&pid| is_running(pid)));

    owner.kill().unwrap();
    owner.wait().unwrap();
    // The parent-death signal kills the helpers; nobody was left to remove
    // the VM directory (the shim's delete does that after a crash).
    assert_nothing_left(scratch.path(), &pids, &["console.log", "run/held/"]);
}
