//! The builtin hypervisor's root image attacked from a privileged
//! container: every VM on the host runs its agent from the same page cache
//! of the image (virtio-pmem with DAX), so a guest that could write it
//! would run its code in every other pod's guest. The container, root in
//! the guest, makes itself a node for the pmem device and overwrites
//! runv-agent's code through it; the writes reach neither the device as
//! its own guest reads it, nor the host's file, nor the next VM, which
//! boots from the image and runs its agent as before.

use std::{fs, path::Path};

use k8s_cri::v1::{LinuxContainerSecurityContext, LinuxSandboxSecurityContext};
use runv_config::HypervisorKind;
use runv_tests::{
    containerd::Containerd,
    cri::{app_config, exec_sync, pod_config, remove_pods, run_pod, start_app, CriClient},
    only_on, test_config,
};

/// The pmem device is not among the container's devices: the container
/// makes its node (privileged: CAP_MKNOD, every device allowed) from the
/// numbers in /proc/partitions. Through it, it overwrites a 4 KiB page of
/// runv-agent's code (2 MiB into the image, inside the agent's extents)
/// with zeros, past the guest's page cache (O_DIRECT: through the guest's
/// pmem driver to the device); then drops the guest's caches, reads the
/// same block back and prints it in hex. Each store the device refuses is
/// a VM exit (a few hundred for the page).
const ATTACK: &str = "set -- $(grep -w pmem0 /proc/partitions) && mknod /dev/root-image b $1 $2 \
                      && dd if=/dev/zero of=/dev/root-image bs=4096 seek=512 count=1 \
                      oflag=direct conv=notrunc && sync && echo 3 > /proc/sys/vm/drop_caches \
                      && dd if=/dev/root-image of=/dev/shm/back bs=4096 skip=512 count=1 && \
                      echo && od -An -tx1 -v /dev/shm/back | tr -d ' \\n'";

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
    assert!(
        fs::read(&image).unwrap() == before,
        "the host's root image {} changed",
        image.display()
    );
    let agent_code = &before[512 * 4096..513 * 4096];
    assert!(
        agent_code.iter().any(|&byte| byte != 0),
        "the attacked block of the image is not the agent's code"
    );
    let expected: String = agent_code
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let read_back = output.lines().last().unwrap_or_default();
    assert_eq!(
        read_back.len(),
        expected.len(),
        "the guest read the blocks back"
    );
    assert!(
        read_back == expected,
        "the guest reads back what it wrote, not the image: the device took the writes"
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
