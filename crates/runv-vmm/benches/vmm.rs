//! Figures of the builtin VMM that do not need a bootable guest kernel, so
//! they run on every KVM host, PVM included. Each VM is a whole `MicroVm`
//! as a pod gets it (guest RAM, the virtio-vsock device and its socket, 16
//! hot-plug slots, the event loop, a thread per vCPU), booted through the
//! PVH entry into a payload of our own:
//! - VM start to the guest's first output: from `MicroVm::start` until the
//!   payload's first byte reaches the serial console;
//! - the VMM's own memory per VM, with 1 and 20 idle (halted) VMs: the heap
//!   bytes the live VMs hold (malloc's own count, which freed memory being
//!   reused cannot hide) and the growth of the anonymous RSS (heap, thread
//!   stacks), shown apart from the guest RAM the boot touched (shared memfd
//!   pages, RssShmem).

use std::{
    io::Write,
    path::Path,
    sync::mpsc,
    time::{Duration, Instant},
};

use runv_vmm::{
    testing::{print, pvh_image, HALT},
    GuestRoot, MicroVm, MicroVmConfig, VsockConfig,
};

const GUEST_RAM: u64 = 128 << 20;
const VCPUS: u8 = 1;
const RUNS: usize = 50;

/// Tells the benchmark when the guest's first byte arrives.
struct FirstOutput(Option<mpsc::Sender<Instant>>);

impl Write for FirstOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(first) = self.0.take() {
            let _ = first.send(Instant::now());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts VM number `index` of the images in `dir` and waits for the
/// payload's first output; returns the VM and the time it took.
fn start_vm(dir: &Path, index: usize) -> (MicroVm, Duration) {
    let (first_tx, first) = mpsc::channel();
    let config = MicroVmConfig {
        name: format!("bench-{index}"),
        kernel: dir.join("payload.elf"),
        root: GuestRoot::Initramfs(dir.join("initramfs")),
        kernel_params: "console=ttyS0".into(),
        vcpus: VCPUS,
        memory_bytes: GUEST_RAM,
        console: Box::new(FirstOutput(Some(first_tx))),
        vsock: Some(VsockConfig {
            guest_cid: 3,
            uds_path: dir.join(format!("vsock-{index}.sock")),
        }),
        net_devices: Vec::new(),
        filesystems: Vec::new(),
        vfio_devices: Vec::new(),
        free_page_reporting: true,
        share_boot_files: true,
    };
    let started = Instant::now();
    let vm = MicroVm::start(config, Box::new(|_| {})).expect("the microVM starts");
    let first = first
        .recv_timeout(Duration::from_secs(10))
        .expect("the payload prints");
    (vm, first - started)
}

/// (anonymous, shared-memory) resident KiB of this process.
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/self/status"))
    };
    (field("RssAnon:"), field("RssShmem:"))
}

/// Bytes of heap in use, as glibc's malloc counts them.
fn heap_in_use() -> u64 {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd) as u64
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn main() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        println!("SKIPPED: no usable /dev/kvm: {e}");
        return;
    }
    let backend = if Path::new("/sys/module/kvm_pvm").exists() {
        "KVM (PVM backend)"
    } else {
        "KVM"
    };
    println!(
        "runv-vmm benchmarks on {backend}: MicroVm with {VCPUS} vCPU, {} MiB guest RAM, \
         virtio-vsock, 16 hot-plug slots",
        GUEST_RAM >> 20
    );
    let dir = tempfile::tempdir().expect("scratch directory");
    let payload = [print(b"up\n").as_slice(), &HALT].concat();
    std::fs::write(dir.path().join("payload.elf"), pvh_image(&payload)).expect("payload");
    std::fs::write(dir.path().join("initramfs"), b"unused").expect("initramfs");

    // Warm up the code paths and the kernel's KVM caches once.
    drop(start_vm(dir.path(), 0));
    let mut times: Vec<Duration> = (0..RUNS)
        .map(|run| {
            let (vm, elapsed) = start_vm(dir.path(), run);
            drop(vm);
            elapsed
        })
        .collect();
    times.sort();
    println!(
        "VM start to the guest's first output: median {:.3} ms, p95 {:.3} ms ({RUNS} runs)",
        percentile(&times, 50).as_secs_f64() * 1000.0,
        percentile(&times, 95).as_secs_f64() * 1000.0,
    );

    for count in [1usize, 20] {
        let (anon_before, shmem_before) = rss_kib();
        let heap_before = heap_in_use();
        let vms: Vec<MicroVm> = (0..count).map(|i| start_vm(dir.path(), i).0).collect();
        let heap_after = heap_in_use();
        let (anon_after, shmem_after) = rss_kib();
        let per_vm = |before: u64, after: u64| after.saturating_sub(before) as f64 / count as f64;
        println!(
            "VMM memory per idle VM with {count:>2} VMs: {:.0} KiB heap in use, {:.0} KiB \
             anonymous RSS growth; {:.0} KiB of guest RAM touched; goal < 3072 KiB own",
            per_vm(heap_before, heap_after) / 1024.0,
            per_vm(anon_before, anon_after),
            per_vm(shmem_before, shmem_after),
        );
        drop(vms);
    }
    println!(
        "(user-space memory only: KVM's in-kernel VM and vCPU state is not in the RSS; a vCPU \
         thread's stack counts only as far as it is touched)"
    );
}
