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
    Capability, ContainerConfig, ContainerFilter, ContainerState, ContainerStatsRequest,
    CreateContainerRequest, Device, LinuxContainerConfig, LinuxContainerResources,
    LinuxContainerSecurityContext, ListContainersRequest, Mount, MountPropagation, NamespaceMode,
    NamespaceOption, RemoveContainerRequest, RunPodSandboxRequest, StartContainerRequest,
    StopContainerRequest, VersionRequest,
};
use runv_tests::{
    containerd::Containerd,
    cri::{
        app_config, create_app, exec_sync, pod_config, pod_processes, remove_container,
        remove_pods, run_pod, start_app, vm_process, CriClient, POD_NAMESERVER, RUNTIME_HANDLER,
        SHIM,
    },
    disks::{self, ext4_image, processes_holding, raw_image, read_at, read_ext4_file, LoopDevice},
    pss_kib,
};

#[tokio::test(flavor = "multi_thread")]
async fn pod_runs_in_one_vm() {
    let Some(containerd) = Containerd::start_with_cri() else {
        return;
    };
    let mut cri = CriClient::with_pod_images(&containerd).await;
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
    let pod_config = pod_config("runv-pod", &log_dir);
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
    assert_eq!(pod_processes(&containerd, vm_process()).len(), 1, "one VM");
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
        // CRI's files: resolv.conf from the pod's DNS config, and the
        // node's hosts, which containerd copies for the pod.
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

/// containerd with its CRI plugin and the pod images, for tests of host
/// block devices; None (after saying why) where loop devices cannot be made.
async fn cri_with_disks() -> Option<(Containerd, CriClient)> {
    if let Some(why) = disks::unavailable() {
        println!("SKIPPED: {why}");
        return None;
    }
    let containerd = Containerd::start_with_cri()?;
    let cri = CriClient::with_pod_images(&containerd).await;
    Some((containerd, cri))
}

/// A block device given to a container of a running pod (a CRI mount of a
/// host block device) is hot-plugged into the pod VM, mounted, readable
/// and writable; when that container is removed the disk leaves the guest
/// and the hypervisor lets go of it, while the pod runs on.
#[tokio::test(flavor = "multi_thread")]
async fn block_volume_hot_plugs_into_a_running_pod() {
    let Some((containerd, mut cri)) = cri_with_disks().await else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let contents = scratch.path().join("contents");
    fs::create_dir(&contents).unwrap();
    fs::write(contents.join("hello"), "on the disk\n").unwrap();
    let image = scratch.path().join("volume.img");
    ext4_image(&image, 32, Some(&contents));
    let disk = LoopDevice::attach(&image);

    let log_dir = containerd.dir().join("pod-logs");
    fs::create_dir_all(&log_dir).unwrap();
    let pod_config = pod_config("runv-pod", &log_dir);
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
    remove_container(&mut cri, &user).await;
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
    let Some((containerd, mut cri)) = cri_with_disks().await else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let (rw_image, ro_image) = (scratch.path().join("rw.img"), scratch.path().join("ro.img"));
    raw_image(&rw_image, 8, b"read-write volume");
    raw_image(&ro_image, 8, b"read-only volume!");
    let (rw, ro) = (LoopDevice::attach(&rw_image), LoopDevice::attach(&ro_image));

    let log_dir = containerd.dir().join("pod-logs");
    fs::create_dir_all(&log_dir).unwrap();
    let pod_config = pod_config("runv-pod", &log_dir);
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
    remove_container(&mut cri, &user).await;
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
            holders.iter().any(|h| h.contains(vm_process())),
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

/// A pod's containers share its IPC and UTS namespaces (the sandbox's),
/// and with `shareProcessNamespace` its PID namespace, as CRI asks through
/// `/proc/<sandbox pid>/ns/<type>` paths in their specs. Apps `a` and `b`
/// share the PID namespace (the kubelet's `pid: POD`); `c` has its own,
/// as in a pod without `shareProcessNamespace`; b's end ends the child
/// b's init leaves in the shared namespace. The pod is on the host
/// network (no CNI needed): its sandbox gets a UTS namespace of its own
/// for the pod's hostname, which CRI has the apps join.
#[tokio::test(flavor = "multi_thread")]
async fn pod_containers_share_ipc_uts_and_pid_namespaces() {
    let Some(containerd) = Containerd::start_with_cri() else {
        return;
    };
    let mut cri = CriClient::with_pod_images(&containerd).await;
    let log_dir = containerd.dir().join("pod-logs");
    fs::create_dir_all(&log_dir).unwrap();
    let mut pod = pod_config("shared", &log_dir);
    let sandbox_namespaces = pod
        .linux
        .as_mut()
        .and_then(|linux| linux.security_context.as_mut())
        .and_then(|context| context.namespace_options.as_mut())
        .unwrap();
    sandbox_namespaces.pid = NamespaceMode::Pod as i32;
    let sandbox_namespaces = sandbox_namespaces.clone();
    let pod_id = run_pod(&mut cri, &pod).await;
    let app = |name: &str, pid: NamespaceMode, script: &str| ContainerConfig {
        args: vec![script.into()],
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                // The pod's options, as the kubelet copies them.
                namespace_options: Some(NamespaceOption {
                    pid: pid as i32,
                    ..sandbox_namespaces.clone()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..app_config(name)
    };
    let a = app("a", NamespaceMode::Pod, "echo started a; exec sleep 12345");
    let a = start_app(&mut cri, &pod_id, &pod, a).await;
    // b's shell leaves a child behind when it ends.
    let b = app(
        "b",
        NamespaceMode::Pod,
        "echo started b; sleep 23456 & wait $!",
    );
    let b = start_app(&mut cri, &pod_id, &pod, b).await;
    let c = app(
        "c",
        NamespaceMode::Container,
        "echo started c; exec sleep 3600",
    );
    let c = start_app(&mut cri, &pod_id, &pod, c).await;

    // In the shared PID namespace the sandbox's pause is PID 1.
    for kind in ["ipc", "uts", "pid"] {
        let own = format!("/proc/self/ns/{kind}");
        let pause = namespace(&mut cri, &a, &format!("/proc/1/ns/{kind}")).await;
        let of_a = namespace(&mut cri, &a, &own).await;
        let of_b = namespace(&mut cri, &b, &own).await;
        let of_c = namespace(&mut cri, &c, &own).await;
        assert_eq!(of_a, pause, "{kind}: a and the sandbox");
        assert_eq!(of_b, pause, "{kind}: b and the sandbox");
        match kind {
            "pid" => assert_ne!(of_c, pause, "c has a PID namespace of its own"),
            _ => assert_eq!(of_c, pause, "{kind}: c and the sandbox"),
        }
    }
    for id in [&a, &b, &c] {
        let hostname = exec_sync(&mut cri, id, &["hostname"]).await;
        assert_eq!(String::from_utf8_lossy(&hostname.stdout), "shared\n");
    }
    // b sees a's process; c does not.
    let sees_a = |output: &[u8]| String::from_utf8_lossy(output).contains("sleep 12345");
    let in_b = exec_sync(&mut cri, &b, &["ps", "-o", "pid,args"]).await;
    assert!(sees_a(&in_b.stdout), "b does not see a's process");
    let in_c = exec_sync(&mut cri, &c, &["ps", "-o", "pid,args"]).await;
    assert!(!sees_a(&in_c.stdout), "c sees a's process");
    // A POSIX message queue (IPC) made in a is there in b and c.
    let made = exec_sync(&mut cri, &a, &["touch", "/dev/mqueue/runv-shared"]).await;
    assert_eq!(
        made.exit_code,
        0,
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    for id in [&b, &c] {
        let queues = exec_sync(&mut cri, id, &["ls", "/dev/mqueue"]).await;
        assert_eq!(String::from_utf8_lossy(&queues.stdout), "runv-shared\n");
    }
    // Its init's end ends b: no PID namespace teardown kills b's child,
    // the agent does (or it would hold b's stdio for good).
    let stop = cri.runtime.stop_container(StopContainerRequest {
        container_id: b.clone(),
        timeout: 10,
    });
    tokio::time::timeout(Duration::from_secs(60), stop)
        .await
        .expect("b stops")
        .expect("StopContainer b");
    let in_a = exec_sync(&mut cri, &a, &["ps", "-o", "args"]).await;
    assert!(
        !String::from_utf8_lossy(&in_a.stdout).contains("sleep 23456"),
        "b's child outlived it"
    );

    remove_pods(&containerd, &mut cri, &[&pod_id]).await;
    containerd.stop();
}

/// Volumes propagate the host's mounts as Kubernetes asks, into the VM:
/// the kubelet's pod directories are shared mounts, and a mount the host
/// makes under one after the containers started reaches the containers
/// whose volume is HostToContainer (`rslave`) or Bidirectional
/// (`rshared`), not one whose volume is private. A container's own mount
/// under a Bidirectional volume (it has CAP_SYS_ADMIN) stays in the VM:
/// nothing the guest does mounts anything on the host.
#[tokio::test(flavor = "multi_thread")]
async fn volumes_follow_host_mounts_as_their_propagation_asks() {
    let Some(containerd) = Containerd::start_with_cri() else {
        return;
    };
    let mut cri = CriClient::with_pod_images(&containerd).await;
    // Outside containerd's directory, whose mounts the removal checks.
    let scratch = tempfile::tempdir().unwrap();
    let volume = scratch.path().join("propagating-volume");
    fs::create_dir_all(volume.join("late")).unwrap();
    let mut host_mounts = HostMounts::default();
    host_mounts.bind_shared(&volume);

    let log_dir = containerd.dir().join("pod-logs");
    fs::create_dir_all(&log_dir).unwrap();
    let pod = pod_config("propagation", &log_dir);
    let pod_id = run_pod(&mut cri, &pod).await;
    let with_volume = |name: &str, propagation: MountPropagation, capabilities: &[&str]| {
        let mut config = app_config(name);
        config.mounts = vec![Mount {
            container_path: "/vol".into(),
            host_path: volume.to_string_lossy().into_owned(),
            propagation: propagation as i32,
            ..Default::default()
        }];
        config.linux = Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                capabilities: Some(Capability {
                    add_capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        config
    };
    let follower = with_volume(
        "follower",
        MountPropagation::PropagationHostToContainer,
        &[],
    );
    let follower = start_app(&mut cri, &pod_id, &pod, follower).await;
    let private = with_volume("private", MountPropagation::PropagationPrivate, &[]);
    let private = start_app(&mut cri, &pod_id, &pod, private).await;
    let both = with_volume(
        "both",
        MountPropagation::PropagationBidirectional,
        &["SYS_ADMIN"],
    );
    let both = start_app(&mut cri, &pod_id, &pod, both).await;

    host_mounts.tmpfs(&volume.join("late"));
    fs::write(volume.join("late/flag"), "mounted later\n").unwrap();
    for (name, id, expected) in [
        ("follower", &follower, Some("mounted later\n")),
        ("both", &both, Some("mounted later\n")),
        ("private", &private, None),
    ] {
        let read = exec_sync(&mut cri, id, &["cat", "/vol/late/flag"]).await;
        match expected {
            Some(text) => assert_eq!(
                String::from_utf8_lossy(&read.stdout),
                text,
                "{name} does not see the host's later mount"
            ),
            None => assert_ne!(read.exit_code, 0, "{name} sees the host's later mount"),
        }
    }

    let script = "mkdir -p /vol/from-guest && mount -t tmpfs guest /vol/from-guest && \
                  echo guest > /vol/from-guest/flag && cat /vol/from-guest/flag";
    let mounted = exec_sync(&mut cri, &both, &["sh", "-c", script]).await;
    assert_eq!(
        String::from_utf8_lossy(&mounted.stdout),
        "guest\n",
        "{}",
        String::from_utf8_lossy(&mounted.stderr)
    );
    assert!(
        !volume.join("from-guest/flag").exists(),
        "a mount in the guest reached the host"
    );
    let host_mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !host_mountinfo.contains("from-guest"),
        "a mount in the guest reached the host: {host_mountinfo}"
    );

    remove_pods(&containerd, &mut cri, &[&pod_id]).await;
    containerd.stop();
}

/// Mounts a test makes on the host, undone (last first) when it ends.
#[derive(Default)]
struct HostMounts(Vec<std::path::PathBuf>);

impl HostMounts {
    /// Binds `dir` onto itself and makes it shared, as the kubelet's pod
    /// directories are.
    fn bind_shared(&mut self, dir: &Path) {
        use nix::mount::{mount, MsFlags};
        mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .unwrap_or_else(|e| panic!("bind {}: {e}", dir.display()));
        self.0.push(dir.to_owned());
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("make {} shared: {e}", dir.display()));
    }

    fn tmpfs(&mut self, dir: &Path) {
        use nix::mount::{mount, MsFlags};
        mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("tmpfs on {}: {e}", dir.display()));
        self.0.push(dir.to_owned());
    }
}

impl Drop for HostMounts {
    fn drop(&mut self) {
        for dir in self.0.iter().rev() {
            let _ = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// The namespace `path` (a /proc/<pid>/ns file) names, seen in container `id`.
/// A pod asking for the node's network, IPC or PID namespace is refused
/// at RunPodSandbox with an error that names the field and the fix, and
/// leaves no shim or VM behind.
#[tokio::test(flavor = "multi_thread")]
async fn pods_in_the_nodes_namespaces_are_refused() {
    let Some(containerd) = Containerd::start_with_cri() else {
        return;
    };
    let mut cri = CriClient::with_pod_images(&containerd).await;
    let log_dir = containerd.dir().join("pod-logs");
    fs::create_dir_all(&log_dir).unwrap();
    type Case = (&'static str, fn(&mut NamespaceOption));
    let cases: [Case; 3] = [
        ("hostNetwork", |o| o.network = NamespaceMode::Node as i32),
        ("hostIPC", |o| o.ipc = NamespaceMode::Node as i32),
        ("hostPID", |o| o.pid = NamespaceMode::Node as i32),
    ];
    for (field, node_namespace) in cases {
        let mut config = pod_config("node-namespace", &log_dir);
        let options = config
            .linux
            .as_mut()
            .and_then(|linux| linux.security_context.as_mut())
            .and_then(|context| context.namespace_options.as_mut())
            .unwrap();
        node_namespace(options);
        let refused = cri
            .runtime
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: RUNTIME_HANDLER.into(),
            })
            .await
            .expect_err("a pod in the node's namespaces is refused");
        let message = refused.message();
        println!("{field}: {message}");
        for expected in [format!("{field}: true"), "run it with runc".into()] {
            assert!(message.contains(&expected), "{expected:?} not in {message}");
        }
        containerd.assert_nothing_running();
    }
    containerd.stop();
}

async fn namespace(cri: &mut CriClient, id: &str, path: &str) -> String {
    let link = exec_sync(cri, id, &["readlink", path]).await;
    assert_eq!(
        link.exit_code,
        0,
        "readlink {path} in {id}: {}",
        String::from_utf8_lossy(&link.stderr)
    );
    String::from_utf8_lossy(&link.stdout).trim().to_owned()
}

/// A pod's VM has the VM's base (the test config: 2 vCPUs, 256 MiB) plus
/// the limits the pod declares, which containerd passes to the shim as
/// annotations on the sandbox's spec; a pod declaring none gets the base,
/// and one declaring more than the caps gets the caps.
#[tokio::test(flavor = "multi_thread")]
async fn pod_vm_is_sized_by_the_pods_limits() {
    let Some(containerd) = Containerd::start_with_cri() else {
        return;
    };
    // The vCPU cap defaults to the host's CPUs, two on small CI hosts.
    let mut runv_config = fs::read_to_string(containerd.runv_config()).unwrap();
    runv_config.push_str("max_vcpus = 4\n");
    fs::write(containerd.runv_config(), runv_config).unwrap();
    let mut cri = CriClient::with_pod_images(&containerd).await;
    let log_dir = containerd.dir().join("pod-logs");
    fs::create_dir_all(&log_dir).unwrap();

    // What the kubelet declares for containers limited to 2 CPUs and
    // 512 MiB in all.
    let mut limited = pod_config("limited", &log_dir);
    limited.linux.as_mut().unwrap().resources = Some(LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 200_000,
        cpu_shares: 2048,
        memory_limit_in_bytes: 512 << 20,
        ..Default::default()
    });
    let limited_id = run_pod(&mut cri, &limited).await;
    let annotations = sandbox_annotations(&containerd, &limited_id);
    println!("sandbox annotations: {annotations}");
    assert_eq!(
        annotations["io.kubernetes.cri.sandbox-memory"],
        (512u64 << 20).to_string()
    );
    assert_eq!(annotations["io.kubernetes.cri.sandbox-cpu-quota"], "200000");
    let app = start_app(&mut cri, &limited_id, &limited, app_config("sized")).await;
    assert_guest_size(&mut cri, &app, 2 + 2, 256 + 512).await;

    let plain = pod_config("plain", &log_dir);
    let plain_id = run_pod(&mut cri, &plain).await;
    let app = start_app(&mut cri, &plain_id, &plain, app_config("base")).await;
    assert_guest_size(&mut cri, &app, 2, 256).await;

    // 16 CPUs: more than max_vcpus, which the VM gets, with a warning.
    let mut greedy = pod_config("greedy", &log_dir);
    greedy.linux.as_mut().unwrap().resources = Some(LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 1_600_000,
        ..Default::default()
    });
    let greedy_id = run_pod(&mut cri, &greedy).await;
    let app = start_app(&mut cri, &greedy_id, &greedy, app_config("capped")).await;
    assert_guest_size(&mut cri, &app, 4, 256).await;
    let log = fs::read_to_string(containerd.dir().join("containerd.log")).unwrap();
    let warning = log
        .lines()
        .find(|line| line.contains("default/greedy") && line.contains("max_vcpus"));
    println!("cap warning: {warning:?}");
    assert!(
        warning.is_some_and(|line| line.contains("18 vCPUs") && line.contains("it gets 4")),
        "no cap warning for default/greedy in containerd's log"
    );

    remove_pods(&containerd, &mut cri, &[&limited_id, &plain_id, &greedy_id]).await;
    containerd.stop();
}

/// The annotations containerd put on sandbox `id`'s spec, from its bundle.
fn sandbox_annotations(containerd: &Containerd, id: &str) -> serde_json::Value {
    let bundle = containerd
        .dir()
        .join("state/io.containerd.runtime.v2.task/k8s.io")
        .join(id);
    let spec: serde_json::Value =
        serde_json::from_slice(&fs::read(bundle.join("config.json")).unwrap()).unwrap();
    spec["annotations"].clone()
}

/// Asserts that container `id` sees `vcpus` vCPUs and `memory_mib` of
/// memory, less what the guest kernel keeps for itself (under a quarter).
async fn assert_guest_size(cri: &mut CriClient, id: &str, vcpus: u32, memory_mib: u64) {
    let script = "nproc; grep MemTotal /proc/meminfo";
    let seen = exec_sync(cri, id, &["sh", "-c", script]).await;
    let seen = String::from_utf8_lossy(&seen.stdout);
    let mut lines = seen.lines();
    let nproc: Option<u32> = lines.next().and_then(|n| n.trim().parse().ok());
    let mem_total_kib: Option<u64> = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1)?.parse().ok());
    let (Some(nproc), Some(mem_total_kib)) = (nproc, mem_total_kib) else {
        panic!("cannot read the guest's size from {seen:?}");
    };
    let mib = mem_total_kib / 1024;
    println!("{id}: {nproc} vCPUs, MemTotal {mib} MiB (asked {vcpus}, {memory_mib} MiB)");
    assert_eq!(nproc, vcpus, "vCPUs the container sees");
    assert!(
        mib <= memory_mib && mib >= memory_mib * 3 / 4,
        "the guest sees {mib} MiB of {memory_mib}"
    );
}

/// Prints the proportional set size (PSS) of every host process runv runs
/// for the pod: what the pod costs the node beyond its containers' own
/// memory (the figure behind the RuntimeClass's overhead).
fn print_host_memory(containerd: &Containerd) {
    let mut parts = Vec::new();
    let mut total_kib = 0;
    let programs = std::iter::once(SHIM).chain(runv_tests::vm_helper_programs(true));
    for program in programs {
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
