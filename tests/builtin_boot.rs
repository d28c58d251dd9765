//! The builtin hypervisor boots the real guest kernel and runv-agent inside
//! this process, and the host's agent client reaches the agent over the
//! VMM's own virtio-vsock: guest details, SMP, shutdown, nothing left.
//!
//! It runs where this host's KVM can boot the guest: with VT-x or AMD-V, or
//! on a PVM host given a PVM guest kernel in `RUNV_PVM_KERNEL`. Elsewhere it
//! prints `SKIPPED: <reason>`.

use runv_agent_client::ConnectOptions;
use runv_config::HypervisorKind;
use runv_hypervisor::{host::builtin_usable, KvmSupport, VmExit};
use runv_sandbox::PodVm;
use runv_tests::{assert_guest_matches, assert_nothing_left, test_config, threads_named};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_boots_the_guest_and_its_agent_answers() {
    let scratch = tempfile::tempdir().unwrap();
    let mut config = test_config(scratch.path());
    config.hypervisor = HypervisorKind::Builtin;
    if let Some(pvm_kernel) = std::env::var_os("RUNV_PVM_KERNEL") {
        config.vm.kernel = pvm_kernel.into();
        config.builtin.pvm_guest_kernel = true;
    }
    if let Err(why) = builtin_usable(&KvmSupport::probe(), config.builtin.pvm_guest_kernel) {
        println!("SKIPPED: {why}");
        return;
    }
    config.vm.agent_timeout_secs = 20;
    let console = scratch.path().join("console.log");
    let spec = PodVm::spec(&config, "builtin", console.clone());
    let connect = ConnectOptions::new(config.vm.agent_timeout());

    let vm = PodVm::boot(&config, spec, &connect)
        .await
        .expect("the builtin VM boots and its agent answers");
    assert!(vm.pids().is_empty(), "no helper process: {:?}", vm.pids());
    let details = vm.agent().guest_details().await.expect("guest details");
    assert_guest_matches(&details, &config);
    let timeline = vm.boot_timeline(&details);
    println!(
        "boot timeline (builtin, {}):\n{timeline}",
        vm.start_info().accel_reason
    );

    let shutdown = vm.shutdown().await;
    println!("shutdown: {shutdown:?}");
    assert!(!shutdown.forced, "the guest powered off when asked");
    assert_eq!(shutdown.exit, VmExit::GuestShutdown);
    let log = std::fs::read_to_string(&console).unwrap();
    assert!(log.contains("runv-agent ready"), "console log:\n{log}");
    assert_nothing_left(scratch.path(), &[], &["console.log"]);
    let left = threads_named(runv_vmm::THREAD_NAME_PREFIX);
    assert!(left.is_empty(), "VMM threads left running: {left:?}");
}
