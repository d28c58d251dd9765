//! Network throughput and latency of a runv pod against a runc pod on the
//! same CNI bridge: `cargo bench -p runv-tests --bench network_io`.
//!
//! One containerd with the CRI plugin and the CNI bridge plugin on a
//! bridge and /24 of the benchmark's own runs two pods, one with the
//! runtime handler `runc` and one with `runv`, each serving `iperf3 -s`
//! (an image of busybox plus the host's iperf3 and the libraries it
//! links). From the host, each pod in turn gets `iperf3 -c` in both
//! directions and `ping`; the rounds alternate between the pods and the
//! medians are printed side by side with the ratio runv/runc, labelled
//! with the hypervisor and accelerator (KVM or TCG) that ran, and written
//! to `target/bench/network_io.json`. It prints figures and asserts none.
//! Needs root, containerd, the CNI bridge plugin, iperf3 and /dev/net/tun;
//! without them it says why and measures nothing. RUNV_BENCH_NET_ROUNDS
//! sets the rounds (default 2), RUNV_BENCH_IPERF_TIME the seconds of each
//! iperf3 run (default 5).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ImageSpec, PodSandboxConfig, RunPodSandboxRequest,
};
use runv_tests::{
    bench::{
        command_output, configured_hypervisor, median, program_with_libraries, qemu_accel,
        write_report, ReportLabels,
    },
    cni::{self, pod_ip, wait_network_ready},
    containerd::{build_busybox_image_with_files, Containerd},
    cri::{build_pause_image, exec_sync, pod_config, remove_pods, start_app, CriClient},
    test_config,
};
use serde_json::{json, Value};

const IMAGE: &str = "docker.io/runv/iperf3:bench";
const IPERF3: &str = "/usr/bin/iperf3";
const DEFAULT_ROUNDS: usize = 2;
const DEFAULT_IPERF_TIME_S: u32 = 5;
const PING_COUNT: usize = 20;
const PING_INTERVAL: &str = "0.2";
/// How long a pod's iperf3 server may take to answer at first (a TCG
/// guest is slow).
const SERVER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long it may take to listen again after a test (it reopens its
/// listening socket, slowly under TCG).
const RELISTEN_TIMEOUT: Duration = Duration::from_secs(30);

/// The two runtimes, in the order each round measures them.
const RUNTIMES: [&str; 2] = ["runc", "runv"];

/// One pod serving iperf3, and what each round measured on it.
struct Pod {
    runtime: &'static str,
    ip: String,
    container: String,
    rounds: Vec<Round>,
}

/// What one round measured on one pod.
struct Round {
    /// TCP from the host to the pod (`iperf3 -c`), bits/s.
    to_pod: f64,
    /// TCP from the pod to the host (`iperf3 -c -R`), bits/s.
    from_pod: f64,
    ping: Ping,
}

/// Round-trip times of one `ping` run, in ms.
#[derive(Clone, Copy)]
struct Ping {
    min: f64,
    avg: f64,
    p50: f64,
    p90: f64,
    max: f64,
}

/// A line of the table: how to get the figure from a round, and its unit.
struct Metric {
    name: &'static str,
    key: &'static str,
    unit: &'static str,
    scale: f64,
    figure: fn(&Round) -> f64,
}

const METRICS: [Metric; 7] = [
    Metric {
        name: "TCP host -> pod",
        key: "tcp_to_pod_bits_s",
        unit: "Gbit/s",
        scale: 1e-9,
        figure: |r| r.to_pod,
    },
    Metric {
        name: "TCP pod -> host",
        key: "tcp_from_pod_bits_s",
        unit: "Gbit/s",
        scale: 1e-9,
        figure: |r| r.from_pod,
    },
    Metric {
        name: "ping rtt min",
        key: "rtt_min_ms",
        unit: "ms",
        scale: 1.0,
        figure: |r| r.ping.min,
    },
    Metric {
        name: "ping rtt avg",
        key: "rtt_avg_ms",
        unit: "ms",
        scale: 1.0,
        figure: |r| r.ping.avg,
    },
    Metric {
        name: "ping rtt p50",
        key: "rtt_p50_ms",
        unit: "ms",
        scale: 1.0,
        figure: |r| r.ping.p50,
    },
    Metric {
        name: "ping rtt p90",
        key: "rtt_p90_ms",
        unit: "ms",
        scale: 1.0,
        figure: |r| r.ping.p90,
    },
    Metric {
        name: "ping rtt max",
        key: "rtt_max_ms",
        unit: "ms",
        scale: 1.0,
        figure: |r| r.ping.max,
    },
];

#[tokio::main]
async fn main() {
    if let Some(why) = skip_reason() {
        println!("network_io: SKIPPED: {why}");
        return;
    }
    let Some(containerd) = Containerd::start_with_cri() else {
        return;
    };
    let rounds = env_number("RUNV_BENCH_NET_ROUNDS", DEFAULT_ROUNDS).max(1);
    let iperf_time_s = env_number("RUNV_BENCH_IPERF_TIME", DEFAULT_IPERF_TIME_S).max(1);
    containerd.import_image(&build_pause_image(containerd.dir()));
    containerd.import_image(&build_busybox_image_with_files(
        containerd.dir(),
        IMAGE,
        &[],
        &["sh"],
        &program_with_libraries(Path::new(IPERF3)),
    ));
    let mut cri = CriClient::connect(&containerd.dir().join("containerd.sock")).await;
    wait_network_ready(&mut cri).await;

    // The pods live in a task of their own, so that a failure while they
    // run still removes them (a runc pod's processes outlive containerd).
    let created = Arc::new(Mutex::new(Vec::new()));
    let measured = tokio::spawn(measure(
        CriClient::connect(&containerd.dir().join("containerd.sock")).await,
        containerd.dir().join("pod-logs"),
        containerd.network().bridge.clone(),
        created.clone(),
        rounds,
        iperf_time_s,
    ))
    .await;
    // Read while the runv pod's QEMU still runs.
    let accel = qemu_accel(&containerd);
    let ids = created.lock().unwrap().clone();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    remove_pods(&containerd, &mut cri, &ids).await;
    let (pods, guest_kernel) = match measured {
        Ok(measured) => measured,
        Err(failed) => {
            containerd.stop();
            std::panic::resume_unwind(failed.into_panic());
        }
    };
    let hypervisor = configured_hypervisor(&containerd.runv_config());
    let bridge = containerd.network().bridge.clone();
    containerd.stop();
    let bridge_left = Command::new("ip")
        .args(["link", "show", &bridge])
        .output()
        .is_ok_and(|out| out.status.success());
    if bridge_left {
        eprintln!("network_io: bridge {bridge} is still there");
    }

    let config = test_config(Path::new("/nonexistent"));
    let labels = ReportLabels::read(hypervisor, accel, &config.vm, guest_kernel);
    let iperf3_version = command_output(IPERF3, &["--version"]);
    let iperf3_version = iperf3_version.lines().next().unwrap_or_default();
    let ReportLabels {
        hypervisor,
        accel,
        guest_kernel,
        host_kernel,
        cpu,
        date,
        ..
    } = &labels;
    println!(
        "\nnetwork: a runc pod and a runv pod on one CNI bridge, measured from the host\n  \
         hypervisor {hypervisor}, accel {accel}, {} vCPUs, {} MiB, guest kernel \
         {guest_kernel}\n  host kernel {host_kernel}, CPU {cpu}, {date}\n  \
         {iperf3_version}, TCP, {iperf_time_s} s each way; ping {PING_COUNT} x \
         {PING_INTERVAL} s; medians of {rounds} alternating rounds",
        config.vm.vcpus, config.vm.memory_mib,
    );
    let (runc, runv) = (&pods[0], &pods[1]);
    println!(
        "  {:<18} {:>7} {:>10} {:>10} {:>10}",
        "metric", "unit", "runc", "runv", "runv/runc"
    );
    let mut results = serde_json::Map::new();
    for metric in &METRICS {
        let runc_figure = median(runc.rounds.iter().map(metric.figure).collect()).unwrap_or(0.0);
        let runv_figure = median(runv.rounds.iter().map(metric.figure).collect()).unwrap_or(0.0);
        let ratio = ratio(runv_figure, runc_figure);
        println!(
            "  {:<18} {:>7} {:>10.3} {:>10.3} {:>10.3}",
            metric.name,
            metric.unit,
            runc_figure * metric.scale,
            runv_figure * metric.scale,
            ratio
        );
        results.insert(
            metric.key.into(),
            json!({ "runc": runc_figure, "runv": runv_figure, "ratio": ratio }),
        );
    }
    println!(
        "  goals on a KVM host: throughput runv/runc >= 0.85, latency runv/runc <= 1.2 \
         (measured here with {accel})"
    );

    let rounds_json = |pod: &Pod| -> Vec<Value> {
        pod.rounds
            .iter()
            .map(|r| {
                json!({
                    "tcp_to_pod_bits_s": r.to_pod,
                    "tcp_from_pod_bits_s": r.from_pod,
                    "rtt_ms": {
                        "min": r.ping.min, "avg": r.ping.avg, "p50": r.ping.p50,
                        "p90": r.ping.p90, "max": r.ping.max,
                    },
                })
            })
            .collect()
    };
    let report = labels.report(json!({
        "iperf3": iperf3_version,
        "iperf3_time_s": iperf_time_s,
        "ping_count": PING_COUNT,
        "ping_interval_s": PING_INTERVAL,
        "rounds": rounds,
        "medians": results,
        "samples": { "runc": rounds_json(runc), "runv": rounds_json(runv) },
        "bridge_left": bridge_left,
    }));
    let path = write_report("network_io", &report);
    println!("\nwritten to {}", path.display());
}

/// Runs the runc pod and the runv pod, each serving iperf3, and measures
/// them in alternating rounds; returns them with their figures and the
/// runv guest's kernel release. Each pod's ID goes to `created` as soon as
/// it exists.
async fn measure(
    mut cri: CriClient,
    log_root: PathBuf,
    bridge: String,
    created: Arc<Mutex<Vec<String>>>,
    rounds: usize,
    iperf_time_s: u32,
) -> (Vec<Pod>, String) {
    let mut pods = Vec::new();
    for runtime in RUNTIMES {
        let name = format!("{runtime}-iperf3");
        let log_dir = log_root.join(&name);
        fs::create_dir_all(&log_dir).unwrap();
        let config = pod_config(&name, &log_dir);
        let id = run_pod(&mut cri, &config, runtime).await;
        created.lock().unwrap().push(id.clone());
        let ip = pod_ip(&mut cri, &id).await;
        let container = start_app(&mut cri, &id, &config, iperf3_server()).await;
        println!("network_io: {runtime} pod {ip} on bridge {bridge}");
        pods.push(Pod {
            runtime,
            ip,
            container,
            rounds: Vec::new(),
        });
    }
    let guest_kernel = {
        let uname = exec_sync(&mut cri, &pods[1].container, &["uname", "-r"]).await;
        String::from_utf8_lossy(&uname.stdout).trim().to_owned()
    };
    // The first (short) run waits for the server and warms both ends up.
    for pod in &pods {
        iperf3_client(&pod.ip, 1, false, SERVER_TIMEOUT);
    }

    println!(
        "network_io: {rounds} rounds, iperf3 {iperf_time_s} s each way, \
         ping {PING_COUNT} x {PING_INTERVAL} s"
    );
    for round in 1..=rounds {
        for pod in &mut pods {
            let measured = Round {
                to_pod: iperf3_client(&pod.ip, iperf_time_s, false, RELISTEN_TIMEOUT),
                from_pod: iperf3_client(&pod.ip, iperf_time_s, true, RELISTEN_TIMEOUT),
                ping: ping(&pod.ip),
            };
            println!(
                "  round {round} {}: host -> pod {:.3} Gbit/s, pod -> host {:.3} Gbit/s, \
                 rtt avg {:.3} ms",
                pod.runtime,
                measured.to_pod * 1e-9,
                measured.from_pod * 1e-9,
                measured.ping.avg
            );
            pod.rounds.push(measured);
        }
    }
    (pods, guest_kernel)
}

/// Why this host cannot run the benchmark, if it cannot.
fn skip_reason() -> Option<String> {
    if let Some(why) = cni::unavailable() {
        return Some(why);
    }
    if Command::new(IPERF3).arg("--version").output().is_err() {
        return Some(format!("{IPERF3} not found (apt-get install iperf3)"));
    }
    if Command::new("ping").arg("-V").output().is_err() {
        return Some("ping not found (apt-get install iputils-ping)".into());
    }
    None
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// Runs a pod sandbox with the runtime handler `handler`; returns its ID.
async fn run_pod(cri: &mut CriClient, config: &PodSandboxConfig, handler: &str) -> String {
    cri.runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox with {handler}: {e}"))
        .into_inner()
        .pod_sandbox_id
}

/// The pod's container: `iperf3 -s` on its default port.
fn iperf3_server() -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "iperf3".into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: vec![IPERF3.into(), "-s".into()],
        log_path: "iperf3.log".into(),
        ..Default::default()
    }
}

/// `iperf3 -c ip` for `seconds` (from the pod with `reverse`); the bits/s
/// the receiver got. Retried for `patience` while it fails (the server may
/// still be starting).
fn iperf3_client(ip: &str, seconds: u32, reverse: bool, patience: Duration) -> f64 {
    let deadline = Instant::now() + patience;
    loop {
        let mut command = Command::new(IPERF3);
        command.args(["-c", ip, "-t", &seconds.to_string(), "-J"]);
        if reverse {
            command.arg("-R");
        }
        let output = command.output().expect("running iperf3");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let report: Value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        let received = report["end"]["sum_received"]["bits_per_second"].as_f64();
        match received {
            Some(bits) if output.status.success() => return bits,
            _ if Instant::now() < deadline => {
                let error = report["error"].as_str().unwrap_or("no report");
                eprintln!("network_io: iperf3 -c {ip}: {error}; again");
                std::thread::sleep(Duration::from_millis(500));
            }
            _ => panic!(
                "iperf3 -c {ip}{}: {}: {}{}",
                if reverse { " -R" } else { "" },
                output.status,
                report["error"].as_str().unwrap_or(&stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        }
    }
}

/// `ping` of `ip` from the host: the per-reply times give the percentiles,
/// the summary line (`rtt min/avg/max/mdev = ...`) the rest.
fn ping(ip: &str) -> Ping {
    let output = Command::new("ping")
        .args(["-n", "-c", &PING_COUNT.to_string(), "-i", PING_INTERVAL, ip])
        .output()
        .expect("running ping");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "ping {ip}: {stdout}");
    let mut times: Vec<f64> = stdout
        .lines()
        .filter_map(|line| line.split("time=").nth(1))
        .filter_map(|time| time.split_whitespace().next()?.parse().ok())
        .collect();
    times.sort_by(f64::total_cmp);
    let summary: Vec<f64> = stdout
        .lines()
        .find(|line| line.starts_with("rtt ") || line.starts_with("round-trip"))
        .and_then(|line| line.split(" = ").nth(1))
        .map(|values| {
            values
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .split('/')
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        summary.len() >= 3 && !times.is_empty(),
        "ping's output: {stdout}"
    );
    let percentile = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    Ping {
        min: summary[0],
        avg: summary[1],
        p50: percentile(0.5),
        p90: percentile(0.9),
        max: summary[2],
    }
}

fn ratio(runv: f64, runc: f64) -> f64 {
    match runc > 0.0 {
        true => runv / runc,
        false => 0.0,
    }
}
