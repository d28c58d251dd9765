//! runv's builtin VMM against its peers on one KVM: `cargo bench -p
//! runv-tests --bench peers`. `scripts/bench peers` runs it in the
//! nested-KVM bed on hosts whose KVM cannot boot the guest; times there
//! are emulated, so only the ratios of one run and the memory compare.
//!
//! The peers boot the same guest kernel, initramfs and runv-agent with the
//! same vCPUs and memory (RUNV_BENCH_VCPUS, default 2;
//! RUNV_BENCH_MEMORY_MIB, default 128):
//! - runv builtin: `runv-ctl boot --hold --json`, the VMM inside that
//!   process (RUNV_CTL, default `<target>/release/runv-ctl`), as it ships
//!   (the agent on the root image, runv_tests::root_image) and then
//!   without its memory savings one by one (the initramfs instead, then
//!   free page reporting off, then the boot files copied rather than
//!   shared as well);
//! - runv qemu with KVM: the same with `hypervisor = "qemu"` and
//!   `accel = "kvm"` (QEMU microvm, as Kata runs by default, and
//!   vhost-device-vsock);
//! - Firecracker (RUNV_FIRECRACKER, which scripts/bench sets to what
//!   scripts/build-firecracker.sh builds): `--no-api --config-file` with a
//!   hybrid vsock, whose socket speaks the same CONNECT handshake as runv's.
//!
//! Each round (RUNV_BENCH_RUNS, default 5) boots every peer in turn and
//! measures:
//! - start to agent answering: from spawning the peer's process to the
//!   agent's answers to Check and GetGuestDetails, on the host's clock,
//!   with the guest's own split (kernel start to init, init to agent);
//! - after RUNV_BENCH_SETTLE_SECS idle (default 20: free page reporting
//!   takes about that long to settle after a boot): the PSS of every
//!   process the VM needs (the controlling runv-ctl of a QEMU VM is left
//!   out, as the benchmark itself is Firecracker's; the builtin VMM's
//!   process is that runv-ctl), the guest RAM the guest touched (RSS of
//!   the guest-memory mapping), the PSS of the root image's page cache
//!   (builtin as it ships) and the VMM's own share (PSS apart from both).
//!
//! It prints the medians with each line's ratio to the best peer and
//! writes target/bench/peers.json. A peer that cannot run here is listed
//! with the reason. It prints figures and asserts none.

use std::{
    fs,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use runv_agent_client::{AgentClient, ConnectOptions, ReadyListener};
use runv_config::HypervisorKind;
use runv_hypervisor::{
    host::{builtin_usable, choose_accel},
    KvmSupport, BASE_KERNEL_PARAMS,
};
use runv_sandbox::{GuestBootTimes, PodVm};
use runv_tests::{
    bench::{command_output, cpu_model, median, target_dir, write_report},
    env_or, guest_images, root_image, smaps,
};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// How long a boot may take before the run counts it failed: TCG-emulated
/// L1 is slow.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, PartialEq)]
enum Peer {
    /// With its memory savings, each on or off (`[builtin]` keys).
    Builtin(Savings),
    QemuKvm,
    Firecracker,
}

/// The builtin VMM's memory savings.
#[derive(Clone, Copy, PartialEq)]
struct Savings {
    /// Boots from the root image (virtio-pmem, DAX), not the initramfs.
    root_image: bool,
    free_page_reporting: bool,
    share_boot_files: bool,
}

/// runv's builtin VMM as it ships, then without its memory savings one by
/// one (what each is worth), then the peers.
const PEERS: [Peer; 6] = [
    Peer::Builtin(Savings {
        root_image: true,
        free_page_reporting: true,
        share_boot_files: true,
    }),
    Peer::Builtin(Savings {
        root_image: false,
        free_page_reporting: true,
        share_boot_files: true,
    }),
    Peer::Builtin(Savings {
        root_image: false,
        free_page_reporting: false,
        share_boot_files: true,
    }),
    Peer::Builtin(Savings {
        root_image: false,
        free_page_reporting: false,
        share_boot_files: false,
    }),
    Peer::QemuKvm,
    Peer::Firecracker,
];

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Builtin(Savings {
                root_image: true,
                free_page_reporting: true,
                share_boot_files: true,
            }) => "runv builtin",
            Peer::Builtin(Savings {
                root_image: false,
                free_page_reporting: true,
                share_boot_files: true,
            }) => "builtin initramfs",
            Peer::Builtin(Savings {
                root_image: false,
                free_page_reporting: false,
                share_boot_files: true,
            }) => "initramfs -reporting",
            Peer::Builtin(Savings {
                root_image: false,
                free_page_reporting: false,
                share_boot_files: false,
            }) => "initramfs -rep. -sharing",
            Peer::Builtin(_) => "builtin (other)",
            Peer::QemuKvm => "runv qemu (KVM)",
            Peer::Firecracker => "Firecracker",
        }
    }
}

/// What the run is: the VM's size and the programs.
struct Setup {
    vcpus: u32,
    memory_mib: u32,
    settle: Duration,
    runs: usize,
    runv_ctl: PathBuf,
    /// RUNV_FIRECRACKER: the Firecracker binary, if any.
    firecracker: Option<PathBuf>,
    kernel: PathBuf,
    initramfs: PathBuf,
    /// The builtin VMM's root image, as runv installs it.
    root_image: PathBuf,
    /// The kernel command line runv gives its guests.
    kernel_params: String,
}

/// One boot's figures.
#[derive(Clone, Default)]
struct Sample {
    start_to_agent_ms: f64,
    /// runv's own: the VMM set up and running (runv-ctl's hypervisor spawn).
    vmm_start_ms: Option<f64>,
    guest_kernel_to_init_ms: Option<f64>,
    guest_init_to_agent_ms: Option<f64>,
    pss_mib: f64,
    vmm_own_mib: f64,
    guest_ram_touched_mib: Option<f64>,
    /// The PSS of the root image's pages (page cache every VM shares).
    root_image_mib: Option<f64>,
}

/// What the rounds gave for one peer.
struct PeerRuns {
    peer: Peer,
    /// Why it cannot run here at all.
    unavailable: Option<String>,
    samples: Vec<Sample>,
    failures: Vec<String>,
}

impl PeerRuns {
    /// The medians of its boots, or why there are none.
    fn median(&self) -> Result<Sample, String> {
        if let Some(why) = &self.unavailable {
            return Err(why.clone());
        }
        if self.samples.is_empty() {
            return Err(self.failures.join("; "));
        }
        Ok(medians(&self.samples))
    }
}

/// A booted peer, released (powered off or killed) by `stop`.
struct Booted {
    child: Child,
    /// The processes the VM needs.
    pids: Vec<u32>,
    start_to_agent: Duration,
    vmm_start: Option<Duration>,
    guest: Option<GuestBootTimes>,
    _scratch: tempfile::TempDir,
}

impl Booted {
    async fn stop(mut self) {
        // runv-ctl powers its VM off when stdin closes; Firecracker (no
        // API socket) is killed.
        drop(self.child.stdin.take());
        if tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

#[tokio::main]
async fn main() {
    let (kernel, initramfs) = guest_images();
    let setup = Setup {
        vcpus: env_or("RUNV_BENCH_VCPUS", 2),
        memory_mib: env_or("RUNV_BENCH_MEMORY_MIB", 128),
        settle: Duration::from_secs(env_or("RUNV_BENCH_SETTLE_SECS", 20)),
        runs: env_or("RUNV_BENCH_RUNS", 5),
        runv_ctl: std::env::var_os("RUNV_CTL")
            .map(PathBuf::from)
            .unwrap_or_else(|| target_dir().join("release/runv-ctl")),
        firecracker: std::env::var_os("RUNV_FIRECRACKER").map(PathBuf::from),
        kernel,
        initramfs,
        root_image: root_image(),
        // What runv gives its guests at the log level the runv peers run
        // with (runv-ctl's configuration below).
        kernel_params: format!(
            "{BASE_KERNEL_PARAMS} {}",
            PodVm::kernel_params(&runv_config::Config::default())
        ),
    };
    let bed = std::env::var("RUNV_BENCH_BED").unwrap_or_else(|_| "this host's KVM".into());
    println!(
        "peers: {} vCPUs, {} MiB, {} rounds, idle {} s before memory; on {bed} ({})",
        setup.vcpus,
        setup.memory_mib,
        setup.runs,
        setup.settle.as_secs(),
        cpu_model()
    );

    let mut results: Vec<PeerRuns> = PEERS
        .iter()
        .map(|&peer| PeerRuns {
            peer,
            unavailable: unavailable(peer, &setup),
            samples: Vec::new(),
            failures: Vec::new(),
        })
        .collect();
    for round in 1..=setup.runs {
        for runs in results.iter_mut().filter(|r| r.unavailable.is_none()) {
            match measure(runs.peer, &setup).await {
                Ok(sample) => runs.samples.push(sample),
                // Noted; the next round boots it again.
                Err(e) => runs.failures.push(format!("round {round}: {e}")),
            }
        }
    }

    let medians: Vec<(Peer, Result<Sample, String>)> = results
        .iter()
        .map(|runs| (runs.peer, runs.median()))
        .collect();
    print_table(&medians);
    for runs in results.iter().filter(|r| !r.samples.is_empty()) {
        for failure in &runs.failures {
            println!("  {}: a boot failed: {failure}", runs.peer.name());
        }
    }
    let report = json!({
        "date": command_output("date", &["-u", "+%F %H:%M UTC"]),
        "bed": bed,
        "cpu": cpu_model(),
        "host_kernel": command_output("uname", &["-r"]),
        "vcpus": setup.vcpus,
        "memory_mib": setup.memory_mib,
        "runs": setup.runs,
        "settle_secs": setup.settle.as_secs(),
        "peers": results.iter().map(|runs| match runs.median() {
            Ok(median) => json!({
                "name": runs.peer.name(),
                "median": sample_json(&median),
                "samples": runs.samples.iter().map(sample_json).collect::<Vec<_>>(),
                "failures": runs.failures,
            }),
            Err(why) => json!({ "name": runs.peer.name(), "not_measured": why }),
        }).collect::<Vec<_>>(),
    });
    println!("\nreport: {}", write_report("peers", &report).display());
}

/// Why `peer` cannot run here, if it cannot.
fn unavailable(peer: Peer, setup: &Setup) -> Option<String> {
    let kvm = KvmSupport::probe();
    match peer {
        Peer::Builtin(_) => builtin_usable(&kvm, false).err(),
        Peer::QemuKvm => choose_accel(runv_config::AccelMode::Kvm, false, &kvm).err(),
        Peer::Firecracker => {
            builtin_usable(&kvm, false)
                .err()
                .or_else(|| match &setup.firecracker {
                    None => Some(
                        "RUNV_FIRECRACKER is not set: scripts/bench peers sets it to what \
                     scripts/build-firecracker.sh builds"
                            .into(),
                    ),
                    Some(path) => (!path.is_file())
                        .then(|| format!("RUNV_FIRECRACKER={} is not a file", path.display())),
                })
        }
    }
    .or_else(|| {
        (peer != Peer::Firecracker && !setup.runv_ctl.is_file()).then(|| {
            format!(
                "{} not found: cargo build --release -p runv-ctl, or set RUNV_CTL",
                setup.runv_ctl.display()
            )
        })
    })
}

/// Boots `peer`, lets it idle, measures it and stops it.
async fn measure(peer: Peer, setup: &Setup) -> Result<Sample, String> {
    let booted = match peer {
        Peer::Builtin(_) | Peer::QemuKvm => boot_runv(peer, setup).await?,
        Peer::Firecracker => boot_firecracker(setup).await?,
    };
    tokio::time::sleep(setup.settle).await;
    let guest_ram_kib = u64::from(setup.memory_mib) * 1024;
    let (mut pss, mut guest_pss, mut guest_rss) = (0, 0, None::<u64>);
    let root_image = setup.root_image.display().to_string();
    let mut image_pss = None::<u64>;
    for &pid in &booted.pids {
        let mappings = smaps::mappings(pid);
        pss += mappings.iter().map(|m| m.pss_kib).sum::<u64>();
        for image in mappings.iter().filter(|m| m.path == root_image) {
            image_pss = Some(image_pss.unwrap_or(0) + image.pss_kib);
        }
        let guest_ram = smaps::guest_ram(&mappings, guest_ram_kib);
        if !guest_ram.is_empty() {
            // A shared memfd is resident in each process that maps it:
            // what the guest touched is the most any of them holds.
            let rss = guest_ram.iter().map(|m| m.rss_kib).sum::<u64>();
            guest_rss = Some(guest_rss.unwrap_or(0).max(rss));
        }
        for ram in guest_ram {
            guest_pss += ram.pss_kib;
        }
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let sample = Sample {
        start_to_agent_ms: ms(booted.start_to_agent),
        vmm_start_ms: booted.vmm_start.map(ms),
        guest_kernel_to_init_ms: booted.guest.map(|g| ms(g.kernel_to_init)),
        guest_init_to_agent_ms: booted.guest.map(|g| ms(g.init_to_agent_ready)),
        pss_mib: mib(pss),
        vmm_own_mib: mib(pss - guest_pss - image_pss.unwrap_or(0)),
        guest_ram_touched_mib: guest_rss.map(mib),
        root_image_mib: image_pss.map(mib),
    };
    booted.stop().await;
    Ok(sample)
}

/// Boots a runv VM (`peer` is one of runv's) through `runv-ctl boot
/// --hold --json`.
async fn boot_runv(peer: Peer, setup: &Setup) -> Result<Booted, String> {
    let (hypervisor, builtin) = match peer {
        Peer::Builtin(savings) => (
            HypervisorKind::Builtin,
            format!(
                "[builtin]\nshare_boot_files = {}\nfree_page_reporting = {}\n{}",
                savings.share_boot_files,
                savings.free_page_reporting,
                if savings.root_image {
                    format!("root_image = \"{}\"\n", setup.root_image.display())
                } else {
                    String::new()
                }
            ),
        ),
        _ => (HypervisorKind::Qemu, String::new()),
    };
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    let config = scratch.path().join("runv.toml");
    fs::write(
        &config,
        format!(
            "hypervisor = \"{hypervisor}\"\nlog_level = \"info\"\nrun_dir = \"{}\"\n\
             {builtin}[qemu]\naccel = \"kvm\"\n[vm]\nkernel = \"{}\"\ninitramfs = \"{}\"\n\
             vcpus = {}\nmemory_mib = {}\nagent_timeout_secs = {}\n",
            scratch.path().join("run").display(),
            setup.kernel.display(),
            setup.initramfs.display(),
            setup.vcpus,
            setup.memory_mib,
            BOOT_TIMEOUT.as_secs(),
        ),
    )
    .map_err(|e| e.to_string())?;
    let stderr =
        fs::File::create(scratch.path().join("runv-ctl.log")).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut child = Command::new(&setup.runv_ctl)
        .arg("--config")
        .arg(&config)
        .args(["boot", "--hold", "--json", "--console-log"])
        .arg(scratch.path().join("console.log"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", setup.runv_ctl.display()))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let line = tokio::time::timeout(BOOT_TIMEOUT, BufReader::new(stdout).lines().next_line())
        .await
        .map_err(|_| "no report from runv-ctl in time".to_owned())?
        .map_err(|e| e.to_string())?;
    let start_to_agent = started.elapsed();
    let Some(line) = line else {
        let log = fs::read_to_string(scratch.path().join("runv-ctl.log")).unwrap_or_default();
        return Err(format!("runv-ctl boot failed: {}", log.trim()));
    };
    let report: Value = serde_json::from_str(&line).map_err(|e| format!("{e}: {line}"))?;
    let processes: Vec<u32> = report["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_u64()?.try_into().ok())
        .collect();
    // The builtin VMM is runv-ctl itself; QEMU's VM is the processes
    // runv-ctl started, without runv-ctl.
    let pids = match hypervisor {
        HypervisorKind::Builtin => processes[..1].to_vec(),
        HypervisorKind::Qemu => processes[1..].to_vec(),
    };
    let report_ms = |key: &str| {
        report[key]
            .as_f64()
            .map(|ms| Duration::from_secs_f64(ms / 1000.0))
    };
    let vmm_start = report_ms("hypervisor_spawn_ms");
    let guest = report_ms("guest_kernel_to_init_ms")
        .zip(report_ms("guest_init_to_agent_ready_ms"))
        .map(|(kernel_to_init, init_to_agent_ready)| GuestBootTimes {
            kernel_to_init,
            init_to_agent_ready,
        });
    Ok(Booted {
        child,
        pids,
        start_to_agent,
        vmm_start,
        guest,
        _scratch: scratch,
    })
}

/// Boots Firecracker from a config file and waits for the agent to answer
/// through its hybrid vsock.
async fn boot_firecracker(setup: &Setup) -> Result<Booted, String> {
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    let vsock = scratch.path().join("vsock.sock");
    let config = scratch.path().join("firecracker.json");
    let vm = json!({
        "boot-source": {
            "kernel_image_path": setup.kernel,
            "initrd_path": setup.initramfs,
            "boot_args": setup.kernel_params,
        },
        "drives": [],
        "machine-config": { "vcpu_count": setup.vcpus, "mem_size_mib": setup.memory_mib },
        "vsock": { "guest_cid": 3, "uds_path": vsock },
    });
    fs::write(&config, vm.to_string()).map_err(|e| e.to_string())?;
    let console_path = scratch.path().join("console.log");
    let console = fs::File::create(&console_path).map_err(|e| e.to_string())?;
    let firecracker = setup
        .firecracker
        .as_deref()
        .ok_or("RUNV_FIRECRACKER is not set")?;
    let ready = ReadyListener::bind(&vsock).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut child = Command::new(firecracker)
        .arg("--no-api")
        .arg("--config-file")
        .arg(&config)
        .args(["--level", "Warning"])
        .stdin(Stdio::piped())
        .stdout(console.try_clone().map_err(|e| e.to_string())?)
        .stderr(console)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", firecracker.display()))?;
    let options = ConnectOptions::new(BOOT_TIMEOUT);
    let answered = async {
        let (agent, _) = AgentClient::connect(&vsock, ready, &options).await?;
        agent.guest_details().await
    };
    let details = tokio::select! {
        details = answered => details.map_err(|e| e.to_string()),
        exit = child.wait() => Err(format!("Firecracker exited ({exit:?}) during boot")),
    };
    let start_to_agent = started.elapsed();
    let details = details.map_err(|e| {
        let log = fs::read_to_string(&console_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(10).collect();
        format!(
            "{e}; console tail: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )
    })?;
    let pid = child.id().ok_or("Firecracker exited after boot")?;
    Ok(Booted {
        child,
        pids: vec![pid],
        start_to_agent,
        vmm_start: None,
        guest: details.boot_times.as_ref().cloned().map(Into::into),
        _scratch: scratch,
    })
}

fn medians(samples: &[Sample]) -> Sample {
    let of = |f: fn(&Sample) -> Option<f64>| median(samples.iter().filter_map(f).collect());
    Sample {
        start_to_agent_ms: of(|s| Some(s.start_to_agent_ms)).unwrap_or(f64::NAN),
        vmm_start_ms: of(|s| s.vmm_start_ms),
        guest_kernel_to_init_ms: of(|s| s.guest_kernel_to_init_ms),
        guest_init_to_agent_ms: of(|s| s.guest_init_to_agent_ms),
        pss_mib: of(|s| Some(s.pss_mib)).unwrap_or(f64::NAN),
        vmm_own_mib: of(|s| Some(s.vmm_own_mib)).unwrap_or(f64::NAN),
        guest_ram_touched_mib: of(|s| s.guest_ram_touched_mib),
        root_image_mib: of(|s| s.root_image_mib),
    }
}

fn sample_json(sample: &Sample) -> Value {
    json!({
        "start_to_agent_ms": sample.start_to_agent_ms,
        "vmm_start_ms": sample.vmm_start_ms,
        "guest_kernel_to_init_ms": sample.guest_kernel_to_init_ms,
        "guest_init_to_agent_ms": sample.guest_init_to_agent_ms,
        "pss_mib": sample.pss_mib,
        "vmm_own_mib": sample.vmm_own_mib,
        "guest_ram_touched_mib": sample.guest_ram_touched_mib,
        "root_image_mib": sample.root_image_mib,
    })
}

/// The medians, one column a peer, each figure with its ratio to the
/// best (lowest) of its line.
fn print_table(medians: &[(Peer, Result<Sample, String>)]) {
    type Line = (&'static str, fn(&Sample) -> Option<f64>);
    let lines: [Line; 7] = [
        ("start to agent answering, ms", |s| {
            Some(s.start_to_agent_ms)
        }),
        ("  guest: kernel start to init, ms", |s| {
            s.guest_kernel_to_init_ms
        }),
        ("  guest: init to agent, ms", |s| s.guest_init_to_agent_ms),
        ("idle PSS of the VM, MiB", |s| Some(s.pss_mib)),
        ("  VMM's own (PSS apart from guest RAM)", |s| {
            Some(s.vmm_own_mib)
        }),
        ("  guest RAM touched (RSS), MiB", |s| {
            s.guest_ram_touched_mib
        }),
        ("  root image (PSS of its page cache)", |s| s.root_image_mib),
    ];
    println!("\nmedians (ratio to the best peer of the line)");
    print!("  {:<40}", "");
    for (peer, _) in medians {
        print!(" {:>22}", peer.name());
    }
    println!();
    for (label, value) in lines {
        let values: Vec<Option<f64>> = medians
            .iter()
            .map(|(_, m)| m.as_ref().ok().and_then(value))
            .collect();
        let best = values
            .iter()
            .flatten()
            .copied()
            .fold(f64::INFINITY, f64::min);
        print!("  {label:<40}");
        for v in &values {
            match v {
                Some(v) => print!(" {:>14.1} ({:>4.2}x)", v, v / best),
                None => print!(" {:>22}", "-"),
            }
        }
        println!();
    }
    for (peer, median) in medians {
        if let Err(why) = median {
            println!("  {}: not measured: {why}", peer.name());
        }
    }
}
