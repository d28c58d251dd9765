//! Storage I/O of a pod VM against the host: `cargo bench -p runv-tests
//! --bench storage_io`.
//!
//! fio runs in a runv container (an image of busybox plus the host's fio
//! and the libraries it links) on an ext4 image on a loop device, plugged
//! into the VM as virtio-blk at /blk, and on a host directory shared with
//! virtio-fs at /fs. Once the pod is gone, the same fio jobs run on the
//! host against the same file system, mounted on the host, and the same
//! directory. It prints host and guest IOPS and bandwidth side by side with
//! their ratio, labelled with the hypervisor and accelerator that ran, and
//! writes them to `target/bench/storage_io.json`. It prints figures and
//! asserts none. Needs root, containerd, fio and loop devices; without them
//! it says why and measures nothing. RUNV_BENCH_FIO_RUNTIME sets the
//! seconds of each timed job (default 5).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use runv_tests::{
    bench::{
        command_output, configured_hypervisor, program_with_libraries, qemu_accel, write_report,
        ReportLabels,
    },
    containerd::{build_busybox_image_with_files, Containerd},
    disks::{self, ext4_image, LoopDevice},
    test_config,
};
use serde_json::{json, Value};

const IMAGE: &str = "docker.io/runv/fio:bench";
const FIO: &str = "/usr/bin/fio";
const CONTAINER: &str = "storage-io";
/// The ext4 image behind /blk.
const DISK_MIB: u32 = 512;
/// The file every data job reads and writes, laid out before it is timed.
const FILE_SIZE: &str = "128M";
const DEFAULT_RUNTIME_S: u32 = 5;
/// Files the metadata jobs create, stat and delete.
const META_FILES: u32 = 2000;

/// A timed fio job on one 128 MiB file.
struct DataJob {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
}

const DATA_JOBS: [DataJob; 4] = [
    DataJob {
        name: "randread 4k",
        rw: "randread",
        bs: "4k",
        iodepth: 16,
    },
    DataJob {
        name: "randwrite 4k",
        rw: "randwrite",
        bs: "4k",
        iodepth: 16,
    },
    DataJob {
        name: "read 1M",
        rw: "read",
        bs: "1M",
        iodepth: 4,
    },
    DataJob {
        name: "write 1M",
        rw: "write",
        bs: "1M",
        iodepth: 4,
    },
];

/// fio's file engines, in order: they create, stat and delete the same
/// META_FILES files of 4 KiB.
const META_JOBS: [(&str, &str); 3] = [
    ("create 4k files", "filecreate"),
    ("stat files", "filestat"),
    ("delete files", "filedelete"),
];

#[derive(Clone, Copy, PartialEq)]
enum Target {
    Blk,
    Fs,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Blk => "virtio-blk",
            Target::Fs => "virtio-fs",
        }
    }
}

/// What one fio run measured.
#[derive(Clone, Copy)]
struct Figures {
    iops: f64,
    mib_s: f64,
}

/// One line of the table: the guest's figures, then the host's.
struct Row {
    job: &'static str,
    target: Target,
    guest: Figures,
    host: Option<Figures>,
}

/// How fio runs the data jobs on each target.
struct Modes {
    /// O_DIRECT on the virtio-fs share (else buffered with a final fsync).
    fs_direct: bool,
}

fn main() {
    if let Some(why) = skip_reason() {
        println!("storage_io: SKIPPED: {why}");
        return;
    }
    let Some(containerd) = Containerd::start() else {
        return;
    };
    let runtime_s = std::env::var("RUNV_BENCH_FIO_RUNTIME")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_RUNTIME_S);
    // On the host disk that holds the temporary directory: the disk image
    // and the shared directory sit on the same host file system.
    let scratch = tempfile::Builder::new()
        .prefix("runv-storage-io")
        .tempdir()
        .unwrap();
    let share = scratch.path().join("share");
    // The metadata jobs' directory, which fio does not make.
    fs::create_dir_all(share.join("meta")).unwrap();
    let image = scratch.path().join("blk.img");
    // An existing file, so that mkfs does not announce creating it.
    fs::File::create(&image).unwrap();
    ext4_image(&image, DISK_MIB, None);
    let disk = LoopDevice::attach(&image);

    containerd.import_image(&build_busybox_image_with_files(
        containerd.dir(),
        IMAGE,
        &[],
        &["sh"],
        &program_with_libraries(Path::new(FIO)),
    ));
    let blk_mount = format!("type=ext4,src={},dst=/blk,options=rw", disk.path_str());
    let fs_mount = format!("type=bind,src={},dst=/fs,options=rbind:rw", share.display());
    containerd.ctr_ok(&containerd.runv_run_image_args(
        "-d",
        &["--mount", &blk_mount, "--mount", &fs_mount],
        IMAGE,
        CONTAINER,
        &["sleep", "3600"],
    ));

    let accel = qemu_accel(&containerd);
    let guest_kernel = guest(&containerd, "uname", &["uname", "-r"])
        .expect("uname in the guest")
        .trim()
        .to_owned();
    println!("storage_io: measuring in the guest ({runtime_s} s a job)");
    let mut exec = 0;
    let mut in_guest = |args: &[String]| {
        exec += 1;
        let mut full = vec![FIO.to_owned()];
        full.extend_from_slice(args);
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        guest(&containerd, &format!("fio{exec}"), &full)
    };
    let mut modes = Modes { fs_direct: true };
    let mut rows = Vec::new();
    for target in [Target::Blk, Target::Fs] {
        let dir = match target {
            Target::Blk => "/blk",
            Target::Fs => "/fs",
        };
        for job in &DATA_JOBS {
            let mut output = in_guest(&data_args(job, dir, target, &modes, runtime_s));
            if output.is_none() && target == Target::Fs && modes.fs_direct {
                println!("storage_io: O_DIRECT refused on virtio-fs; buffered with end_fsync");
                modes.fs_direct = false;
                output = in_guest(&data_args(job, dir, target, &modes, runtime_s));
            }
            let output = output.unwrap_or_else(|| panic!("fio {} on {dir} failed", job.name));
            rows.push(Row {
                job: job.name,
                target,
                guest: figures(&output),
                host: None,
            });
        }
    }
    for (name, engine) in META_JOBS {
        let output = in_guest(&meta_args(engine, "/fs/meta"))
            .unwrap_or_else(|| panic!("fio {engine} on /fs failed"));
        rows.push(Row {
            job: name,
            target: Target::Fs,
            guest: figures(&output),
            host: None,
        });
    }
    containerd.ctr_ok(&["task", "kill", "--signal", "SIGKILL", CONTAINER]);
    containerd.wait_stopped(CONTAINER);
    containerd.ctr_ok(&["task", "delete", CONTAINER]);
    containerd.ctr_ok(&["container", "delete", CONTAINER]);
    containerd.assert_nothing_running();

    // The host, on the same file system (now mounted here and nowhere
    // else) and the same directory.
    println!("storage_io: measuring on the host");
    let mnt = scratch.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    {
        let _mounted = Mounted::new(disk.path(), &mnt);
        let mnt = mnt.to_str().unwrap();
        let share = share.to_str().unwrap();
        let mut at = 0;
        for target in [Target::Blk, Target::Fs] {
            let dir = match target {
                Target::Blk => mnt,
                Target::Fs => share,
            };
            for job in &DATA_JOBS {
                let output = on_host(&data_args(job, dir, target, &modes, runtime_s));
                rows[at].host = Some(figures(&output));
                at += 1;
            }
        }
        for (_, engine) in META_JOBS {
            let output = on_host(&meta_args(engine, &format!("{share}/meta")));
            rows[at].host = Some(figures(&output));
            at += 1;
        }
    }
    drop(disk);

    let config = test_config(scratch.path());
    let hypervisor = configured_hypervisor(&containerd.runv_config());
    let labels = ReportLabels::read(hypervisor, accel, &config.vm, guest_kernel);
    let fio_version = command_output(FIO, &["--version"]);
    let ReportLabels {
        hypervisor,
        accel,
        host_kernel,
        guest_kernel,
        cpu,
        date,
        ..
    } = &labels;
    println!(
        "\nstorage I/O, {hypervisor} with {accel}, {} vCPUs, {} MiB; host kernel {host_kernel}, \
         guest kernel {guest_kernel}; CPU {cpu}; {fio_version}, libaio, {runtime_s} s a job, \
         {FILE_SIZE} file; virtio-blk and host: O_DIRECT; virtio-fs and its host directory: {}; \
         metadata: {META_FILES} files; {date}",
        config.vm.vcpus,
        config.vm.memory_mib,
        match modes.fs_direct {
            // virtiofsd without --allow-direct-io opens the host's files
            // without O_DIRECT: the guest's reads can hit the host's cache.
            true => "O_DIRECT (virtiofsd drops it on the host side)",
            false => "buffered + end_fsync (the guest refused O_DIRECT)",
        },
    );
    print_table(&rows);

    let results: Vec<Value> = rows
        .iter()
        .map(|row| {
            let host = row.host.expect("host figures");
            json!({
                "job": row.job,
                "target": row.target.name(),
                "host": { "iops": host.iops, "mib_s": host.mib_s },
                "guest": { "iops": row.guest.iops, "mib_s": row.guest.mib_s },
                "ratio": ratio(row.guest.iops, host.iops),
            })
        })
        .collect();
    let report = labels.report(json!({
        "fio": fio_version,
        "ioengine": "libaio",
        "runtime_s": runtime_s,
        "file_size": FILE_SIZE,
        "metadata_files": META_FILES,
        "virtio_fs_direct": modes.fs_direct,
        "results": results,
    }));
    let path = write_report("storage_io", &report);
    println!("\nwritten to {}", path.display());
    containerd.stop();
}

/// Why this host cannot run the benchmark, if it cannot.
fn skip_reason() -> Option<String> {
    if let Some(why) = disks::unavailable() {
        return Some(why);
    }
    if Command::new(FIO).arg("--version").output().is_err() {
        return Some(format!("{FIO} not found (apt-get install fio)"));
    }
    None
}

/// fio's arguments for a data job on `dir/fio.dat`.
fn data_args(
    job: &DataJob,
    dir: &str,
    target: Target,
    modes: &Modes,
    runtime_s: u32,
) -> Vec<String> {
    let direct = target == Target::Blk || modes.fs_direct;
    let mut args = vec![
        "--output-format=json".to_owned(),
        "--thread".to_owned(),
        format!("--name={}", job.rw),
        format!("--filename={dir}/fio.dat"),
        format!("--size={FILE_SIZE}"),
        format!("--rw={}", job.rw),
        format!("--bs={}", job.bs),
        "--ioengine=libaio".to_owned(),
        format!("--iodepth={}", job.iodepth),
        format!("--direct={}", u8::from(direct)),
        format!("--runtime={runtime_s}"),
        "--time_based".to_owned(),
    ];
    if !direct {
        args.push("--end_fsync=1".to_owned());
    }
    args
}

/// fio's arguments for a file engine over META_FILES files in `dir`.
fn meta_args(engine: &str, dir: &str) -> Vec<String> {
    vec![
        "--output-format=json".to_owned(),
        "--thread".to_owned(),
        "--name=meta".to_owned(),
        format!("--directory={dir}"),
        format!("--ioengine={engine}"),
        format!("--nrfiles={META_FILES}"),
        "--filesize=4k".to_owned(),
        "--openfiles=1".to_owned(),
        "--filename_format=meta.$filenum".to_owned(),
    ]
}

/// IOPS and MiB/s of fio's JSON report (reads and writes together).
fn figures(output: &str) -> Figures {
    let start = output.find('{').expect("fio's JSON report");
    let report: Value = serde_json::from_str(&output[start..]).expect("fio's JSON report");
    let job = &report["jobs"][0];
    let sum = |key: &str| {
        ["read", "write"]
            .iter()
            .filter_map(|dir| job[dir][key].as_f64())
            .sum::<f64>()
    };
    Figures {
        iops: sum("iops"),
        // fio's bw is in KiB/s.
        mib_s: sum("bw") / 1024.0,
    }
}

/// Runs `args` in the benchmark's container; its stdout, or None if it
/// failed (what it printed goes to stderr).
fn guest(containerd: &Containerd, exec_id: &str, args: &[&str]) -> Option<String> {
    let mut full = vec!["task", "exec", "--exec-id", exec_id, CONTAINER];
    full.extend_from_slice(args);
    let output = containerd.ctr_command(&full).output().expect("running ctr");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        return Some(stdout);
    }
    eprintln!(
        "in the guest: {}: {}\n{stdout}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    None
}

fn on_host(args: &[String]) -> String {
    let output = Command::new(FIO).args(args).output().expect("running fio");
    assert!(
        output.status.success(),
        "fio {args:?} on the host failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn ratio(guest: f64, host: f64) -> f64 {
    match host > 0.0 {
        true => guest / host,
        false => 0.0,
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "  {:<16} {:<10} {:>11} {:>11} {:>11} {:>11} {:>10}",
        "job", "target", "host IOPS", "guest IOPS", "host MiB/s", "guest MiB/s", "guest/host"
    );
    for row in rows {
        let host = row.host.expect("host figures");
        let is_meta = row.job.contains("files");
        let mib = |f: Figures| match is_meta {
            true => "-".to_owned(),
            false => format!("{:.1}", f.mib_s),
        };
        println!(
            "  {:<16} {:<10} {:>11.0} {:>11.0} {:>11} {:>11} {:>10.3}",
            row.job,
            row.target.name(),
            host.iops,
            row.guest.iops,
            mib(host),
            mib(row.guest),
            ratio(row.guest.iops, host.iops)
        );
    }
}

/// A file system mounted on the host, unmounted when dropped.
struct Mounted(PathBuf);

impl Mounted {
    fn new(device: &Path, at: &Path) -> Mounted {
        let status = Command::new("mount")
            .arg(device)
            .arg(at)
            .status()
            .expect("running mount");
        assert!(status.success(), "mount {} failed", device.display());
        Mounted(at.to_owned())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}
