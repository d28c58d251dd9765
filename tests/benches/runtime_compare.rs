//! runv side by side with runc through a real containerd: `cargo bench -p
//! runv-tests --bench runtime_compare`.
//!
//! 1. start latency: the wall time of `ctr run --rm busybox true`, runc and
//!    runv alternating, median and p95;
//! 2. CRI pod start: RunPodSandbox (with a CNI network) to the app container
//!    started, split into the CRI calls, with when the shim and the
//!    hypervisor process started (from /proc, 10 ms ticks);
//! 3. memory: the PSS of everything runv runs per idle pod (shim, QEMU,
//!    virtiofsd, vhost-device-vsock) with 1, 10 and 50 pods (fewer when
//!    MemAvailable could not hold them all), against runc's
//!    shim (and its containers' processes) with the same pods;
//! 4. density: the creation time of each successive pod (a pod that fails
//!    to start ends the series, with the reason: the measured most), and an
//!    estimate of how many idle pods fit, from the per-pod PSS and
//!    MemAvailable;
//! 5. a CPU-bound job (sha256sum of 64 MiB of zeros) timed inside a runv
//!    container and a runc container, as a ratio.
//!
//! Every figure is labelled with the hypervisor, the accelerator that ran
//! and the machine, and the report goes to `target/bench/runtime_compare.json`.
//! It prints figures and asserts none. Settings: RUNV_BENCH_START_RUNS
//! (default 10), RUNV_BENCH_PODS (pod counts for the memory figure, default
//! "1,10,50": the density series runs up to the largest), RUNV_BENCH_CPU_MIB
//! (default 64), RUNV_BENCH_CPU_RUNS (default 3; 0 skips the job) and
//! RUNV_BENCH_SETTLE_SECS (how long pods idle before their memory is
//! measured, default 20: free page reporting settles in that). Under TCG on 2 cores
//! the 50 pods take about 10 minutes: idle TCG guests still use host CPU.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use k8s_cri::v1::{
    CreateContainerRequest, PodSandboxConfig, RunPodSandboxRequest, StartContainerRequest,
};
use runv_config::HypervisorKind;
use runv_hypervisor::KvmSupport;
use runv_tests::{
    bench::{command_output, configured_hypervisor, cpu_model, qemu_accel, write_report},
    containerd::{Containerd, BUSYBOX_IMAGE},
    cri::{
        app_config, build_pause_image, pod_config, pod_processes, remove_pods, try_exec_sync,
        CriClient, SHIM, VIRTIOFSD,
    },
    env_or, pss_kib, smaps, test_config,
};
use serde_json::{json, Value};

/// Parts of the VMM process's PSS (QEMU's, or the shim's on builtin),
/// shown beside the programs.
const PART_PREFIX: &str = "VMM: ";
const GUEST_RAM: &str = "VMM: guest RAM touched";
const TCG_CODE: &str = "VMM: TCG translated code";
const GUEST_IMAGES: &str = "VMM: guest kernel, initramfs and root image files";

/// The qemu hypervisor's VM process, and the vsock backend runv runs
/// beside QEMU for a pod.
const HYPERVISOR: &str = "qemu-system-x86_64";
const VSOCK_DEVICE: &str = "vhost-device-vsock";
/// runc's shim, one per pod.
const RUNC_SHIM: &str = "containerd-shim-runc-v2";
/// What runv runs on the host for a pod on the qemu hypervisor.
const RUNV_PROGRAMS: [&str; 4] = [SHIM, HYPERVISOR, VSOCK_DEVICE, VIRTIOFSD];
/// MemAvailable kept free: the benchmark stops adding pods below it.
const RESERVE_MIB: u64 = 2048;
/// What a runv pod may hold beyond its guest RAM (QEMU, helpers, shim),
/// for the worst-case sizing before any pod is measured.
const POD_EXTRA_MIB: u64 = 128;

#[derive(Clone, Copy, PartialEq)]
enum Runtime {
    Runc,
    Runv,
}

impl Runtime {
    fn name(self) -> &'static str {
        match self {
            Runtime::Runc => "runc",
            Runtime::Runv => "runv",
        }
    }
}

#[tokio::main]
async fn main() {
    if Command::new("runc").arg("--version").output().is_err() {
        println!("runtime_compare: SKIPPED: runc not installed (apt-get install runc)");
        return;
    }
    let Some(containerd) = Containerd::start_with_cri() else {
        return;
    };
    let start_runs: usize = env_or("RUNV_BENCH_START_RUNS", 10);
    let cpu_mib: u32 = env_or("RUNV_BENCH_CPU_MIB", 64);
    let cpu_runs: usize = env_or("RUNV_BENCH_CPU_RUNS", 3);
    let mut pod_counts: Vec<usize> = std::env::var("RUNV_BENCH_PODS")
        .unwrap_or_else(|_| "1,10,50".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .filter(|&n| n > 0)
        .collect();
    pod_counts.sort_unstable();
    pod_counts.dedup();

    containerd.import_busybox();
    containerd.import_image(&build_pause_image(containerd.dir()));
    let scratch = tempfile::tempdir().unwrap();
    let config = test_config(scratch.path());
    let hypervisor = configured_hypervisor(&containerd.runv_config());
    let machine = machine();
    println!(
        "runtime_compare: runv ({hypervisor}, {} vCPUs, {} MiB per pod) against runc; {}",
        config.vm.vcpus,
        config.vm.memory_mib,
        machine["summary"].as_str().unwrap_or_default()
    );

    let (start, accel) = start_latency(&containerd, start_runs);
    let cpu = cpu_workload(&containerd, cpu_mib, cpu_runs);

    // How many runv pods this machine holds with room to spare, if each
    // touched all its guest RAM: the series stops there, and says so.
    let available = mem_available_mib();
    let per_pod_worst = u64::from(config.vm.memory_mib) + POD_EXTRA_MIB;
    let fit = (available.saturating_sub(RESERVE_MIB) / per_pod_worst) as usize;
    let wanted = pod_counts.last().copied().unwrap_or(1);
    let mut scaled_down = None;
    if wanted > fit {
        let why = format!(
            "{wanted} pods asked for, but MemAvailable is {available} MiB: keeping \
             {RESERVE_MIB} MiB free at {per_pod_worst} MiB a pod (guest RAM plus \
             {POD_EXTRA_MIB} MiB) allows {fit}"
        );
        println!("runtime_compare: scaling down: {why}");
        pod_counts.retain(|&n| n <= fit.max(1));
        if pod_counts.last() != Some(&fit.max(1)) {
            pod_counts.push(fit.max(1));
        }
        scaled_down = Some(why);
    }

    let mut cri = CriClient::connect(&containerd.dir().join("containerd.sock")).await;
    let runv_pods = pod_series(&containerd, &mut cri, Runtime::Runv, &pod_counts, &config).await;
    // runc to the same counts, so that the figures pair up.
    let runc_counts: Vec<usize> = runv_pods.memory.iter().map(|m| m.pods).collect();
    let runc_pods = pod_series(&containerd, &mut cri, Runtime::Runc, &runc_counts, &config).await;

    let date = command_output("date", &["-u", "+%F %H:%M UTC"]);
    let label = format!("{hypervisor} with {accel}");
    println!(
        "\nruntime_compare: runv = {label}, {} vCPUs, {} MiB; {}; {date}",
        config.vm.vcpus,
        config.vm.memory_mib,
        machine["summary"].as_str().unwrap_or_default()
    );
    println!("\n1. start latency, `ctr run --rm busybox true`, {start_runs} runs each (wall time)");
    for runtime in ["runc", "runv"] {
        let s = &start[runtime];
        println!(
            "  {runtime:<5} median {:>8.1} ms   p95 {:>8.1} ms   min {:>8.1} ms   max {:>8.1} ms",
            s["median_ms"].as_f64().unwrap_or_default(),
            s["p95_ms"].as_f64().unwrap_or_default(),
            s["min_ms"].as_f64().unwrap_or_default(),
            s["max_ms"].as_f64().unwrap_or_default(),
        );
    }

    println!("\n2. CRI pod start (CNI network): RunPodSandbox to the app container started");
    for series in [&runc_pods, &runv_pods] {
        print_pod_start(series);
    }

    println!("\n3. host memory per idle pod (PSS, /proc/<pid>/smaps_rollup)");
    println!(
        "  {:>5} {:>14} {:>14} {:>22} {:>10}",
        "pods", "runv MiB/pod", "runc shim", "runc shim+containers", "runv/runc"
    );
    for (runv, runc) in runv_pods.memory.iter().zip(&runc_pods.memory) {
        println!(
            "  {:>5} {:>14.1} {:>14.1} {:>22.1} {:>10.1}",
            runv.pods,
            runv.per_pod_mib,
            runc.shim_per_pod_mib,
            runc.per_pod_mib,
            runv.per_pod_mib / runc.shim_per_pod_mib.max(0.001)
        );
    }
    if let Some(last) = runv_pods.memory.last() {
        println!("  runv at {} pods, MiB a pod:", last.pods);
        for (program, mib) in &last.programs {
            let (indent, name) = match program.strip_prefix(PART_PREFIX) {
                Some(part) => ("      of which ", part),
                None => ("    ", program.as_str()),
            };
            println!("{indent}{name}: {:.1}", mib / last.pods as f64);
        }
    }

    println!(
        "\n4. density: creation time of pod k (RunPodSandbox + CreateContainer + StartContainer)"
    );
    println!("  {:>4} {:>12} {:>12}", "k", "runv ms", "runc ms");
    for (k, runv) in runv_pods.starts.iter().enumerate() {
        let runc = runc_pods.starts.get(k).map(|s| s.total_ms()).unwrap_or(0.0);
        println!("  {:>4} {:>12.1} {:>12.1}", k + 1, runv.total_ms(), runc);
    }
    let density = density_estimate(&runv_pods, &config, available);
    for series in [&runv_pods, &runc_pods] {
        match &series.stopped {
            Some(why) => println!(
                "  MEASURED: {} ran at most {} idle pods here: {why}",
                series.runtime.name(),
                series.starts.len()
            ),
            None => println!(
                "  {}: all {} pods started",
                series.runtime.name(),
                series.starts.len()
            ),
        }
    }
    println!(
        "  ESTIMATE (not measured): {}",
        density["summary"].as_str().unwrap_or_default()
    );
    if let Some(why) = &scaled_down {
        println!("  scaled down: {why}");
    }

    let ratio = cpu["ratio_runc_over_runv_time"]
        .as_f64()
        .unwrap_or_default();
    println!(
        "\n5. CPU-bound: sha256sum of {cpu_mib} MiB of zeros, timed inside the container, \
         median of {cpu_runs}"
    );
    if cpu_runs == 0 {
        println!("  skipped (RUNV_BENCH_CPU_RUNS=0)");
    } else {
        println!(
            "  runc {:.2} s, runv ({label}) {:.2} s: runv runs at {:.1} % of runc's throughput{}",
            cpu["runc_s"].as_f64().unwrap_or_default(),
            cpu["runv_s"].as_f64().unwrap_or_default(),
            ratio * 100.0,
            match accel.as_str() {
                "TCG" => " (TCG: software emulation, not the KVM figure the goal is about)",
                _ => "",
            }
        );
    }

    let report = json!({
        "date": date,
        "hypervisor": hypervisor,
        "accel": accel,
        "kvm": kvm_label(),
        "vcpus": config.vm.vcpus,
        "memory_mib": config.vm.memory_mib,
        "machine": machine,
        "start_latency": start,
        "pod_start": { "runv": runv_pods.start_json(), "runc": runc_pods.start_json() },
        "memory": memory_json(&runv_pods, &runc_pods),
        "density": density,
        "cpu": cpu,
        "scaled_down": scaled_down,
        "goals": {
            "pod_start_median_ms": 100,
            "overhead_mib_per_idle_pod": 10,
            "cpu_throughput_vs_runc": 0.98,
            "idle_pods_on_24_gib": 1000,
        },
    });
    let path = write_report("runtime_compare", &report);
    println!("\nwritten to {}", path.display());
    containerd.stop();
}

/// Median, p95, minimum and maximum of `values` in milliseconds.
fn stats(mut values: Vec<f64>) -> Value {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let i = ((values.len() as f64 - 1.0) * q).round() as usize;
        values.get(i).copied().unwrap_or_default()
    };
    json!({
        "runs": values.len(),
        "median_ms": at(0.5),
        "p95_ms": at(0.95),
        "min_ms": values.first().copied().unwrap_or_default(),
        "max_ms": values.last().copied().unwrap_or_default(),
        "all_ms": values,
    })
}

/// `ctr run --rm` of `true`, runc then runv, `runs` times (after one
/// unmeasured run of each); returns the figures and the accelerator of
/// runv's QEMU (read while a runv container runs).
fn start_latency(containerd: &Containerd, runs: usize) -> (Value, String) {
    println!("runtime_compare: start latency, {runs} runs each");
    let mut times: HashMap<&str, Vec<f64>> = HashMap::new();
    for run in 0..=runs {
        for runtime in [Runtime::Runc, Runtime::Runv] {
            let id = format!("start-{}-{run}", runtime.name());
            let args: Vec<&str> = match runtime {
                Runtime::Runc => vec!["run", "--rm", BUSYBOX_IMAGE, &id, "true"],
                Runtime::Runv => containerd.runv_run_args("--rm", &[], &id, &["true"]),
            };
            let started = Instant::now();
            let output = containerd.ctr_command(&args).output().expect("running ctr");
            let elapsed = started.elapsed();
            assert!(
                output.status.success(),
                "ctr {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            if run > 0 {
                times
                    .entry(runtime.name())
                    .or_default()
                    .push(elapsed.as_secs_f64() * 1000.0);
            }
        }
    }
    // The accelerator, from a runv container that stays up for a moment.
    containerd.ctr_ok(&containerd.runv_run_args("-d", &[], "accel-probe", &["sleep", "3600"]));
    let accel = qemu_accel(containerd);
    remove_task(containerd, "accel-probe");
    let figures = json!({
        "runc": stats(times.remove("runc").unwrap_or_default()),
        "runv": stats(times.remove("runv").unwrap_or_default()),
    });
    (figures, accel)
}

/// Kills and deletes a detached `ctr run` container.
fn remove_task(containerd: &Containerd, id: &str) {
    containerd.ctr_ok(&["task", "kill", "--signal", "SIGKILL", id]);
    containerd.wait_stopped(id);
    containerd.ctr_ok(&["task", "delete", id]);
    containerd.ctr_ok(&["container", "delete", id]);
}

/// sha256sum of `mib` MiB of zeros in a runc and a runv container, timed
/// with the container's /proc/uptime; the median of `runs` each.
fn cpu_workload(containerd: &Containerd, mib: u32, runs: usize) -> Value {
    if runs == 0 {
        println!("runtime_compare: CPU-bound job skipped (RUNV_BENCH_CPU_RUNS=0)");
        return json!({ "skipped": "RUNV_BENCH_CPU_RUNS=0" });
    }
    println!("runtime_compare: CPU-bound job, {runs} runs each");
    let script = format!(
        "a=$(cut -d' ' -f1 /proc/uptime); dd if=/dev/zero bs=1M count={mib} 2>/dev/null \
         | sha256sum >/dev/null; b=$(cut -d' ' -f1 /proc/uptime); echo $a $b"
    );
    let mut medians = HashMap::new();
    for runtime in [Runtime::Runc, Runtime::Runv] {
        let id = format!("cpu-{}", runtime.name());
        let args: Vec<&str> = match runtime {
            Runtime::Runc => vec!["run", "-d", BUSYBOX_IMAGE, &id, "sleep", "3600"],
            Runtime::Runv => containerd.runv_run_args("-d", &[], &id, &["sleep", "3600"]),
        };
        containerd.ctr_ok(&args);
        let mut times = Vec::new();
        for run in 0..runs {
            let exec_id = format!("job{run}");
            let out = containerd.ctr_ok(&[
                "task",
                "exec",
                "--exec-id",
                &exec_id,
                &id,
                "sh",
                "-c",
                &script,
            ]);
            let marks: Vec<f64> = out
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            assert_eq!(marks.len(), 2, "the job's timing: {out}");
            times.push(marks[1] - marks[0]);
        }
        remove_task(containerd, &id);
        times.sort_by(f64::total_cmp);
        println!("  {}: {times:?} s", runtime.name());
        medians.insert(runtime.name(), (times[times.len() / 2], times));
    }
    let (runc, runc_all) = medians.remove("runc").unwrap();
    let (runv, runv_all) = medians.remove("runv").unwrap();
    json!({
        "job": format!("dd if=/dev/zero bs=1M count={mib} | sha256sum"),
        "mib": mib,
        "runs": runs,
        "timer": "the container's /proc/uptime (10 ms)",
        "runc_s": runc,
        "runv_s": runv,
        "runc_all_s": runc_all,
        "runv_all_s": runv_all,
        "ratio_runc_over_runv_time": if runv > 0.0 { runc / runv } else { 0.0 },
    })
}

/// One pod's start, split up.
struct PodStart {
    run_pod_sandbox_ms: f64,
    create_container_ms: f64,
    start_container_ms: f64,
    /// From the RunPodSandbox call to the shim process starting.
    shim_started_ms: Option<f64>,
    /// From the RunPodSandbox call to the hypervisor process starting.
    hypervisor_started_ms: Option<f64>,
    /// The VM's boot milestones as the shim logs them (runv only).
    vm_boot: Vec<(String, f64)>,
}

impl PodStart {
    fn total_ms(&self) -> f64 {
        self.run_pod_sandbox_ms + self.create_container_ms + self.start_container_ms
    }
}

/// The host memory of the pods at one count.
struct Memory {
    pods: usize,
    /// Everything the runtime runs for the pods (runv: shim, QEMU and the
    /// helpers; runc: the shims and the containers' processes), per pod.
    per_pod_mib: f64,
    /// The shims alone, per pod.
    shim_per_pod_mib: f64,
    /// MiB in all per program.
    programs: Vec<(String, f64)>,
    mem_available_mib: u64,
    /// runv: the last pod's guest memory as its kernel counts it, MiB.
    guest: Vec<(&'static str, f64)>,
}

struct PodSeries {
    runtime: Runtime,
    starts: Vec<PodStart>,
    memory: Vec<Memory>,
    mem_available_before_mib: u64,
    /// Why the series ended before the largest count, if it did.
    stopped: Option<String>,
}

impl PodSeries {
    fn start_json(&self) -> Value {
        let pick = |f: fn(&PodStart) -> Option<f64>| {
            stats(self.starts.iter().filter_map(f).collect::<Vec<_>>())
        };
        // The first pod's start, with no other pod running, is the figure
        // for "pod start"; the series shows how it grows.
        let first = self.starts.first();
        json!({
            "first_pod": first.map(|s| json!({
                "total_ms": s.total_ms(),
                "run_pod_sandbox_ms": s.run_pod_sandbox_ms,
                "create_container_ms": s.create_container_ms,
                "start_container_ms": s.start_container_ms,
                "shim_started_ms": s.shim_started_ms,
                "hypervisor_started_ms": s.hypervisor_started_ms,
                "vm_boot_ms": s.vm_boot.iter().map(|(name, ms)| (name.clone(), json!(ms))).collect::<serde_json::Map<_, _>>(),
            })),
            "total": pick(|s| Some(s.total_ms())),
            "run_pod_sandbox": pick(|s| Some(s.run_pod_sandbox_ms)),
            "create_container": pick(|s| Some(s.create_container_ms)),
            "start_container": pick(|s| Some(s.start_container_ms)),
            "shim_started": pick(|s| s.shim_started_ms),
            "hypervisor_started": pick(|s| s.hypervisor_started_ms),
            "series_ms": self.starts.iter().map(PodStart::total_ms).collect::<Vec<_>>(),
            "pods_started": self.starts.len(),
            "stopped": self.stopped,
        })
    }
}

/// Starts pods of `runtime` one after the other up to the largest count,
/// measuring each start and, at each count, the host memory of the idle
/// pods; then removes them.
async fn pod_series(
    containerd: &Containerd,
    cri: &mut CriClient,
    runtime: Runtime,
    counts: &[usize],
    config: &runv_config::Config,
) -> PodSeries {
    let max = counts.last().copied().unwrap_or(1);
    println!("runtime_compare: {} pods, up to {max}", runtime.name());
    let mut series = PodSeries {
        runtime,
        starts: Vec::new(),
        memory: Vec::new(),
        mem_available_before_mib: mem_available_mib(),
        stopped: None,
    };
    let mut pod_ids = Vec::new();
    let shim = match runtime {
        Runtime::Runc => RUNC_SHIM,
        Runtime::Runv => SHIM,
    };
    for k in 1..=max {
        let name = format!("{}-pod-{k}", runtime.name());
        let log_dir = containerd.dir().join("pod-logs").join(&name);
        fs::create_dir_all(&log_dir).unwrap();
        let pod = pod_config(&name, &log_dir);
        let shims_before = pids_of(containerd, shim);
        let hypervisors_before = pids_of(containerd, HYPERVISOR);
        let (pod_id, app_id, start) = match start_pod(cri, runtime, &pod).await {
            Ok(started) => started,
            Err(e) if k > 1 => {
                // The most pods this machine ran: measure what did start.
                println!("  pod {k} did not start: {e}");
                series.stopped = Some(format!("pod {k} did not start: {e}"));
                break;
            }
            Err(e) => panic!("the first {} pod did not start: {e}", runtime.name()),
        };
        let started_after = |before: &BTreeSet<u32>, program: &str| {
            pids_of(containerd, program)
                .difference(before)
                .filter_map(|&pid| process_start_ms(pid))
                .reduce(f64::min)
                .map(|at| at - start.1)
        };
        let mut start = start.0;
        start.shim_started_ms = started_after(&shims_before, shim);
        if runtime == Runtime::Runv {
            start.hypervisor_started_ms = started_after(&hypervisors_before, HYPERVISOR);
            start.vm_boot = vm_boot_timeline(containerd, k);
        }
        println!(
            "  pod {k}: {:.1} ms (RunPodSandbox {:.1}, CreateContainer {:.1}, StartContainer {:.1})",
            start.total_ms(),
            start.run_pod_sandbox_ms,
            start.create_container_ms,
            start.start_container_ms
        );
        series.starts.push(start);
        pod_ids.push(pod_id);
        if counts.contains(&k) {
            // Let the pods settle into idling: the guests' free page
            // reports take about 20 s after a boot.
            tokio::time::sleep(settle()).await;
            let mut memory = measure_memory(containerd, runtime, k, config);
            if runtime == Runtime::Runv {
                memory.guest = guest_view(cri, &app_id).await;
                print_guest_view(k, &memory.guest);
            }
            println!(
                "  {k} idle pods: {:.1} MiB a pod (shims {:.1} MiB a pod)",
                memory.per_pod_mib, memory.shim_per_pod_mib
            );
            // Now, not only in the summary: a run that ends early (L1
            // crashes under load) keeps what it measured.
            for (program, mib) in &memory.programs {
                println!("    {program}: {:.1} MiB a pod", mib / k as f64);
            }
            series.memory.push(memory);
        }
    }
    let started = pod_ids.len();
    if series.memory.last().map(|m| m.pods) != Some(started) {
        tokio::time::sleep(settle()).await;
        series
            .memory
            .push(measure_memory(containerd, runtime, started, config));
    }
    let ids: Vec<&str> = pod_ids.iter().map(String::as_str).collect();
    remove_pods(containerd, cri, &ids).await;
    series
}

/// Runs a pod sandbox with `runtime`'s handler and an app container in it;
/// returns the pod's and the app's IDs, its timing, and when
/// (CLOCK_BOOTTIME, ms) the RunPodSandbox call began.
async fn start_pod(
    cri: &mut CriClient,
    runtime: Runtime,
    config: &PodSandboxConfig,
) -> Result<(String, String, (PodStart, f64)), String> {
    let called_at = boottime_ms();
    let started = Instant::now();
    let pod_id = cri
        .runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: runtime.name().into(),
        })
        .await
        .map_err(|e| failure("RunPodSandbox", &e))?
        .into_inner()
        .pod_sandbox_id;
    let sandbox = started.elapsed();
    let create_started = Instant::now();
    let id = cri
        .runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.clone(),
            config: Some(app_config("app")),
            sandbox_config: Some(config.clone()),
        })
        .await
        .map_err(|e| failure("CreateContainer", &e))?
        .into_inner()
        .container_id;
    let created = create_started.elapsed();
    let start_started = Instant::now();
    cri.runtime
        .start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .map_err(|e| failure("StartContainer", &e))?;
    let app_started = start_started.elapsed();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let start = PodStart {
        run_pod_sandbox_ms: ms(sandbox),
        create_container_ms: ms(created),
        start_container_ms: ms(app_started),
        shim_started_ms: None,
        hypervisor_started_ms: None,
        vm_boot: Vec::new(),
    };
    Ok((pod_id, id, (start, called_at)))
}

/// A failed CRI call in a line or two: its first line and, from a guest
/// that panicked, the kernel's panic line.
fn failure(call: &str, status: &tonic::Status) -> String {
    let message = status.message();
    let first = message.lines().next().unwrap_or_default();
    match message.lines().find(|line| line.contains("Kernel panic")) {
        Some(panic) => format!("{call}: {first} ... {panic}"),
        None => format!("{call}: {first}"),
    }
}

/// PIDs of this containerd's `program` processes.
fn pids_of(containerd: &Containerd, program: &str) -> BTreeSet<u32> {
    pod_processes(containerd, program)
        .iter()
        .filter_map(|line| line.split_once(':')?.0.parse().ok())
        .collect()
}

/// CLOCK_BOOTTIME in milliseconds: the clock of /proc/<pid>/stat's start
/// time.
fn boottime_ms() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    now.tv_sec as f64 * 1000.0 + now.tv_nsec as f64 / 1e6
}

/// When `pid` started, in CLOCK_BOOTTIME milliseconds (clock-tick
/// resolution, 10 ms).
fn process_start_ms(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    // Field 22, starttime; `rest` begins with field 3.
    let ticks: f64 = rest.split(' ').nth(19)?.parse().ok()?;
    // SAFETY: sysconf only reads a system setting.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks * 1000.0 / hz)
}

/// Where a VMM process's PSS (KiB) lies, by mapping.
#[derive(Default)]
struct VmmParts {
    /// The guest RAM the guest touched (smaps::guest_ram), the boot
    /// files the builtin VMM maps into it included.
    guest_ram: u64,
    /// TCG's translated code: anonymous mappings that are writable and
    /// executable (none under KVM).
    tcg_code: u64,
    /// The guest kernel and initramfs files QEMU mapped to load them, and
    /// the builtin VMM's root image (page cache every VM shares).
    guest_images: u64,
}

impl VmmParts {
    fn add(&mut self, pid: u32, guest_ram_kib: u64, images: &[&Path]) {
        let mappings = smaps::mappings(pid);
        let guest_ram = smaps::guest_ram(&mappings, guest_ram_kib);
        self.guest_ram += guest_ram.iter().map(|m| m.pss_kib).sum::<u64>();
        let in_guest_ram =
            |m: &smaps::Mapping| guest_ram.iter().any(|g| g.start_kib == m.start_kib);
        for mapping in mappings.iter().filter(|m| !in_guest_ram(m)) {
            if mapping.path.is_empty() && mapping.perms == "rwxp" {
                self.tcg_code += mapping.pss_kib;
            } else if images
                .iter()
                .any(|image| Path::new(&mapping.path) == *image)
            {
                self.guest_images += mapping.pss_kib;
            }
        }
    }
}

/// `pid` and every process below it.
fn with_descendants(pid: u32) -> Vec<u32> {
    let mut parents: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').nth(1)?.parse().ok());
        if let Some(ppid) = ppid {
            parents.entry(ppid).or_default().push(child);
        }
    }
    let mut all = vec![pid];
    let mut at = 0;
    while at < all.len() {
        all.extend(parents.get(&all[at]).into_iter().flatten());
        at += 1;
    }
    all
}

/// How long pods idle before their memory is measured:
/// RUNV_BENCH_SETTLE_SECS, default 20.
fn settle() -> Duration {
    Duration::from_secs(env_or("RUNV_BENCH_SETTLE_SECS", 20))
}

/// The host memory of `pods` idle pods of `runtime`.
fn measure_memory(
    containerd: &Containerd,
    runtime: Runtime,
    pods: usize,
    config: &runv_config::Config,
) -> Memory {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut programs = Vec::new();
    let (total, shims) = match runtime {
        Runtime::Runv => {
            let mut total = 0;
            let mut shims = 0;
            for program in RUNV_PROGRAMS {
                let pids = pids_of(containerd, program);
                let kib: u64 = pids.iter().map(|&pid| pss_kib(pid).unwrap_or(0)).sum();
                if program == SHIM {
                    shims = kib;
                }
                total += kib;
                programs.push((program.to_owned(), mib(kib)));
                // The builtin VMM runs in the shim; on qemu the shim holds
                // no guest memory and QEMU does.
                let vmm = match config.hypervisor {
                    HypervisorKind::Builtin => SHIM,
                    HypervisorKind::Qemu => HYPERVISOR,
                };
                if program == vmm {
                    let images: Vec<&Path> =
                        [config.vm.kernel.as_path(), config.vm.initramfs.as_path()]
                            .into_iter()
                            .chain(config.builtin.root_image.as_deref())
                            .collect();
                    let mut sums = VmmParts::default();
                    for &pid in &pids {
                        sums.add(pid, u64::from(config.vm.memory_mib) * 1024, &images);
                    }
                    programs.push((GUEST_RAM.to_owned(), mib(sums.guest_ram)));
                    programs.push((TCG_CODE.to_owned(), mib(sums.tcg_code)));
                    programs.push((GUEST_IMAGES.to_owned(), mib(sums.guest_images)));
                }
            }
            (total, shims)
        }
        Runtime::Runc => {
            let shim_pids = pids_of(containerd, RUNC_SHIM);
            let shims: u64 = shim_pids.iter().map(|&pid| pss_kib(pid).unwrap_or(0)).sum();
            let containers: u64 = shim_pids
                .iter()
                .flat_map(|&pid| with_descendants(pid).into_iter().skip(1))
                .filter_map(pss_kib)
                .sum();
            programs.push((RUNC_SHIM.to_owned(), mib(shims)));
            programs.push(("container processes".to_owned(), mib(containers)));
            (shims + containers, shims)
        }
    };
    Memory {
        pods,
        per_pod_mib: mib(total) / pods as f64,
        shim_per_pod_mib: mib(shims) / pods as f64,
        programs,
        mem_available_mib: mem_available_mib(),
        guest: Vec::new(),
    }
}

/// What the guest kernel of the pod whose app is `app_id` says its memory
/// holds (/proc/meminfo through ExecSync), MiB: where guest RAM touched
/// goes, seen from inside. Empty where the exec fails.
async fn guest_view(cri: &mut CriClient, app_id: &str) -> Vec<(&'static str, f64)> {
    let Ok(reply) = try_exec_sync(cri, app_id, &["cat", "/proc/meminfo"]).await else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&reply.stdout);
    let kib = |key: &str| -> Option<u64> {
        text.lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|value| value.split_whitespace().next()?.parse().ok())
    };
    let mib = |kib: u64| kib as f64 / 1024.0;
    let (Some(total), Some(free)) = (kib("MemTotal"), kib("MemFree")) else {
        return Vec::new();
    };
    let mut view = vec![(
        "in use (MemTotal - MemFree)",
        mib(total.saturating_sub(free)),
    )];
    for (label, key) in [
        ("slab, unreclaimable", "SUnreclaim"),
        ("slab, reclaimable", "SReclaimable"),
        ("kernel stacks", "KernelStack"),
        ("page tables", "PageTables"),
        ("per-CPU areas", "Percpu"),
        ("anonymous (processes)", "AnonPages"),
        ("page cache", "Cached"),
    ] {
        if let Some(value) = kib(key) {
            view.push((label, mib(value)));
        }
    }
    view
}

fn print_guest_view(pod: usize, view: &[(&str, f64)]) {
    if view.is_empty() {
        println!("    pod {pod}'s guest: /proc/meminfo not read");
        return;
    }
    let parts: Vec<String> = view[1..]
        .iter()
        .map(|(label, mib)| format!("{label} {mib:.1}"))
        .collect();
    println!(
        "    pod {pod}'s guest, by its own count: {} {:.1} MiB: {}",
        view[0].0,
        view[0].1,
        parts.join(", ")
    );
}

fn memory_json(runv: &PodSeries, runc: &PodSeries) -> Value {
    let part = |m: &Memory, name: &str| {
        m.programs
            .iter()
            .find(|(program, _)| program == name)
            .map(|(_, mib)| mib / m.pods as f64)
    };
    let rows = |series: &PodSeries| -> Vec<Value> {
        series
            .memory
            .iter()
            .map(|m| {
                json!({
                    "pods": m.pods,
                    "per_pod_mib": m.per_pod_mib,
                    "shim_per_pod_mib": m.shim_per_pod_mib,
                    "guest_ram_per_pod_mib": part(m, GUEST_RAM),
                    "tcg_code_per_pod_mib": part(m, TCG_CODE),
                    "guest_images_per_pod_mib": part(m, GUEST_IMAGES),
                    "programs_mib": m.programs.iter().cloned().collect::<HashMap<_, _>>(),
                    "last_guest_meminfo_mib": m.guest.iter().cloned().collect::<HashMap<_, _>>(),
                    "mem_available_mib": m.mem_available_mib,
                    "mem_available_drop_per_pod_mib":
                        series.mem_available_before_mib.saturating_sub(m.mem_available_mib) as f64
                            / m.pods as f64,
                })
            })
            .collect()
    };
    json!({
        "what": {
            "runv": format!("PSS of {}", RUNV_PROGRAMS.join(", ")),
            "runc": format!("PSS of {RUNC_SHIM}, and of it plus the pod's container processes \
                             (pause and app)"),
        },
        "runv": rows(runv),
        "runc": rows(runc),
    })
}

/// How many idle runv pods fit: from the largest count's per-pod PSS,
/// on this machine's MemAvailable and on a 24 GiB node; an estimate.
fn density_estimate(runv: &PodSeries, config: &runv_config::Config, available_mib: u64) -> Value {
    let Some(last) = runv.memory.last() else {
        return json!({ "summary": "no pods measured" });
    };
    let per_pod = last.per_pod_mib.max(0.001);
    let here = (available_mib as f64 / per_pod).floor() as u64;
    let node = (24.0 * 1024.0 / per_pod).floor() as u64;
    let worst = available_mib / (u64::from(config.vm.memory_mib) + last.per_pod_mib as u64);
    let summary = format!(
        "at {per_pod:.1} MiB PSS an idle pod (measured with {} pods), {here} idle runv pods \
         fit in this machine's {available_mib} MiB MemAvailable and {node} in 24 GiB \
         (if nothing else ran); if every guest touched all its {} MiB, {worst} would fit here",
        last.pods, config.vm.memory_mib
    );
    json!({
        "estimate": true,
        "most_pods_started": runv.starts.len(),
        "stopped": runv.stopped,
        "measured_pods": last.pods,
        "per_pod_mib": per_pod,
        "mem_available_mib": available_mib,
        "fit_here": here,
        "fit_24_gib": node,
        "fit_here_all_guest_ram_touched": worst,
        "summary": summary,
        "creation_ms": {
            "runv": runv.starts.iter().map(PodStart::total_ms).collect::<Vec<_>>(),
        },
        "runtime": runv.runtime.name(),
    })
}

/// The boot milestones of the `nth` runv pod VM (1-based), from the shim's
/// "pod VM boot timeline" line in containerd's log (`name_ms=value`
/// fields), which it writes shortly after the VM's agent answers.
fn vm_boot_timeline(containerd: &Containerd, nth: usize) -> Vec<(String, f64)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = fs::read_to_string(containerd.dir().join("containerd.log")).unwrap_or_default();
        if let Some(line) = log
            .lines()
            .filter(|line| line.contains("pod VM boot timeline"))
            .nth(nth - 1)
        {
            return line
                .split(|c: char| c.is_whitespace() || c == '"')
                .filter_map(|field| field.split_once('='))
                .filter_map(|(key, value)| Some((key.strip_suffix("_ms")?, value.parse().ok()?)))
                .map(|(key, value)| (key.replace('_', " "), value))
                .collect();
        }
        if Instant::now() > deadline {
            return Vec::new();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn print_pod_start(series: &PodSeries) {
    let Some(first) = series.starts.first() else {
        return;
    };
    let all: Vec<f64> = series.starts.iter().map(PodStart::total_ms).collect();
    let all = stats(all);
    let offset = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0} ms"));
    println!(
        "  {}: first pod {:.1} ms = RunPodSandbox {:.1} + CreateContainer {:.1} + \
         StartContainer {:.1}; shim started at {}, hypervisor at {} (/proc start times, \
         10 ms ticks); over {} pods median {:.1} ms, p95 {:.1} ms",
        series.runtime.name(),
        first.total_ms(),
        first.run_pod_sandbox_ms,
        first.create_container_ms,
        first.start_container_ms,
        offset(first.shim_started_ms),
        offset(first.hypervisor_started_ms),
        series.starts.len(),
        all["median_ms"].as_f64().unwrap_or_default(),
        all["p95_ms"].as_f64().unwrap_or_default(),
    );
    if !first.vm_boot.is_empty() {
        let milestones: Vec<String> = first
            .vm_boot
            .iter()
            .map(|(name, ms)| format!("{name} {ms:.1} ms"))
            .collect();
        println!(
            "    first pod's VM boot (shim log): {}",
            milestones.join(", ")
        );
    }
}

fn mem_available_mib() -> u64 {
    meminfo_kib("MemAvailable:") / 1024
}

fn meminfo_kib(key: &str) -> u64 {
    fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

/// What /dev/kvm is on this host, in words.
fn kvm_label() -> String {
    match KvmSupport::probe() {
        KvmSupport::Hardware { extension } => format!("KVM with {extension}"),
        KvmSupport::Pvm => "KVM, PVM backend (kvm_pvm): ordinary guests run under TCG".into(),
        KvmSupport::Unavailable(why) => format!("no KVM: {why}"),
    }
}

/// The machine: CPU, cores, memory, host kernel, KVM.
fn machine() -> Value {
    let cpu = cpu_model();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory_mib = meminfo_kib("MemTotal:") / 1024;
    let kernel = command_output("uname", &["-r"]);
    let kvm = kvm_label();
    // Other work on the machine shows in every figure: say how busy it was.
    let load = fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split(' ')
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    json!({
        "load_average_at_start": load,
        "cpu": cpu,
        "cores": cores,
        "memory_mib": memory_mib,
        "host_kernel": kernel,
        "kvm": kvm,
        "summary": format!(
            "{cpu}, {cores} cores, {:.1} GiB, host kernel {kernel}, {kvm}; load average \
             {load} at the start",
            memory_mib as f64 / 1024.0
        ),
    })
}
