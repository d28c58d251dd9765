//! A pod through containerd's CRI plugin with the runtime handler `runv`,
//! driven by a CRI v1 client as the kubelet drives it: the sandbox and two
//! app containers run in one shim and one VM, exec, stats, logs and
//! listing work, and stopping and removing the pod leaves nothing behind.

use std::{
    fs,
    path::Path,
    time::{Duration, Instant},
};

use k8s_cri::v1::{
    ContainerConfig, ContainerFilter, ContainerState, ContainerStatsRequest,
    CreateContainerRequest, Device, ListContainersRequest, Mount, NamespaceMode,
    RemoveContainerRequest, StartContainerRequest, StopContainerRequest, VersionRequest,
};
use runv_tests::{
    containerd::Containerd,
    cri::{
        app_config, build_pause_image, create_app, exec_sync, pod_config, pod_processes,
        remove_pods, run_pod, start_app, CriClient, HYPERVISOR, POD_NAMESERVER, SHIM, VIRTIOFSD,
    },
    disks::{self, ext4_image, processes_holding, raw_image, read_at, read_ext4_file, LoopDevice},
    pss_kib,
};

/// The vsock backend runv runs beside QEMU for a pod.
const VSOCK_DEVICE: &str = "vhost-device-vsock";

#[tokio::test(flavor = "multi_thread")]
async fn pod_runs_in_one_vm() {
    let Some(containerd) = Containerd::start_with_cri() else {
        return;
    };
    containerd.import_busybox();
    containerd.import_image(&build_pause_image(containerd.dir()));
    let mut cri = CriClient::connect(&containerd.dir().join("containerd.sock")).await;
    let version = cri
        .runtime
        .version(VersionRequest::default())
        .await
        .expect("CRI Version")
        .into_inner();
    println!(
        "CRI: {} {} (API {})",
        version.runtime_name, version.runtime_version, version.runtime_api_version
    );

    let log_dir = containerd.dir().join("pod-logs");
    fs::create_dir_all(&log_dir).unwrap();
    let pod_config = pod_config("runv-pod", &log_dir, NamespaceMode::Node);
    let started = Instant::now();
    let pod_id = run_pod(&mut cri, &pod_config).await;
    let sandbox_ran = started.elapsed();
    let mut apps = Vec::new();
    let mut first_app_parts = None;
    for name in ["app1", "app2"] {
        let create_started = Instant::now();
        let id = cri
            .runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod_id.clone(),
                config: Some(app_config(name)),
                sandbox_config: Some(pod_config.clone()),
            })
            .await
            .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}"))
            .into_inner()
            .container_id;
        let created = create_started.elapsed();
        cri.runtime
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("StartContainer {name}: {e}"));
        first_app_parts.get_or_insert((created, create_started.elapsed() - created));
        apps.push((name, id));
    }
    let (created, app_started) = first_app_parts.unwrap();
    println!(
        "CRI pod start: {:?} (RunPodSandbox {sandbox_ran:?}, CreateContainer {created:?}, \
         StartContainer {app_started:?})",
        sandbox_ran + created + app_started
    );

    // One shim and one VM serve the sandbox and both apps.
    assert_eq!(pod_processes(&containerd, SHIM).len(), 1, "one shim");
    assert_eq!(pod_processes(&containerd, HYPERVISOR).len(), 1, "one VM");
    print_host_memory(&containerd);
    let tasks = containerd.ctr_ok(&["task", "ls"]);
    for id in std::iter::once(&pod_id).chain(apps.iter().map(|(_, id)| id)) {
        assert!(
            tasks
                .lines()
                .any(|line| line.starts_with(id.as_str()) && line.contains("RUNNING")),
            "task {id} is not running: {tasks}"
        );
        // `ctr task ps` asks the shim, which asks the guest agent.
        let ps = containerd.ctr_ok(&["task", "ps", id]);
        assert!(ps.lines().count() >= 2, "no process in {id}: {ps}");
    }

    for (name, id) in &apps {
        let hello = exec_sync(&mut cri, id, &["echo", &format!("hello from {name}")]).await;
        assert_eq!(hello.exit_code, 0);
        assert_eq!(
            String::from_utf8_lossy(&hello.stdout),
            format!("hello from {name}\n")
        );
        let failed = exec_sync(&mut cri, id, &["sh", "-c", "echo oops >&2; exit 3"]).await;
        assert_eq!(failed.exit_code, 3);
        assert_eq!(String::from_utf8_lossy(&failed.stderr), "oops\n");
        // CRI's files: resolv.conf from the pod's DNS config, the node's
        // hosts (a host-network pod).
        let resolv = exec_sync(&mut cri, id, &["cat", "/etc/resolv.conf"]).await;
        let resolv = String::from_utf8_lossy(&resolv.stdout);
        assert!(
            resolv.contains(POD_NAMESERVER),
            "{name} resolv.conf: {resolv}"
        );
        let hosts = exec_sync(&mut cri, id, &["cat", "/etc/hosts"]).await;
        assert_eq!(
            String::from_utf8_lossy(&hosts.stdout),
            fs::read_to_string("/etc/hosts").unwrap()
        );
        // The container's stdout reached its CRI log through the FIFOs.
        let log = wait_for_log(
            &log_dir.join(format!("{name}.log")),
            &format!("started {name}"),
        );
        assert!(log.contains(" stdout F started "), "{name} log: {log}");
    }
    // The pod's /dev/shm is shared by its containers.
    let (app1, app2) = (&apps[0].1, &apps[1].1);
    let write = exec_sync(
        &mut cri,
        app1,
        &["sh", "-c", "echo shm-ok > /dev/shm/check"],
    )
    .await;
    assert_eq!(
        write.exit_code,
        0,
        "{}",
        String::from_utf8_lossy(&write.stderr)
    );
    let read = exec_sync(&mut cri, app2, &["cat", "/dev/shm/check"]).await;
    assert_eq!(String::from_utf8_lossy(&read.stdout), "shm-ok\n");

    let stats = cri
        .runtime
        .container_stats(ContainerStatsRequest {
            container_id: app1.clone(),
        })
        .await
        .expect("ContainerStats")
        .into_inner()
        .stats
        .expect("stats");
    let cpu = stats.cpu.and_then(|cpu| cpu.usage_core_nano_seconds);
    let memory = stats.memory.and_then(|memory| memory.working_set_bytes);
    println!("ContainerStats {app1}: cpu {cpu:?} ns, working set {memory:?} bytes");
    assert!(cpu.is_some_and(|cpu| cpu.value > 0), "cpu: {cpu:?}");
    assert!(memory.is_some_and(|m| m.value > 0), "memory: {memory:?}");

    let listed = cri
        .runtime
        .list_containers(ListContainersRequest {
            filter: Some(ContainerFilter {
                pod_sandbox_id: pod_id.clone(),
                ..Default::default()
            }),
        })
        .await
        .expect("ListContainers")
        .into_inner()
        .containers;
    let mut listed: Vec<_> = listed.iter().map(|c| (c.id.clone(), c.state)).collect();
    listed.sort();
    let mut expected: Vec<_> = apps
        .iter()
        .map(|(_, id)| (id.clone(), ContainerState::ContainerRunning as i32))
        .collect();
    expected.sort();
    assert_eq!(listed, expected);

    remove_pods(&containerd, &mut cri, &[&pod_id]).await;
    containerd.stop();
}

/// A block device given to a container of a running pod (a CRI mount of a
/// host block device) is hot-plugged into the pod VM, mounted, readable
/// and writable; when that container is removed the disk leaves the guest
/// and the hypervisor lets go of it, while the pod runs on.
#[tokio::test(flavor = "multi_thread")]
async fn block_volume_hot_plugs_into_a_running_pod() {
    if let Some(why) = disks::unavailable() {
        println!("SKIPPED: {why}");
        return;
    }
    let Some(containerd) = Containerd::start_with_cri() else {
        return;
    };
    containerd.import_busybox();
    containerd.import_image(&build_pause_image(containerd.dir()));
    let mut cri = CriClient::connect(&containerd.dir().join("containerd.sock")).await;
    let scratch = tempfile::tempdir().unwrap();
    let contents = scratch.path().join("contents");
    fs::create_dir(&contents).unwrap();
    fs::write(contents.join("hello"), "on the disk\n").unwrap();
    let image = scratch.path().join("volume.img");
    ext4_image(&image, 32, Some(&contents));
    let disk = LoopDevice::attach(&image);

    let log_dir = containerd.dir().join("pod-logs");
    fs::create_dir_all(&log_dir).unwrap();
    let pod_config = pod_config("runv-pod", &log_dir, NamespaceMode::Node);
    let pod_id = run_pod(&mut cri, &pod_config).await;
    let keeper = start_app(&mut cri, &pod_id, &pod_config, app_config("keeper")).await;
    assert_eq!(
        guest_disks(&mut cri, &keeper).await,
        Vec::<String>::new(),
        "no disk yet"
    );

    let mut config = app_config("disk-user");
    config.mounts = vec![Mount {
        container_path: "/vol".into(),
        host_path: disk.path_str().into(),
        ..Default::default()
    }];
    let user = start_app(&mut cri, &pod_id, &pod_config, config).await;
    let script = "cat /vol/hello; echo from-cri > /vol/out; sync; grep ' /vol ' /proc/mounts";
    let used = exec_sync(&mut cri, &user, &["sh", "-c", script]).await;
    let used = String::from_utf8_lossy(&used.stdout);
    let mut lines = used.lines();
    assert_eq!(lines.next(), Some("on the disk"));
    let mount = lines.next().unwrap_or_default();
    assert!(
        mount.starts_with("/dev/vd") && mount.contains(" /vol ext4 rw"),
        "/vol is the plugged disk: {mount}"
    );
    assert_plugged(&mut cri, &keeper, &[disk.path()]).await;
    remove_app(&mut cri, &user).await;
    assert_unplugged(&mut cri, &keeper, &[disk.path()]).await;
    assert_eq!(
        read_ext4_file(disk.path(), "/out").as_deref(),
        Some("from-cri\n")
    );
    remove_pods(&containerd, &mut cri, &[&pod_id]).await;
    containerd.stop();
}

/// Host block devices given to a container of a running pod as raw devices
/// (CRI's ContainerConfig.devices, as a Kubernetes raw block volume comes):
/// each is hot-plugged, not mounted, and the container's node at its
/// device path is the guest disk. It reads the host's bytes and writes its
/// own, except on the device given with "r" only; removing the container
/// unplugs both while the pod runs on, and the host has the write.
#[tokio::test(flavor = "multi_thread")]
async fn raw_block_devices_hot_plug_into_a_running_pod() {
    if let Some(why) = disks::unavailable() {
        println!("SKIPPED: {why}");
        return;
    }
    let Some(containerd) = Containerd::start_with_cri() else {
        return;
    };
    containerd.import_busybox();
    containerd.import_image(&build_pause_image(containerd.dir()));
    let mut cri = CriClient::connect(&containerd.dir().join("containerd.sock")).await;
    let scratch = tempfile::tempdir().unwrap();
    let (rw_image, ro_image) = (scratch.path().join("rw.img"), scratch.path().join("ro.img"));
    raw_image(&rw_image, 8, b"read-write volume");
    raw_image(&ro_image, 8, b"read-only volume!");
    let (rw, ro) = (LoopDevice::attach(&rw_image), LoopDevice::attach(&ro_image));

    let log_dir = containerd.dir().join("pod-logs");
    fs::create_dir_all(&log_dir).unwrap();
    let pod_config = pod_config("runv-pod", &log_dir, NamespaceMode::Node);
    let pod_id = run_pod(&mut cri, &pod_config).await;
    let keeper = start_app(&mut cri, &pod_id, &pod_config, app_config("keeper")).await;
    let with_devices = |name: &str| ContainerConfig {
        devices: vec![
            Device {
                container_path: "/dev/xvdb".into(),
                host_path: rw.path_str().into(),
                permissions: "rw".into(),
            },
            Device {
                container_path: "/dev/xvdc".into(),
                host_path: ro.path_str().into(),
                permissions: "r".into(),
            },
        ],
        ..app_config(name)
    };
    let user = start_app(&mut cri, &pod_id, &pod_config, with_devices("raw-user")).await;
    let script = "head -c 17 /dev/xvdb; echo; head -c 17 /dev/xvdc; echo; \
        printf 'from the pod' | dd of=/dev/xvdb bs=512 seek=1 conv=notrunc 2>/dev/null \
        && echo rw-written; \
        printf 'x' | dd of=/dev/xvdc conv=notrunc 2>/dev/null && echo ro-written; \
        sync";
    let used = exec_sync(&mut cri, &user, &["sh", "-c", script]).await;
    assert_eq!(
        String::from_utf8_lossy(&used.stdout),
        "read-write volume\nread-only volume!\nrw-written\n",
        "{}",
        String::from_utf8_lossy(&used.stderr)
    );
    assert_plugged(&mut cri, &keeper, &[rw.path(), ro.path()]).await;
    let read_only = exec_sync(&mut cri, &keeper, &["sh", "-c", "cat /sys/block/vd*/ro"]).await;
    let mut read_only: Vec<_> = String::from_utf8_lossy(&read_only.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    read_only.sort();
    assert_eq!(read_only, ["0", "1"], "the `r` device is a read-only disk");
    remove_app(&mut cri, &user).await;
    assert_unplugged(&mut cri, &keeper, &[rw.path(), ro.path()]).await;
    assert_eq!(read_at(&rw_image, 512, 12), b"from the pod");
    assert_eq!(read_at(&ro_image, 0, 17), b"read-only volume!");

    // A create that fails once the devices are plugged unplugs them.
    let broken = ContainerConfig {
        command: vec!["/no/such/program".into()],
        args: Vec::new(),
        ..with_devices("broken")
    };
    let broken = create_app(&mut cri, &pod_id, &pod_config, broken).await;
    let refused = cri
        .runtime
        .start_container(StartContainerRequest {
            container_id: broken.clone(),
        })
        .await
        .expect_err("a container without its program does not start");
    println!("refused: {refused}");
    assert_unplugged(&mut cri, &keeper, &[rw.path(), ro.path()]).await;
    cri.runtime
        .remove_container(RemoveContainerRequest {
            container_id: broken,
        })
        .await
        .expect("RemoveContainer");
    remove_pods(&containerd, &mut cri, &[&pod_id]).await;
    containerd.stop();
}

/// The disks the guest has (its `vd*` block devices), as `keeper`, a
/// container of the pod, sees them.
async fn guest_disks(cri: &mut CriClient, keeper: &str) -> Vec<String> {
    let partitions = exec_sync(cri, keeper, &["cat", "/proc/partitions"]).await;
    assert_eq!(partitions.exit_code, 0, "reading the guest's partitions");
    String::from_utf8_lossy(&partitions.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().nth(3))
        .filter(|name| name.starts_with("vd"))
        .map(str::to_owned)
        .collect()
}

/// Each of `host_disks` is in the guest, the hypervisor holding it.
async fn assert_plugged(cri: &mut CriClient, keeper: &str, host_disks: &[&Path]) {
    let plugged = guest_disks(cri, keeper).await;
    assert_eq!(plugged.len(), host_disks.len(), "in the guest: {plugged:?}");
    for disk in host_disks {
        let holders = processes_holding(disk);
        assert!(
            holders.iter().any(|h| h.contains(HYPERVISOR)),
            "the hypervisor holds {}: {holders:?}",
            disk.display()
        );
    }
}

/// The guest has no disk left and nothing on the host holds
/// `host_disks`, while the pod (its `keeper`) runs on.
async fn assert_unplugged(cri: &mut CriClient, keeper: &str, host_disks: &[&Path]) {
    assert_eq!(
        guest_disks(cri, keeper).await,
        Vec::<String>::new(),
        "unplugged in the guest"
    );
    for disk in host_disks {
        assert_eq!(
            processes_holding(disk),
            Vec::<String>::new(),
            "nothing on the host holds {}",
            disk.display()
        );
    }
    let alive = exec_sync(cri, keeper, &["echo", "still here"]).await;
    assert_eq!(String::from_utf8_lossy(&alive.stdout), "still here\n");
}

async fn remove_app(cri: &mut CriClient, id: &str) {
    cri.runtime
        .stop_container(StopContainerRequest {
            container_id: id.to_owned(),
            timeout: 5,
        })
        .await
        .expect("StopContainer");
    cri.runtime
        .remove_container(RemoveContainerRequest {
            container_id: id.to_owned(),
        })
        .await
        .expect("RemoveContainer");
}

/// Prints the proportional set size (PSS) of every host process runv runs
/// for the pod: what the pod costs the node beyond its containers' own
/// memory (the figure behind the RuntimeClass's overhead).
fn print_host_memory(containerd: &Containerd) {
    let mut parts = Vec::new();
    let mut total_kib = 0;
    for program in [SHIM, HYPERVISOR, VSOCK_DEVICE, VIRTIOFSD] {
        let kib: u64 = pod_processes(containerd, program)
            .iter()
            .filter_map(|process| process.split_once(':'))
            .filter_map(|(pid, _)| pss_kib(pid.parse().ok()?))
            .sum();
        total_kib += kib;
        parts.push(format!("{program} {} MiB", kib / 1024));
    }
    println!(
        "runv host memory for the pod (PSS): {} MiB ({})",
        total_kib / 1024,
        parts.join(", ")
    );
}

/// The CRI log at `path` once it has `line`: containerd writes it from
/// the container's stdout FIFO, a moment after the output.
fn wait_for_log(path: &Path, line: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = fs::read_to_string(path).unwrap_or_default();
        if log.contains(line) || Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
