//! Many at once: ten CRI pods created together, each with a shared
//! directory, a block device and a NIC of its own, none seeing another's;
//! ten `ctr run` together; a block device hot-plugged into a pod while
//! other containers of it are created and deleted. All removed with the
//! host back to its footprint from before (tests/support/leaks.rs).

// A test holds the lock on host-wide footprints (leaks::exclusive) for
// its whole run, awaits included, so that the binary's tests run one at a
// time: blocking another test's thread on it is the point.
#![allow(clippy::await_holding_lock)]

use std::{fs, path::PathBuf};

use k8s_cri::v1::{ContainerConfig, Device, Mount};
use runv_tests::{
    cni::pod_ip,
    containerd::Containerd,
    cri::{
        app_config, exec_sync, pod_config, remove_container, remove_pods, run_pod, start_app,
        CriClient,
    },
    disks::{self, raw_image, LoopDevice},
    leaks::{self, Footprint},
};

const PODS: usize = 10;

/// What pod `n` owns on the host: a directory with a file naming it, and a
/// disk whose first bytes name it.
struct PodVolumes {
    dir: PathBuf,
    disk: LoopDevice,
}

impl PodVolumes {
    fn new(root: &std::path::Path, n: usize) -> PodVolumes {
        let dir = root.join(format!("volume-{n}"));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(format!("owner-{n}")), "").unwrap();
        let image = root.join(format!("disk-{n}.img"));
        raw_image(&image, 4, format!("disk-of-pod-{n:02}").as_bytes());
        PodVolumes {
            dir,
            disk: LoopDevice::attach(&image),
        }
    }

    fn container(&self, name: &str) -> ContainerConfig {
        ContainerConfig {
            mounts: vec![Mount {
                container_path: "/data".into(),
                host_path: self.dir.to_string_lossy().into_owned(),
                ..Default::default()
            }],
            devices: vec![Device {
                container_path: "/dev/xvdb".into(),
                host_path: self.disk.path_str().into(),
                permissions: "rw".into(),
            }],
            ..app_config(name)
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_cri_pods_at_once() {
    let _serial = leaks::exclusive();
    if let Some(why) = disks::unavailable() {
        println!("SKIPPED: each pod has a block device: {why}");
        return;
    }
    let Some(containerd) = Containerd::start_with_cri() else {
        return;
    };
    let cri = CriClient::with_pod_images(&containerd).await;
    let log_dir = containerd.dir().join("pod-logs");
    fs::create_dir_all(&log_dir).unwrap();
    let volumes: Vec<_> = (0..PODS)
        .map(|n| PodVolumes::new(containerd.dir(), n))
        .collect();
    let baseline = Footprint::take(&containerd);

    let started = std::time::Instant::now();
    let pods = futures_join_all((0..PODS).map(|n| {
        let mut cri = cri.clone();
        let config = pod_config(&format!("pod-{n}"), &log_dir);
        let app = volumes[n].container("app");
        async move {
            let pod = run_pod(&mut cri, &config).await;
            let app = start_app(&mut cri, &pod, &config, app).await;
            (pod, app)
        }
    }))
    .await;
    println!(
        "{PODS} pods with a container each started together in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let mut cri = cri;
    let mut addresses = Vec::new();
    for (n, (pod, app)) in pods.iter().enumerate() {
        let files = exec_sync(&mut cri, app, &["ls", "/data"]).await;
        assert_eq!(
            String::from_utf8_lossy(&files.stdout),
            format!("owner-{n}\n"),
            "pod {n} sees only its own directory"
        );
        let disk = exec_sync(&mut cri, app, &["head", "-c", "14", "/dev/xvdb"]).await;
        assert_eq!(
            String::from_utf8_lossy(&disk.stdout),
            format!("disk-of-pod-{n:02}"),
            "pod {n} reads its own disk"
        );
        let disks = exec_sync(&mut cri, app, &["sh", "-c", "ls /sys/block | grep vd"]).await;
        assert_eq!(
            String::from_utf8_lossy(&disks.stdout).lines().count(),
            1,
            "pod {n} has one disk"
        );
        // NICs are devices; lo and the kernel's tunnel stubs are not.
        let nics = "for nic in /sys/class/net/*; do [ -e $nic/device ] && basename $nic; done";
        let nics = exec_sync(&mut cri, app, &["sh", "-c", nics]).await;
        assert_eq!(
            String::from_utf8_lossy(&nics.stdout),
            "eth0\n",
            "pod {n} has one NIC"
        );
        let ip = pod_ip(&mut cri, pod).await;
        let own = exec_sync(&mut cri, app, &["ip", "-o", "-4", "addr", "show", "eth0"]).await;
        assert!(
            String::from_utf8_lossy(&own.stdout).contains(&format!(" {ip}/")),
            "pod {n}'s NIC has its CRI address {ip}"
        );
        addresses.push(ip);
    }
    addresses.sort();
    addresses.dedup();
    assert_eq!(addresses.len(), PODS, "every pod has an address of its own");

    let pod_ids: Vec<&str> = pods.iter().map(|(pod, _)| pod.as_str()).collect();
    remove_pods(&containerd, &mut cri, &pod_ids).await;
    Footprint::assert_back_to(&containerd, &baseline);
    drop(volumes);
    containerd.stop();
}

#[test]
fn ten_ctr_runs_at_once() {
    let _serial = leaks::exclusive();
    let Some(containerd) = Containerd::start() else {
        return;
    };
    containerd.import_busybox();
    let baseline = Footprint::take(&containerd);
    let outputs: Vec<_> = std::thread::scope(|scope| {
        let runs: Vec<_> = (0..PODS)
            .map(|n| {
                let containerd = &containerd;
                scope.spawn(move || {
                    let id = format!("runv-at-once-{n}");
                    let script = format!("echo {id} > /tmp/owner; ls /tmp; cat /tmp/owner");
                    let args = containerd.runv_run_args("--rm", &[], &id, &["sh", "-c", &script]);
                    containerd.ctr(&args)
                })
            })
            .collect();
        runs.into_iter().map(|run| run.join().unwrap()).collect()
    });
    for (n, output) in outputs.iter().enumerate() {
        assert!(output.status.success(), "ctr run {n} failed");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            format!("owner\nrunv-at-once-{n}\n"),
            "container {n} sees only its own files"
        );
    }
    containerd.assert_nothing_running();
    Footprint::assert_back_to(&containerd, &baseline);
    containerd.stop();
}

/// A container with a block volume (hot-plugged, then unplugged) created
/// and removed, twice, while other containers of the same pod are created,
/// used and removed: every step works, and the disk is gone at the end.
#[tokio::test(flavor = "multi_thread")]
async fn block_hot_plug_while_containers_churn() {
    let _serial = leaks::exclusive();
    if let Some(why) = disks::unavailable() {
        println!("SKIPPED: {why}");
        return;
    }
    let Some(containerd) = Containerd::start_with_cri() else {
        return;
    };
    let mut cri = CriClient::with_pod_images(&containerd).await;
    let volume = PodVolumes::new(containerd.dir(), 0);
    let baseline = Footprint::take(&containerd);
    let log_dir = containerd.dir().join("pod-logs");
    fs::create_dir_all(&log_dir).unwrap();
    let config = pod_config("churn", &log_dir);
    let pod = run_pod(&mut cri, &config).await;
    let keeper = start_app(&mut cri, &pod, &config, app_config("keeper")).await;

    let churn = {
        let mut cri = cri.clone();
        let (pod, config) = (pod.clone(), config.clone());
        async move {
            for round in 0..4 {
                let name = format!("churn-{round}");
                let id = start_app(&mut cri, &pod, &config, app_config(&name)).await;
                let hello = exec_sync(&mut cri, &id, &["echo", &name]).await;
                assert_eq!(String::from_utf8_lossy(&hello.stdout), format!("{name}\n"));
                remove_container(&mut cri, &id).await;
            }
        }
    };
    let plug = {
        let mut cri = cri.clone();
        let (pod, config) = (pod.clone(), config.clone());
        let disk_user = |round: usize| ContainerConfig {
            mounts: Vec::new(),
            ..volume.container(&format!("disk-{round}"))
        };
        async move {
            for round in 0..2 {
                let id = start_app(&mut cri, &pod, &config, disk_user(round)).await;
                let head = exec_sync(&mut cri, &id, &["head", "-c", "14", "/dev/xvdb"]).await;
                assert_eq!(String::from_utf8_lossy(&head.stdout), "disk-of-pod-00");
                remove_container(&mut cri, &id).await;
            }
        }
    };
    tokio::join!(churn, plug);
    let disks = exec_sync(&mut cri, &keeper, &["sh", "-c", "ls /sys/block | grep vd"]).await;
    assert_eq!(
        String::from_utf8_lossy(&disks.stdout),
        "",
        "the disk left the guest"
    );
    remove_pods(&containerd, &mut cri, &[&pod]).await;
    Footprint::assert_back_to(&containerd, &baseline);
    drop(volume);
    containerd.stop();
}

/// Runs the futures concurrently on the test's runtime; their outputs in
/// order.
async fn futures_join_all<T: Send + 'static>(
    futures: impl Iterator<Item = impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::new();
    for handle in handles {
        outputs.push(handle.await.expect("a concurrent task panicked"));
    }
    outputs
}
