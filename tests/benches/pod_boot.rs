//! Boot to agent-ready of a pod VM, on each hypervisor this host can run
//! the guest with: `cargo bench -p runv-tests --bench pod_boot`.
//!
//! Each run boots the real guest kernel and runv-agent, waits for the
//! agent's first answer, and powers the guest off. It prints the median and
//! the spread of every boot milestone, labelled with the hypervisor and
//! accelerator that ran. A hypervisor this host cannot run is listed with
//! the reason. RUNV_BENCH_RUNS sets the number of boots (default 5).

use std::time::Duration;

use runv_agent_client::ConnectOptions;
use runv_config::HypervisorKind;
use runv_hypervisor::{host::builtin_usable, KvmSupport};
use runv_sandbox::{BootTimeline, PodVm};
use runv_tests::test_config;

const DEFAULT_RUNS: usize = 5;

#[tokio::main]
async fn main() {
    let runs = std::env::var("RUNV_BENCH_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_RUNS);
    let kvm = KvmSupport::probe();
    println!("pod VM boot, {runs} runs each, 2 vCPUs, 256 MiB");
    for kind in [HypervisorKind::Builtin, HypervisorKind::Qemu] {
        if kind == HypervisorKind::Builtin {
            if let Err(why) = builtin_usable(&kvm, false) {
                println!("\n{kind}: not measured: {why}");
                continue;
            }
        }
        let mut timelines = Vec::with_capacity(runs);
        let mut accel = String::new();
        for run in 0..runs {
            let scratch = tempfile::tempdir().expect("scratch directory");
            let mut config = test_config(scratch.path());
            config.hypervisor = kind;
            let spec = PodVm::spec(
                &config,
                &format!("bench-{run}"),
                scratch.path().join("console.log"),
            );
            let connect = ConnectOptions::new(config.vm.agent_timeout());
            let vm = PodVm::boot(&config, spec, &connect)
                .await
                .unwrap_or_else(|e| panic!("{kind} boot {run} failed: {e}"));
            let details = vm.agent().guest_details().await.expect("guest details");
            accel = format!(
                "{} ({})",
                vm.start_info().accel,
                vm.start_info().accel_reason
            );
            timelines.push(vm.boot_timeline(&details));
            vm.shutdown().await;
        }
        println!("\n{kind} with {accel}:");
        print_milestones(&timelines);
    }
}

/// Reads one milestone of a boot, when that boot has it.
type Milestone = fn(&BootTimeline) -> Option<Duration>;

/// Median, minimum and maximum of each milestone over the runs.
fn print_milestones(timelines: &[BootTimeline]) {
    let milestones: [(&str, Milestone); 5] = [
        ("hypervisor spawn", |t| Some(t.hypervisor_spawn)),
        ("kernel start to init", |t| {
            t.guest.map(|g| g.kernel_to_init)
        }),
        ("init to agent ready", |t| {
            t.guest.map(|g| g.init_to_agent_ready)
        }),
        ("boot to agent answering", |t| Some(t.agent_ready)),
        ("first RPC round trip", |t| Some(t.first_rpc)),
    ];
    println!(
        "  {:<25} {:>10} {:>10} {:>10}",
        "milestone", "median ms", "min ms", "max ms"
    );
    for (name, milestone) in milestones {
        let mut values: Vec<f64> = timelines
            .iter()
            .filter_map(milestone)
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect();
        if values.is_empty() {
            continue;
        }
        values.sort_by(f64::total_cmp);
        println!(
            "  {name:<25} {:>10.1} {:>10.1} {:>10.1}",
            values[values.len() / 2],
            values[0],
            values[values.len() - 1]
        );
    }
}
