//! What the SMP and hot-plug KVM tests share: vCPUs started in real mode
//! on their own threads.

use std::{
    sync::{mpsc, Arc},
    time::{Duration, Instant},
};

use runv_vmm::{vcpu::VcpuHandle, Vcpu, VcpuStop, Vm};

/// How long a test waits for the guest before it gives up.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How a vCPU's run ended, as its thread reports it.
pub type Ended = mpsc::Receiver<(u64, Result<VcpuStop, String>)>;

/// Runs each of `vcpus` on its own thread; every run's end comes on the
/// returned channel.
pub fn spawn_all(vm: &Arc<Vm>, vcpus: Vec<Vcpu>) -> (Vec<VcpuHandle>, Ended) {
    let (ended, ends) = mpsc::channel();
    let handles = vcpus
        .into_iter()
        .map(|vcpu| {
            let (vm, ended) = (vm.clone(), ended.clone());
            let name = format!("test-vcpu{}", vcpu.id());
            VcpuHandle::spawn(name, vcpu, move |vcpu| {
                let stop = vcpu.run(&vm).map_err(|e| e.to_string());
                let _ = ended.send((vcpu.id(), stop));
            })
            .unwrap()
        })
        .collect();
    (handles, ends)
}

/// The ends of `count` runs in vCPU order, or None when they do not all
/// come within `timeout`.
pub fn collect_ends(
    ends: &Ended,
    count: usize,
    timeout: Duration,
) -> Option<Vec<Result<VcpuStop, String>>> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        got.push(ends.recv_timeout(left).ok()?);
    }
    got.sort_by_key(|(id, _)| *id);
    Some(got.into_iter().map(|(_, stop)| stop).collect())
}

/// Kicks and joins every vCPU thread, so that no test leaves one behind.
pub fn stop_all(handles: Vec<VcpuHandle>) {
    for handle in &handles {
        handle.kick();
    }
    for handle in handles {
        handle.join();
    }
}
