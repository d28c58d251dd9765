//! The builtin hypervisor boots the real guest kernel and runv-agent inside
//! this process, and the host's agent client reaches the agent over the
//! VMM's own virtio-vsock: guest details, SMP, the kernel's pages shared
//! from its file, shutdown, nothing left.
//!
//! It runs where this host's KVM can boot the guest: with VT-x or AMD-V, or
//! on a PVM host given a PVM guest kernel in `RUNV_PVM_KERNEL`. Elsewhere it
//! prints `SKIPPED: <reason>`.

use std::path::Path;

use runv_agent_client::ConnectOptions;
use runv_config::{Config, HypervisorKind};
use runv_hypervisor::{host::builtin_usable, KvmSupport, VmExit};
use runv_sandbox::PodVm;
use runv_tests::{assert_guest_matches, assert_nothing_left, smaps, test_config, threads_named};

/// The builtin VM of `config` (in `scratch`) with its agent answering, or
/// None (after saying why) where this host cannot boot it.
async fn boot_builtin(scratch: &Path) -> Option<(Config, PodVm)> {
    let mut config = test_config(scratch);
    config.hypervisor = HypervisorKind::Builtin;
    if let Some(pvm_kernel) = std::env::var_os("RUNV_PVM_KERNEL") {
        config.vm.kernel = pvm_kernel.into();
        config.builtin.pvm_guest_kernel = true;
    }
    if let Err(why) = builtin_usable(&KvmSupport::probe(), config.builtin.pvm_guest_kernel) {
        println!("SKIPPED: {why}");
        return None;
    }
    config.vm.agent_timeout_secs = 20;
    let spec = PodVm::spec(&config, "builtin", scratch.join("console.log"));
    let connect = ConnectOptions::new(config.vm.agent_timeout());
    let vm = PodVm::boot(&config, spec, &connect)
        .await
        .expect("the builtin VM boots and its agent answers");
    Some((config, vm))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_boots_the_guest_and_its_agent_answers() {
    let scratch = tempfile::tempdir().unwrap();
    let console = scratch.path().join("console.log");
    let Some((config, vm)) = boot_builtin(scratch.path()).await else {
        return;
    };
    assert!(vm.pids().is_empty(), "no helper process: {:?}", vm.pids());
    let details = vm.agent().guest_details().await.expect("guest details");
    assert_guest_matches(&details, &config);
    let timeline = vm.boot_timeline(&details);
    println!(
        "boot timeline (builtin, {}):\n{timeline}",
        vm.start_info().accel_reason
    );
    assert_kernel_shared(&config);
    assert_root_image_in_place(&config);

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

/// The guest runs on the kernel's file pages, not on a copy: the VMM maps
/// the kernel copy on write, so what the guest only reads is page cache
/// every VM shares, and what it patches at boot is its own.
fn assert_kernel_shared(config: &Config) {
    assert!(config.builtin.share_boot_files, "on by default");
    let kernel = config.vm.kernel.display().to_string();
    let mappings = smaps::mappings(std::process::id());
    let of_kernel: Vec<_> = mappings.iter().filter(|m| m.path == kernel).collect();
    let resident: u64 = of_kernel.iter().map(|m| m.rss_kib).sum();
    let copied: u64 = of_kernel.iter().map(|m| m.anonymous_kib).sum();
    println!(
        "{} mappings of {kernel}: {resident} KiB resident, {copied} KiB of them copied on write",
        of_kernel.len()
    );
    assert!(
        !of_kernel.is_empty(),
        "the kernel is not mapped from its file"
    );
    assert!(
        resident > copied,
        "every resident page of the kernel was copied: nothing is shared"
    );
}

/// The guest runs its agent from the root image in place (virtio-pmem with
/// DAX): the VMM maps the image, the guest's reads made some of it
/// resident, and none of it is a copy of the VM's own.
fn assert_root_image_in_place(config: &Config) {
    let image = config
        .builtin
        .root_image
        .as_ref()
        .expect("the tests boot builtin from the root image, as installed")
        .display()
        .to_string();
    let mappings = smaps::mappings(std::process::id());
    let of_image: Vec<_> = mappings.iter().filter(|m| m.path == image).collect();
    let resident: u64 = of_image.iter().map(|m| m.rss_kib).sum();
    let copied: u64 = of_image.iter().map(|m| m.anonymous_kib).sum();
    println!("{image}: {resident} KiB resident, {copied} KiB copied");
    assert!(!of_image.is_empty(), "the root image is not mapped");
    assert!(resident > 0, "the guest read nothing from the root image");
    assert_eq!(copied, 0, "pages of the root image were copied");
}
