//! A qemu VM with a NIC on a tap that runv-network made in a test
//! namespace, in tc-mirred mode and then (where the kernel has macvtap) on
//! a macvtap queue in macvtap mode: QEMU takes the inherited fd, the
//! guest's virtio-net driver binds the device, and the NIC has the CNI
//! interface's MAC.
//! Needs what tests/netns.rs needs, plus QEMU, vhost-device-vsock and the
//! guest images (`RUNV_KERNEL`, `RUNV_INITRAMFS`, else the installed
//! ones); prints `SKIPPED: <reason>` otherwise.

mod common;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use common::{macvtap_skip_reason, TestNetns};
use runv_config::QemuConfig;
use runv_hypervisor::{qmp::Qmp, Hypervisor, NetDevice, QemuVm, VmSpec};
use runv_network::{format_mac, Interconnect, PodNetwork};
use serde_json::json;

fn guest_image(variable: &str, installed: &str) -> Option<PathBuf> {
    let path = std::env::var_os(variable)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/local/share/runv").join(installed));
    path.is_file().then_some(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_vm_boots_with_a_nic_on_the_pods_tap() {
    skip_unless_able!();
    let (Some(kernel), Some(initramfs)) = (
        guest_image("RUNV_KERNEL", "vmlinux"),
        guest_image("RUNV_INITRAMFS", "runv-initramfs.cpio.gz"),
    ) else {
        println!("SKIPPED: no guest kernel or initramfs (set RUNV_KERNEL and RUNV_INITRAMFS)");
        return;
    };
    for program in ["qemu-system-x86_64", "vhost-device-vsock"] {
        if std::process::Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            println!("SKIPPED: no {program}");
            return;
        }
    }
    boot_with_a_nic(kernel.clone(), initramfs.clone(), Interconnect::TcMirred).await;
    let ns = TestNetns::with_eth0();
    match macvtap_skip_reason(&ns) {
        Some(reason) => println!("SKIPPED (macvtap mode): {reason}"),
        None => boot_with_a_nic(kernel, initramfs, Interconnect::Macvtap).await,
    }
}

async fn boot_with_a_nic(kernel: PathBuf, initramfs: PathBuf, mode: Interconnect) {
    println!("interconnect {mode}");
    let ns = TestNetns::with_eth0();
    let network = PodNetwork::setup_with(&ns.path(), mode).unwrap();
    let interface = &network.interfaces()[0];
    let scratch = tempfile::tempdir().unwrap();
    let id = format!("netboot-{}-{mode}", std::process::id());
    let console = scratch.path().join("console.log");
    let spec = VmSpec {
        id: id.clone(),
        kernel,
        initramfs,
        kernel_params: String::new(),
        vcpus: 1,
        memory_mib: 256,
        run_dir: scratch.path().to_owned(),
        console_log: console.clone(),
        shared_dir: None,
        net_devices: vec![NetDevice {
            tap: interface.tap.clone(),
            mac: interface.mac(),
        }],
        vfio_devices: Vec::new(),
    };
    // This host may have only TCG: the test accepts it, as the install does.
    let config = QemuConfig {
        allow_tcg: true,
        ..QemuConfig::default()
    };
    let mut vm = QemuVm::new(spec, config);
    vm.start().await.expect("the VM starts with a NIC");

    // The guest driver has bound the NIC once its status has DRIVER_OK.
    let qmp_socket = scratch.path().join(&id).join("qmp.sock");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut qmp = loop {
        match Qmp::connect(&qmp_socket).await {
            Ok(qmp) => break qmp,
            Err(e) if Instant::now() > deadline => panic!("no QMP: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let devices = qmp.execute("x-query-virtio", json!({})).await.unwrap();
    let path = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "virtio-net")
        .unwrap_or_else(|| panic!("no virtio-net device: {devices}"))["path"]
        .as_str()
        .unwrap()
        .to_owned();
    let status = loop {
        let status = qmp
            .execute("x-query-virtio-status", json!({ "path": path }))
            .await
            .unwrap();
        if status.to_string().contains("DRIVER_OK") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the guest never bound the NIC: {status}\nconsole:\n{}",
            std::fs::read_to_string(&console).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!("virtio-net status: {}", status["status"]);
    let filters = qmp.execute("query-rx-filter", json!({})).await.unwrap();
    assert_eq!(
        filters[0]["main-mac"],
        format_mac(&interface.mac()),
        "{filters}"
    );
    let network_info = qmp
        .execute(
            "human-monitor-command",
            json!({ "command-line": "info network" }),
        )
        .await
        .unwrap();
    println!("{}", network_info.as_str().unwrap_or_default());

    vm.stop(Duration::from_secs(5)).await;
    network.teardown().unwrap();
    assert!(!ns.links().contains("_runv"));
}
