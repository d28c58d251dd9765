//! The builtin hypervisor's root image attacked from a privileged
//! container: every VM on the host runs its agent from the same page cache
//! of the image (virtio-pmem with DAX), so a guest that could write it
//! would run its code in every other pod's guest. The container, root in
//! the guest with the guest's devices, overwrites the pmem device; the
//! writes reach neither its own guest's view, nor the host's file, nor the
//! next VM, which boots from the image as before.

use std::{fs, path::Path};

use k8s_cri::v1::{LinuxContainerSecurityContext, LinuxSandboxSecurityContext};
use runv_config::HypervisorKind;
use runv_tests::{
    containerd::Containerd,
    cri::{app_config, exec_sync, pod_config, remove_pods, run_pod, start_app, CriClient},
    only_on, test_config,
};

/// Overwrites the first 16 KiB of the pmem device (the superblock among
/// them) through the guest kernel's block layer, then drops the guest's
/// page cache, so that what it reads back is what the device holds. Each
/// store the device refuses is a VM exit: a few thousand are enough.
const ATTACK: &str = "dd if=/dev/zero of=/dev/pmem0 bs=4096 count=4 conv=notrunc,fsync \
                      2>&1 && sync && echo 3 > /proc/sys/vm/drop_caches && \
                      head -c 16384 /dev/pmem0 | tr -d '\\000' | wc -c";

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_cannot_change_the_shared_root_image() {
    if !only_on(HypervisorKind::Builtin, "the pmem root image") {
        return;
    }
    let Some(containerd) = Containerd::start_with_cri() else {
        return;
    };
    let image = test_config(containerd.dir())
        .builtin
        .root_image
        .expect("builtin boots from the root image");
    let before = fs::read(&image).unwrap();
    let mut cri = CriClient::with_pod_images(&containerd).await;
    let log_dir = containerd.dir().join("pod-logs");
    fs::create_dir_all(&log_dir).unwrap();

    let (attacker, attacker_pod) = privileged_app(&mut cri, &log_dir, "attacker").await;
    let attack = exec_sync(&mut cri, &attacker, &["sh", "-c", ATTACK]).await;
    let output = String::from_utf8_lossy(&attack.stdout).into_owned();
    assert_eq!(
        attack.exit_code, 0,
        "the writes themselves go through: {output}"
    );
    let nonzero: u64 = output.lines().last().unwrap().trim().parse().unwrap();
    assert!(
        nonzero > 0,
        "the guest reads back the zeros it wrote: the device took them"
    );
    assert!(
        fs::read(&image).unwrap() == before,
        "the host's root image {} changed",
        image.display()
    );

    // The next VM boots from the image and runs its agent as before.
    let (bystander, bystander_pod) = privileged_app(&mut cri, &log_dir, "bystander").await;
    let check = exec_sync(&mut cri, &bystander, &["sh", "-c", "echo alive"]).await;
    assert_eq!(String::from_utf8_lossy(&check.stdout).trim(), "alive");
    remove_pods(&containerd, &mut cri, &[&attacker_pod, &bystander_pod]).await;
}

/// A privileged pod with one privileged container, which has the guest's
/// devices; returns the container and pod IDs.
async fn privileged_app(cri: &mut CriClient, log_dir: &Path, name: &str) -> (String, String) {
    let mut config = pod_config(name, log_dir);
    let linux = config.linux.as_mut().unwrap();
    linux.security_context = Some(LinuxSandboxSecurityContext {
        privileged: true,
        ..linux.security_context.take().unwrap()
    });
    let pod = run_pod(cri, &config).await;
    let mut app = app_config(name);
    app.linux
        .get_or_insert_with(Default::default)
        .security_context = Some(LinuxContainerSecurityContext {
        privileged: true,
        ..Default::default()
    });
    (start_app(cri, &pod, &config, app).await, pod)
}
