//! Soak: cycles of a CRI pod as a kubelet runs one (two containers, an
//! exec, a shared-directory volume over virtio-fs, a block volume
//! hot-plugged, CNI networking), each created, used, stopped and removed,
//! with the host's footprint (tests/support/leaks.rs) checked after every
//! cycle: any leak is printed at once, named, and fails the soak.
//!
//! `RUNV_SOAK_CYCLES` sets the number of cycles (CI: 20); `scripts/soak N`
//! runs it with N.

// A test holds the lock on host-wide footprints (leaks::exclusive) for
// its whole run, awaits included, so that the binary's tests run one at a
// time: blocking another test's thread on it is the point.
#![allow(clippy::await_holding_lock)]

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use k8s_cri::v1::Mount;
use runv_tests::{
    cni::pod_ip,
    containerd::Containerd,
    cri::{app_config, exec_sync, pod_config, remove_pods, run_pod, start_app, CriClient},
    disks::{self, ext4_image, LoopDevice},
    leaks::{self, Footprint},
};

/// containerd may keep a few more fds once it has served a pod (client
/// connections, its event streams); more than this over the soak is a leak.
const CONTAINERD_FD_SLACK: usize = 16;

#[tokio::test(flavor = "multi_thread")]
async fn pods_come_and_go_without_leaking() {
    let cycles: u32 = std::env::var("RUNV_SOAK_CYCLES")
        .map(|n| n.parse().expect("RUNV_SOAK_CYCLES is a number"))
        .unwrap_or(20);
    let _serial = leaks::exclusive();
    if let Some(why) = disks::unavailable() {
        println!("SKIPPED: the soak's pods have a block volume: {why}");
        return;
    }
    let Some(containerd) = Containerd::start_with_cri() else {
        return;
    };
    let mut cri = CriClient::with_pod_images(&containerd).await;
    let volumes = Volumes::new(containerd.dir());
    let mut baseline = Footprint::take(&containerd);
    let first = baseline.clone();
    let mut leaked = Vec::new();
    let started = Instant::now();
    for cycle in 1..=cycles {
        let cycle_started = Instant::now();
        run_cycle(&containerd, &mut cri, &volumes, cycle).await;
        let (now, leaks) = Footprint::settle(&containerd, &baseline, Duration::from_secs(30));
        let elapsed = started.elapsed();
        println!(
            "soak: cycle {cycle}/{cycles} in {:.1} s ({:.2} cycles/min), containerd {} fds, \
             RSS {} KiB",
            cycle_started.elapsed().as_secs_f64(),
            f64::from(cycle) * 60.0 / elapsed.as_secs_f64(),
            now.containerd_fds,
            now.containerd_rss_kib,
        );
        for leak in &leaks {
            println!("soak: LEAK after cycle {cycle}: {leak}");
        }
        leaked.extend(
            leaks
                .into_iter()
                .map(|leak| format!("cycle {cycle}: {leak}")),
        );
        // Each leak is reported once: the next cycle is compared with this.
        baseline = now;
    }
    let rate = f64::from(cycles) * 60.0 / started.elapsed().as_secs_f64();
    println!(
        "soak: {cycles} cycles in {:.0} s, {rate:.2} cycles/min, {} leaks; containerd fds \
         {} -> {}, RSS {} -> {} KiB ({:+} KiB)",
        started.elapsed().as_secs_f64(),
        leaked.len(),
        first.containerd_fds,
        baseline.containerd_fds,
        first.containerd_rss_kib,
        baseline.containerd_rss_kib,
        baseline.containerd_rss_kib as i64 - first.containerd_rss_kib as i64,
    );
    assert!(leaked.is_empty(), "leaks:\n  {}", leaked.join("\n  "));
    assert!(
        baseline.containerd_fds <= first.containerd_fds + CONTAINERD_FD_SLACK,
        "containerd's fds grew from {} to {} over {cycles} pods",
        first.containerd_fds,
        baseline.containerd_fds
    );
    containerd.stop();
}

/// What every cycle's pod mounts: a host directory (a virtio-fs share)
/// and a block device (an ext4 image on a loop device, hot-plugged).
struct Volumes {
    shared: std::path::PathBuf,
    disk: LoopDevice,
}

impl Volumes {
    fn new(dir: &Path) -> Volumes {
        let shared = dir.join("shared-volume");
        fs::create_dir_all(&shared).unwrap();
        let contents = dir.join("disk-contents");
        fs::create_dir_all(&contents).unwrap();
        fs::write(contents.join("hello"), "on the disk\n").unwrap();
        let image = dir.join("disk-volume.img");
        ext4_image(&image, 32, Some(&contents));
        Volumes {
            shared,
            disk: LoopDevice::attach(&image),
        }
    }
}

/// One pod's life: a web container with the shared directory, a disk
/// container with the block volume, both used through exec, the pod
/// reached over its CNI address, then stopped and removed.
async fn run_cycle(containerd: &Containerd, cri: &mut CriClient, volumes: &Volumes, cycle: u32) {
    let log_dir = containerd.dir().join("pod-logs");
    fs::create_dir_all(&log_dir).unwrap();
    let pod_config = pod_config(&format!("soak-{cycle}"), &log_dir);
    let pod_id = run_pod(cri, &pod_config).await;

    let mut web = app_config("web");
    web.mounts = vec![Mount {
        container_path: "/shared".into(),
        host_path: volumes.shared.to_string_lossy().into_owned(),
        ..Default::default()
    }];
    let web = start_app(cri, &pod_id, &pod_config, web).await;
    let mut disk = app_config("disk");
    disk.mounts = vec![Mount {
        container_path: "/vol".into(),
        host_path: volumes.disk.path_str().into(),
        ..Default::default()
    }];
    let disk = start_app(cri, &pod_id, &pod_config, disk).await;

    let note = format!("cycle {cycle}");
    let wrote = exec_sync(
        cri,
        &web,
        &["sh", "-c", &format!("echo '{note}' > /shared/note")],
    )
    .await;
    assert_eq!(wrote.exit_code, 0, "writing to the shared volume");
    assert_eq!(
        fs::read_to_string(volumes.shared.join("note")).unwrap(),
        format!("{note}\n"),
        "the host sees the pod's write"
    );
    let used = exec_sync(
        cri,
        &disk,
        &[
            "sh",
            "-c",
            &format!("cat /vol/hello && echo '{note}' > /vol/note && sync"),
        ],
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&used.stdout), "on the disk\n");
    assert_eq!(used.exit_code, 0, "writing to the block volume");

    let ip = pod_ip(cri, &pod_id).await;
    let ping = Command::new("ping")
        .args(["-c", "1", "-W", "10", &ip])
        .output()
        .expect("running ping");
    assert!(
        ping.status.success(),
        "the host reaches the pod at {ip}: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    remove_pods(containerd, cri, &[&pod_id]).await;
}

/// The footprint names each kind of leak it looks for: one of each is
/// made by hand (no pod), found, and once removed no longer found.
#[test]
fn footprint_names_each_kind_of_leak() {
    let _serial = leaks::exclusive();
    if let Some(why) = disks::unavailable() {
        println!("SKIPPED: the footprint's check of loop devices needs them: {why}");
        return;
    }
    let Some(containerd) = Containerd::start_with_cri() else {
        return;
    };
    let baseline = Footprint::take(&containerd);
    let dir = containerd.dir();
    let name = format!("rvleak{}", std::process::id() % 100_000);
    let run = |program: &str, args: &[&str]| {
        let status = Command::new(program).args(args).status().unwrap();
        assert!(status.success(), "{program} {args:?}");
    };
    let mut process = Command::new("sleep")
        .arg("600")
        .current_dir(dir)
        .spawn()
        .unwrap();
    let mount_point = dir.join("leaked-mount");
    fs::create_dir(&mount_point).unwrap();
    run(
        "mount",
        &["-t", "tmpfs", "leak", mount_point.to_str().unwrap()],
    );
    run("ip", &["link", "add", &name, "type", "bridge"]);
    run("tc", &["qdisc", "add", "dev", &name, "ingress"]);
    run("ip", &["netns", "add", &name]);
    let addresses = dir.join("cni-state/runv-test");
    fs::create_dir_all(&addresses).unwrap();
    fs::write(addresses.join("10.255.0.9"), "leaked").unwrap();
    let image = dir.join("leak.img");
    disks::raw_image(&image, 1, b"");
    let disk = LoopDevice::attach(&image);
    let cgroup = ["/sys/fs/cgroup/pids", "/sys/fs/cgroup"]
        .iter()
        .map(|root| Path::new(root).join(&name))
        .find(|cgroup| fs::create_dir(cgroup).is_ok())
        .expect("a cgroup of the test's own");
    fs::create_dir_all(dir.join("run/pods/leaked-pod")).unwrap();
    containerd.ctr_ok(&["snapshots", "prepare", "leaked-snapshot"]);

    let leaks = Footprint::take(&containerd).leaks_since(&baseline);
    println!("found:\n  {}", leaks.join("\n  "));
    for kind in [
        "process",
        "mount",
        "network interface",
        "tc qdisc or filter",
        "network namespace",
        "pod address",
        "loop device",
        "cgroup",
        "state file or socket",
        "container snapshot",
    ] {
        assert!(
            leaks
                .iter()
                .any(|leak| leak.starts_with(&format!("{kind}: "))),
            "no {kind} among {leaks:?}"
        );
    }

    process.kill().unwrap();
    process.wait().unwrap();
    run("umount", &[mount_point.to_str().unwrap()]);
    run("ip", &["link", "delete", &name]);
    run("ip", &["netns", "delete", &name]);
    fs::remove_file(addresses.join("10.255.0.9")).unwrap();
    drop(disk);
    fs::remove_dir(cgroup).unwrap();
    fs::remove_dir(dir.join("run/pods/leaked-pod")).unwrap();
    containerd.ctr_ok(&["snapshots", "rm", "leaked-snapshot"]);
    Footprint::assert_back_to(&containerd, &baseline);
    containerd.stop();
}
