//! The `qemu` backend: `qemu-system-x86_64 -M microvm`, with the guest's
//! vsock served by `vhost-device-vsock` over vhost-user. That helper gives
//! the host the same hybrid vsock Unix socket as the builtin VMM, so the
//! agent client cannot tell the two apart. A VM that shares a directory
//! with its guest also gets `virtiofsd`, the virtio-fs backend.
//!
//! microvm cannot hot-plug devices, so block devices go into slots made at
//! boot: a virtio-blk device on each spare virtio-mmio transport, backed by
//! an empty node that QMP swaps for the host's file or device and back
//! (docs/hotplug.md).
//!
//! Each network interface is a virtio-net device on a tap that QEMU
//! inherits (`-netdev tap,fd=N`); NICs take the top transports, which the
//! read-only block slots otherwise hold (docs/networking.md).
//!
//! No PCI function can be passed through: microvm has no PCI bus.
//!
//! QEMU and vhost-device-vsock run under a uid of the VM's own, without
//! capabilities and under seccomp (see [`Confinement`]; QEMU also with its
//! own `-sandbox`). QEMU opens nothing by path: runv opens the kernel,
//! initramfs, console and QMP socket, connects to the backends, and
//! passes the fds; a hot-plugged block device is opened by runv too and
//! passed over QMP (`add-fd`). vhost-device-vsock writes only its sockets,
//! in the VM's helper directory, which its uid owns. virtiofsd stays root
//! (it serves every uid's files) with fewer capabilities
//! ([`vhost_user::virtiofsd_args`]).

use std::{
    fs::File,
    ops::RangeInclusive,
    os::{
        fd::{AsFd, AsRawFd, RawFd},
        unix::{
            fs::MetadataExt,
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use nix::{sys::signal, unistd::Pid};
use runv_config::QemuConfig;
use runv_protocol::SHARED_FS_TAG;
use serde_json::{json, Value};
use tokio::{
    process::Child,
    sync::{mpsc, watch, Mutex},
    task::JoinHandle,
};

use crate::{
    check_boot_files,
    confine::Confinement,
    ensure_running,
    host::{choose_accel, Accel, KvmSupport},
    process::{find_executable, spawn_logged, tail, Spawn, LOG_TAIL_LINES},
    qmp::Qmp,
    run_dir::RunDir,
    vhost_user::{self, Backend},
    BlockDevice, BlockKind, ExitWatch, Hypervisor, HypervisorError, StartInfo, VmExit, VmSpec,
    BASE_KERNEL_PARAMS,
};

/// The guest's vsock context id; any value above 2 works, as each VM has
/// its own vsock device.
const GUEST_CID: u32 = 3;
/// The directory of the unprivileged helpers, in the VM directory: the
/// only one they can write (see [`Confinement`]).
const HELPER_DIR: &str = "helpers";
/// In the helper directory: the vhost-user socket between QEMU and
/// vhost-device-vsock, and the hybrid vsock socket for host clients.
const VHOST_VSOCK_SOCKET: &str = "vhost-vsock.sock";
const HYBRID_VSOCK_SOCKET: &str = "vsock.sock";
const QEMU_LOG: &str = "qemu.log";
const VSOCK_HELPER_LOG: &str = "vhost-device-vsock.log";
/// The vhost-user socket between QEMU and virtiofsd.
const VIRTIOFSD_SOCKET: &str = "virtiofsd.sock";
const VIRTIOFSD_LOG: &str = "virtiofsd.log";
/// How long QEMU may take to exit after a backend did: a backend also
/// exits when QEMU closes its connection on the way out, and then QEMU's
/// own exit says why the VM ended. QEMU frees the guest's memory after
/// that, which takes over a second for a large guest on a busy host (and
/// in the nested-KVM bed); a lost backend ends the VM this much later.
const QEMU_EXIT_AFTER_BACKEND: Duration = Duration::from_secs(5);
/// QEMU's QMP socket, through which block devices are attached.
const QMP_SOCKET: &str = "qmp.sock";

/// Why this backend passes no PCI function through.
pub(crate) const NO_VFIO: &str = "the qemu hypervisor cannot pass PCI functions through: QEMU's \
     microvm machine has no PCI bus; use the builtin hypervisor (hypervisor = \"builtin\" in the \
     runv config)";
/// How long QEMU may take to create its QMP socket after it started.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// microvm's virtio-mmio transports: `virtio-mmio-bus.N` has its register
/// window at `MMIO_BASE + N * MMIO_WINDOW` and IOAPIC pin
/// `MMIO_FIRST_IRQ + N` (measured on QEMU 7.2 with acpi=off, where QEMU
/// lists the transports itself). runv lists all of them on the kernel
/// command line with the id N, so that the guest's `virtio-mmio.N` is
/// QEMU's `virtio-mmio-bus.N`.
const MMIO_TRANSPORTS: u32 = 8;
const MMIO_BASE: u64 = 0xfeb0_0000;
const MMIO_WINDOW: u64 = 0x200;
const MMIO_FIRST_IRQ: u32 = 5;
/// The transport of each boot device.
const VSOCK_SLOT: u32 = 0;
const FS_SLOT: u32 = 1;
/// Block slots whose device is realized writable, and read-only ones. The
/// split is fixed at boot: QEMU sets a virtio-blk device's read-only
/// feature when it realizes the device, and cannot reopen a writable node
/// read-only under a writer. Network interfaces take the top transports,
/// so the read-only slots are those below them: see [`ro_block_slots`].
const RW_BLOCK_SLOTS: RangeInclusive<u32> = 2..=5;
/// The first read-only block slot, and the first transport a NIC may take.
const FIRST_RO_BLOCK_SLOT: u32 = 6;
/// Network interfaces a qemu VM can have: the transports above the
/// read-write block slots.
pub(crate) const MAX_NICS: usize = (MMIO_TRANSPORTS - FIRST_RO_BLOCK_SLOT) as usize;

/// The read-only block slots of a VM with `nics` network interfaces: the
/// transports between the read-write slots and the NICs' (none with two).
fn ro_block_slots(nics: usize) -> RangeInclusive<u32> {
    FIRST_RO_BLOCK_SLOT..=MMIO_TRANSPORTS - 1 - nics as u32
}

/// Every block slot of a VM with `nics` network interfaces.
fn block_slots(nics: usize) -> impl Iterator<Item = u32> {
    RW_BLOCK_SLOTS.chain(ro_block_slots(nics))
}

/// The transport of network interface `index` of `nics`: the NICs take the
/// top ones, in order.
fn nic_bus(nics: usize, index: usize) -> u32 {
    MMIO_TRANSPORTS - nics as u32 + index as u32
}

/// The programs a VM runs, found before any of them starts.
struct Programs {
    qemu: PathBuf,
    vsock: PathBuf,
    /// Only for a VM with a shared directory.
    share: Option<Share>,
}

/// A host directory shared with the guest, and the virtiofsd that serves it.
struct Share {
    virtiofsd: PathBuf,
    dir: PathBuf,
}

enum Control {
    Terminate,
    Kill,
}

struct Running {
    dir: RunDir,
    control: mpsc::UnboundedSender<Control>,
    exit: ExitWatch,
    supervisor: JoinHandle<()>,
    pids: Vec<u32>,
    /// One attach or detach at a time: each is several QMP commands.
    blocks: Mutex<BlockSlots>,
}

/// A pod VM run by QEMU.
pub struct QemuVm {
    spec: VmSpec,
    config: QemuConfig,
    running: Option<Running>,
    /// How the VM ended, once `stop` has seen it.
    ended: Option<VmExit>,
}

impl QemuVm {
    pub fn new(spec: VmSpec, config: QemuConfig) -> QemuVm {
        QemuVm {
            spec,
            config,
            running: None,
            ended: None,
        }
    }

    /// Everything that can be checked before a process starts.
    fn check_inputs(&self) -> Result<Programs, HypervisorError> {
        check_boot_files(&self.spec, None)?;
        check_nic_count(self.spec.net_devices.len())?;
        if !self.spec.vfio_devices.is_empty() {
            return Err(HypervisorError::StartFailed {
                what: "qemu",
                detail: format!(
                    "{} asked to be passed through; {NO_VFIO}",
                    self.spec
                        .vfio_devices
                        .iter()
                        .map(|path| path.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        let qemu = find_executable(&self.config.binary).ok_or_else(|| {
            HypervisorError::MissingProgram {
                what: "QEMU binary",
                program: self.config.binary.clone(),
                fix: "install Debian's qemu-system-x86 package, or set qemu.binary in the \
                      runv config",
            }
        })?;
        let vsock = find_executable(&self.config.vhost_vsock_binary).ok_or_else(|| {
            HypervisorError::MissingProgram {
                what: "vhost-user vsock backend",
                program: self.config.vhost_vsock_binary.clone(),
                fix: "install it with `cargo install --locked --root /usr/local \
                      vhost-device-vsock@0.3.0` (scripts/install.sh does), or set \
                      qemu.vhost_vsock_binary in the runv config",
            }
        })?;
        let share = match &self.spec.shared_dir {
            Some(dir) => Some(self.check_share(dir)?),
            None => None,
        };
        Ok(Programs { qemu, vsock, share })
    }

    /// The shared directory must exist and virtiofsd be installed.
    fn check_share(&self, dir: &Path) -> Result<Share, HypervisorError> {
        if !dir.is_dir() {
            return Err(HypervisorError::MissingFile {
                what: "shared directory",
                path: dir.to_owned(),
                fix: "create it before starting the VM",
            });
        }
        let virtiofsd = find_executable(&self.config.virtiofsd_binary).ok_or_else(|| {
            HypervisorError::MissingProgram {
                what: "virtio-fs backend",
                program: self.config.virtiofsd_binary.clone(),
                fix: "install it with `apt-get install libcap-ng-dev libseccomp-dev && cargo \
                      install --locked --root /usr/local virtiofsd@1.14.0` (scripts/install.sh \
                      does), or set qemu.virtiofsd_binary in the runv config",
            }
        })?;
        Ok(Share {
            virtiofsd,
            dir: dir.to_owned(),
        })
    }

    /// Starts the vhost-user backends and waits for their sockets; on
    /// error none is left running.
    async fn start_backends(
        programs: &Programs,
        dir: &RunDir,
        confinement: &Confinement,
    ) -> Result<Vec<Backend>, HypervisorError> {
        let mut backends = Vec::new();
        let helpers = dir.join(HELPER_DIR);
        let started = async {
            let vsock_log = dir.join(VSOCK_HELPER_LOG);
            backends.push(Backend::spawn(
                &programs.vsock,
                vhost_user::vsock_args(GUEST_CID, VHOST_VSOCK_SOCKET, HYBRID_VSOCK_SOCKET),
                helpers.join(VHOST_VSOCK_SOCKET),
                Spawn {
                    cwd: Some(&helpers),
                    confinement: Some(confinement),
                    ..Spawn::logged(&vsock_log, "vhost-device-vsock")
                },
            )?);
            if let Some(share) = &programs.share {
                // Root, to serve every uid's files; confined by its own
                // sandbox and options (vhost_user::virtiofsd_args).
                let log = dir.join(VIRTIOFSD_LOG);
                backends.push(Backend::spawn(
                    &share.virtiofsd,
                    vhost_user::virtiofsd_args(&share.dir, &dir.join(VIRTIOFSD_SOCKET)),
                    dir.join(VIRTIOFSD_SOCKET),
                    Spawn::logged(&log, "virtiofsd"),
                )?);
            }
            // Both start at once; they take a few milliseconds each.
            for backend in &mut backends {
                backend.wait_ready().await?;
            }
            Ok(())
        }
        .await;
        match started {
            Ok(()) => Ok(backends),
            Err(e) => {
                vhost_user::kill_all(&mut backends).await;
                Err(e)
            }
        }
    }

    /// QEMU's command line. QEMU runs unprivileged and opens nothing by
    /// path: everything it uses is one of `fds`, inherited.
    fn qemu_args(&self, accel: Accel, fds: &QemuFdNumbers) -> Vec<String> {
        let spec = &self.spec;
        let memory = format!("{}M", spec.memory_mib);
        let (accel_arg, cpu) = match accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg,thread=multi", "max"),
        };
        let mut append = BASE_KERNEL_PARAMS.to_owned();
        if !spec.kernel_params.is_empty() {
            append.push(' ');
            append.push_str(&spec.kernel_params);
        }
        append.push(' ');
        append.push_str(&mmio_kernel_params());
        let mut args: Vec<String> = vec![
            "-name".into(),
            format!("runv-{},debug-threads=on", spec.id),
            // QEMU's seccomp filter: no obsolete system calls, no change of
            // credentials, no new processes, no scheduler or affinity
            // changes.
            "-sandbox".into(),
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
            // The console log, as fd set 0 (a file chardev opens its path
            // with qemu_open, which takes /dev/fdset/N).
            "-add-fd".into(),
            format!("fd={},set={CONSOLE_FDSET},opaque=console", fds.console),
            // The guest kernel is built without ACPI: the virtio-mmio
            // transports are declared on its command line, by runv rather
            // than by QEMU (auto-kernel-cmdline=off), so that every one
            // has the index of its bus (mmio_kernel_params).
            // rtc=on: without a CMOS clock the guest kernel waits a whole
            // second at boot for the clock's update flag (guest-kernel.md).
            "-machine".into(),
            "microvm,rtc=on,acpi=off,auto-kernel-cmdline=off,x-option-roms=off,\
             memory-backend=ram"
                .into(),
            "-accel".into(),
            accel_arg.into(),
            "-cpu".into(),
            cpu.into(),
            "-smp".into(),
            spec.vcpus.to_string(),
            "-m".into(),
            memory.clone(),
            // Shared memory, so that vhost-user backends can map the guest.
            "-object".into(),
            format!("memory-backend-memfd,id=ram,size={memory},share=on"),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            // A guest reset ends QEMU: it is how the guest powers off.
            "-no-reboot".into(),
            "-chardev".into(),
            // append=on: without it QEMU truncates the fd it dups, which
            // fails on the console's pipe (runv_hypervisor::console).
            format!("file,id=console,path=/dev/fdset/{CONSOLE_FDSET},append=on"),
            "-serial".into(),
            "chardev:console".into(),
            // QEMU reads these with fopen: through its own fds' links,
            // which need no access to the directories above the files.
            "-kernel".into(),
            format!("/proc/self/fd/{}", fds.kernel),
            "-initrd".into(),
            format!("/proc/self/fd/{}", fds.initramfs),
            "-append".into(),
            append,
            // The vhost-user connection runv made for QEMU.
            "-chardev".into(),
            format!("socket,id=vsock,fd={}", fds.vsock),
            "-device".into(),
            format!("vhost-user-vsock-device,chardev=vsock,bus=virtio-mmio-bus.{VSOCK_SLOT}"),
            // Block devices are attached through QMP.
            // The QMP socket, bound and listening by runv.
            "-chardev".into(),
            format!("socket,id=qmp,fd={},server=on,wait=off", fds.qmp),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
        ];
        if let Some(fs) = fds.fs {
            args.extend([
                "-chardev".into(),
                format!("socket,id=fs,fd={fs}"),
                "-device".into(),
                format!(
                    "vhost-user-fs-device,chardev=fs,tag={SHARED_FS_TAG},\
                     bus=virtio-mmio-bus.{FS_SLOT}"
                ),
            ]);
        }
        let nics = spec.net_devices.len();
        for (index, device) in spec.net_devices.iter().enumerate() {
            // QEMU inherits the tap's fd under the same number
            // (spawn_logged_with_fds) and sets the vnet header up itself.
            args.extend([
                "-netdev".into(),
                format!("tap,id=net{index},fd={},vhost=off", device.tap.as_raw_fd()),
                "-device".into(),
                format!(
                    "virtio-net-device,netdev=net{index},mac={},bus=virtio-mmio-bus.{}",
                    format_mac(&device.mac),
                    nic_bus(nics, index)
                ),
            ]);
        }
        args.extend(block_slot_args(nics));
        args
    }

    /// The tap fds QEMU inherits, with `fds`.
    fn inherited_fds(&self, fds: &QemuFdNumbers) -> Vec<RawFd> {
        self.spec
            .net_devices
            .iter()
            .map(|device| device.tap.as_raw_fd())
            .chain([fds.kernel, fds.initramfs, fds.console, fds.qmp, fds.vsock])
            .chain(fds.fs)
            .collect()
    }

    /// The group through which QEMU reaches /dev/kvm, where it uses KVM:
    /// QEMU keeps it, and the other helpers of the VM do not.
    fn kvm_group(accel: Accel) -> Result<Option<u32>, HypervisorError> {
        if accel == Accel::Tcg {
            return Ok(None);
        }
        let kvm = std::fs::metadata("/dev/kvm").map_err(|source| HypervisorError::Io {
            context: "cannot stat /dev/kvm".into(),
            source,
        })?;
        if kvm.gid() == 0 || kvm.mode() & 0o060 != 0o060 {
            return Err(HypervisorError::StartFailed {
                what: "qemu",
                detail: format!(
                    "QEMU runs unprivileged and reaches /dev/kvm through its group, but \
                     /dev/kvm is mode {:o}, group {}: give it a group of its own with read \
                     and write (Debian's udev rules make it root:kvm 0660)",
                    kvm.mode() & 0o777,
                    kvm.gid()
                ),
            });
        }
        Ok(Some(kvm.gid()))
    }

    /// The running VM, or why there is none.
    fn running(&self) -> Result<&Running, HypervisorError> {
        let exit = self.running.as_ref().map(|running| &running.exit);
        ensure_running(exit, self.ended.as_ref())?;
        Ok(self.running.as_ref().expect("checked above"))
    }
}

#[async_trait]
impl Hypervisor for QemuVm {
    async fn start(&mut self) -> Result<StartInfo, HypervisorError> {
        if self.running.is_some() || self.ended.is_some() {
            return Err(HypervisorError::AlreadyStarted);
        }
        let begin = Instant::now();
        let programs = self.check_inputs()?;
        let (accel, accel_reason) = choose_accel(
            self.config.accel,
            self.config.allow_tcg,
            &KvmSupport::probe(),
        )
        .map_err(HypervisorError::Accel)?;
        tracing::info!(vm = %self.spec.id, %accel, reason = %accel_reason, "starting qemu");
        let confinement = Confinement::for_new_vm()?;
        let qemu_confinement = match Self::kvm_group(accel)? {
            Some(gid) => confinement.clone().with_group(gid),
            None => confinement.clone(),
        };
        let dir = RunDir::for_vm(&self.spec)?;
        confinement
            .create_dir(&dir.join(HELPER_DIR))
            .map_err(|source| HypervisorError::Io {
                context: "cannot create the helpers' directory".into(),
                source,
            })?;
        let mut backends = Self::start_backends(&programs, &dir, &confinement).await?;
        let spawned = async {
            let mut connections = Vec::new();
            for backend in &mut backends {
                connections.push(backend.connect().await?);
            }
            let fds = QemuFds::open(&self.spec, &dir, connections)?;
            let numbers = fds.numbers();
            spawn_logged(
                &programs.qemu,
                self.qemu_args(accel, &numbers),
                Spawn {
                    inherit: self.inherited_fds(&numbers),
                    confinement: Some(&qemu_confinement),
                    ..Spawn::logged(&dir.join(QEMU_LOG), "qemu")
                },
            )
        };
        let qemu = match spawned.await {
            Ok(qemu) => qemu,
            Err(e) => {
                vhost_user::kill_all(&mut backends).await;
                return Err(e);
            }
        };
        let pids = std::iter::once(qemu.id())
            .chain(backends.iter().map(Backend::pid))
            .flatten()
            .collect();
        let (control, control_rx) = mpsc::unbounded_channel();
        let (exit_tx, exit_rx) = watch::channel(None);
        let supervisor = tokio::spawn(supervise(
            qemu,
            backends,
            control_rx,
            exit_tx,
            dir.join(QEMU_LOG),
        ));
        let blocks = Mutex::new(BlockSlots::new(
            dir.join(QMP_SOCKET),
            self.spec.net_devices.len(),
        ));
        self.running = Some(Running {
            dir,
            control,
            exit: ExitWatch(exit_rx),
            supervisor,
            pids,
            blocks,
        });
        Ok(StartInfo {
            accel,
            accel_reason,
            spawn: begin.elapsed(),
        })
    }

    /// In the helpers' directory: vhost-device-vsock makes it.
    fn vsock_socket(&self) -> PathBuf {
        self.spec
            .run_dir
            .join(&self.spec.id)
            .join(HELPER_DIR)
            .join(HYBRID_VSOCK_SOCKET)
    }

    fn pids(&self) -> Vec<u32> {
        self.running
            .as_ref()
            .map(|r| r.pids.clone())
            .unwrap_or_default()
    }

    fn exit_watch(&self) -> Option<ExitWatch> {
        self.running.as_ref().map(|r| r.exit.clone())
    }

    async fn attach_block(&self, device: &BlockDevice) -> Result<u32, HypervisorError> {
        let kind = device.check()?;
        let running = self.running()?;
        let slot = running.blocks.lock().await.attach(device, kind).await?;
        tracing::info!(vm = %self.spec.id, slot, path = %device.path.display(),
            read_only = device.read_only, "block device attached");
        Ok(slot)
    }

    async fn detach_block(&self, slot: u32) -> Result<(), HypervisorError> {
        let running = self.running()?;
        running.blocks.lock().await.detach(slot).await?;
        tracing::info!(vm = %self.spec.id, slot, "block device detached");
        Ok(())
    }

    /// Every block slot: the guest probed each placeholder at boot.
    fn standby_slots(&self) -> Vec<u32> {
        block_slots(self.spec.net_devices.len()).collect()
    }

    async fn stop(&mut self, grace: Duration) -> VmExit {
        let Some(running) = self.running.take() else {
            return self.ended.clone().unwrap_or(VmExit::Stopped);
        };
        let mut exit = running.exit.clone();
        let _ = running.control.send(Control::Terminate);
        let ended = match tokio::time::timeout(grace, exit.wait()).await {
            Ok(ended) => ended,
            Err(_) => {
                tracing::warn!(vm = %self.spec.id, ?grace, "qemu did not stop in time, killing it");
                let _ = running.control.send(Control::Kill);
                exit.wait().await
            }
        };
        let _ = running.supervisor.await;
        drop(running.dir);
        self.ended = Some(ended.clone());
        ended
    }
}

/// Owns the VM's processes: reaps them, ends the VM when any dies or when
/// asked, and publishes how it ended once all of them are reaped.
async fn supervise(
    mut qemu: Child,
    mut backends: Vec<Backend>,
    mut control: mpsc::UnboundedReceiver<Control>,
    exit: watch::Sender<Option<VmExit>>,
    qemu_log: PathBuf,
) {
    let mut stop_requested = false;
    let mut control_open = true;
    let ended = loop {
        tokio::select! {
            // QEMU first: when it and a backend end together, QEMU's exit
            // is the reason.
            biased;
            status = qemu.wait() => break qemu_exit(status, stop_requested, &qemu_log),
            backend_exit = vhost_user::first_exit(&mut backends) => {
                match tokio::time::timeout(QEMU_EXIT_AFTER_BACKEND, qemu.wait()).await {
                    Ok(status) => break qemu_exit(status, stop_requested, &qemu_log),
                    // QEMU runs on without the device's backend: the guest
                    // has lost its vsock or its file system, so end the VM.
                    Err(_) => {
                        let _ = qemu.kill().await;
                        break VmExit::Failed(backend_exit);
                    }
                }
            }
            request = control.recv(), if control_open => {
                stop_requested = true;
                match request {
                    Some(Control::Terminate) => {
                        if let Some(pid) = qemu.id() {
                            let _ = signal::kill(Pid::from_raw(pid as i32), signal::SIGTERM);
                        }
                    }
                    // The owner is gone (dropped without stop) or insists.
                    Some(Control::Kill) | None => {
                        control_open = request.is_some();
                        let _ = qemu.start_kill();
                    }
                }
            }
        }
    };
    vhost_user::kill_all(&mut backends).await;
    let _ = exit.send(Some(ended));
}

/// How the VM ended, from QEMU's exit.
fn qemu_exit(
    status: std::io::Result<std::process::ExitStatus>,
    stop_requested: bool,
    qemu_log: &Path,
) -> VmExit {
    match status {
        _ if stop_requested => VmExit::Stopped,
        Ok(status) if status.success() => VmExit::GuestShutdown,
        Ok(status) => VmExit::Failed(format!(
            "qemu exited ({status}):\n{}",
            tail(qemu_log, LOG_TAIL_LINES)
        )),
        Err(e) => VmExit::Failed(format!("cannot wait for qemu: {e}")),
    }
}

/// The kernel parameters that declare every virtio-mmio transport of
/// microvm, transport N as the guest's platform device `virtio-mmio.N`.
/// A transport without a device answers device ID 0, which the guest's
/// driver skips.
fn mmio_kernel_params() -> String {
    (0..MMIO_TRANSPORTS)
        .map(|slot| {
            format!(
                "virtio_mmio.device=512@{:#x}:{}:{slot}",
                MMIO_BASE + u64::from(slot) * MMIO_WINDOW,
                MMIO_FIRST_IRQ + slot
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The node name of slot N's raw node, which its virtio-blk device uses.
fn slot_node(slot: u32) -> String {
    format!("slot{slot}")
}

/// The node name of slot N's empty (null) node, the raw node's file while
/// no volume is attached.
fn empty_node(slot: u32) -> String {
    format!("slot{slot}-empty")
}

/// Refuses more network interfaces than there are transports for, naming
/// the way out.
fn check_nic_count(nics: usize) -> Result<(), HypervisorError> {
    if nics <= MAX_NICS {
        return Ok(());
    }
    Err(HypervisorError::StartFailed {
        what: "qemu",
        detail: format!(
            "the pod has {nics} network interfaces, and a qemu VM takes at most {MAX_NICS}: \
             QEMU's microvm has {MMIO_TRANSPORTS} virtio-mmio transports, of which vsock, \
             virtio-fs and the {} read-write block slots take {} (docs/networking.md); \
             use the builtin hypervisor (hypervisor = \"builtin\" in the runv config) \
             for pods with more",
            RW_BLOCK_SLOTS.count(),
            FIRST_RO_BLOCK_SLOT,
        ),
    })
}

/// `aa:bb:cc:dd:ee:ff`.
fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The block slots of a VM with `nics` network interfaces: on each, an
/// empty node under a raw node, and a virtio-blk device on the slot's
/// transport.
fn block_slot_args(nics: usize) -> Vec<String> {
    let read_only = |slot: &u32| ro_block_slots(nics).contains(slot);
    block_slots(nics)
        .flat_map(|slot| {
            let ro = if read_only(&slot) {
                ",read-only=on"
            } else {
                ""
            };
            [
                "-blockdev".into(),
                format!(
                    "driver=null-co,node-name={},size=0,read-zeroes=on{ro}",
                    empty_node(slot)
                ),
                "-blockdev".into(),
                format!(
                    "driver=raw,node-name={},file={}{ro}",
                    slot_node(slot),
                    empty_node(slot)
                ),
                "-device".into(),
                format!(
                    "virtio-blk-device,bus=virtio-mmio-bus.{slot},drive={},id={}",
                    slot_node(slot),
                    slot_node(slot)
                ),
            ]
        })
        .collect()
}

/// The block slots of a running VM and the QMP connection that fills and
/// empties them.
struct BlockSlots {
    qmp_socket: PathBuf,
    /// The VM's network interfaces, which take transports from the
    /// read-only slots.
    nics: usize,
    /// Connected at the first attach.
    qmp: Option<Qmp>,
    slots: Vec<BlockSlot>,
    /// Makes volume node names unique.
    volumes_added: u64,
}

struct BlockSlot {
    index: u32,
    read_only: bool,
    volume: Option<Volume>,
}

/// A host file or device attached to a slot.
struct Volume {
    node: String,
    path: PathBuf,
}

impl BlockSlots {
    fn new(qmp_socket: PathBuf, nics: usize) -> BlockSlots {
        let slot = |read_only| {
            move |index| BlockSlot {
                index,
                read_only,
                volume: None,
            }
        };
        BlockSlots {
            qmp_socket,
            nics,
            qmp: None,
            slots: RW_BLOCK_SLOTS
                .map(slot(false))
                .chain(ro_block_slots(nics).map(slot(true)))
                .collect(),
            volumes_added: 0,
        }
    }

    /// The QMP connection, made on first use. QEMU creates the socket as
    /// it starts: wait for it a little.
    async fn qmp(&mut self) -> Result<&mut Qmp, HypervisorError> {
        if self.qmp.is_none() {
            let deadline = Instant::now() + QMP_CONNECT_TIMEOUT;
            let qmp = loop {
                match Qmp::connect(&self.qmp_socket).await {
                    Ok(qmp) => break qmp,
                    Err(e) if Instant::now() >= deadline => return Err(e),
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            };
            self.qmp = Some(qmp);
        }
        Ok(self.qmp.as_mut().expect("connected above"))
    }

    /// Runs a QMP command; a broken connection is dropped, for the next
    /// call to connect afresh.
    async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, HypervisorError> {
        let result = self.qmp().await?.execute(command, arguments).await;
        if let Err(HypervisorError::QmpConnection { .. }) = &result {
            self.qmp = None;
        }
        result
    }

    async fn attach(
        &mut self,
        device: &BlockDevice,
        kind: BlockKind,
    ) -> Result<u32, HypervisorError> {
        let Some(free) = self
            .slots
            .iter()
            .position(|slot| slot.read_only == device.read_only && slot.volume.is_none())
        else {
            return Err(self.no_free_slot(device));
        };
        let slot = self.slots[free].index;
        // QEMU runs unprivileged: runv opens the device and passes it.
        let fdset = self.add_fd(device).await?;
        let attached = self.attach_fdset(device, kind, slot, fdset).await;
        // The node holds a copy of its own (a dup) from here on, so the
        // set's fd goes: QEMU keeps one fd per volume.
        self.remove_fd(fdset).await;
        self.slots[free].volume = Some(Volume {
            node: attached?,
            path: device.path.clone(),
        });
        Ok(slot)
    }

    /// Opens `device` (read-only if it is) and hands it to QEMU in a new
    /// fd set, whose id this returns.
    async fn add_fd(&mut self, device: &BlockDevice) -> Result<u64, HypervisorError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!device.read_only)
            .open(&device.path)
            .map_err(|e| HypervisorError::BadBlockDevice {
                path: device.path.clone(),
                reason: format!("cannot open it: {e}"),
            })?;
        let added = self
            .qmp()
            .await?
            .execute_with_fd("add-fd", json!({}), file.as_fd())
            .await?;
        added
            .get("fdset-id")
            .and_then(Value::as_u64)
            .ok_or_else(|| HypervisorError::QmpConnection {
                context: "reply to `add-fd`".into(),
                detail: format!("no fdset-id in {added}"),
            })
    }

    /// Closes the fd of a set (a node opened from it keeps its own).
    async fn remove_fd(&mut self, fdset: u64) {
        if let Err(e) = self
            .execute("remove-fd", json!({ "fdset-id": fdset }))
            .await
        {
            tracing::warn!(fdset, error = %e, "cannot remove a QEMU fd set");
        }
    }

    /// Adds a node for the device in `fdset` and puts it in `slot`;
    /// returns the node's name.
    async fn attach_fdset(
        &mut self,
        device: &BlockDevice,
        kind: BlockKind,
        slot: u32,
        fdset: u64,
    ) -> Result<String, HypervisorError> {
        let filename = format!("/dev/fdset/{fdset}");
        self.volumes_added += 1;
        let node = format!("volume{}", self.volumes_added);
        let driver = match kind {
            BlockKind::File => "file",
            BlockKind::BlockDevice => "host_device",
        };
        let mut volume = json!({
            "driver": driver,
            "node-name": node,
            "filename": filename,
            "read-only": device.read_only,
            // O_DIRECT: the guest's writes reach the device, not the
            // host's page cache, and the host's cache is not polluted.
            "cache": { "direct": true },
        });
        if let Err(e) = self.execute("blockdev-add", volume.clone()).await {
            let HypervisorError::Qmp { desc, .. } = &e else {
                return Err(e);
            };
            // Some file systems (tmpfs) refuse O_DIRECT.
            tracing::info!(path = %device.path.display(), refused = %desc,
                "opening the volume without O_DIRECT");
            volume.as_object_mut().expect("an object").remove("cache");
            self.execute("blockdev-add", volume).await?;
        }
        if let Err(e) = self
            .execute("blockdev-reopen", reopen(slot, &node, device.read_only))
            .await
        {
            if let Err(undo) = self
                .execute("blockdev-del", json!({ "node-name": node }))
                .await
            {
                tracing::warn!(%node, error = %undo, "cannot remove the volume node");
            }
            return Err(e);
        }
        Ok(node)
    }

    /// The error for a device that finds every slot of its kind taken.
    fn no_free_slot(&self, device: &BlockDevice) -> HypervisorError {
        let ro_slots = ro_block_slots(self.nics);
        if device.read_only && ro_slots.is_empty() {
            return HypervisorError::NoFreeSlot {
                path: device.path.clone(),
                reason: format!(
                    "this qemu VM has no read-only block slot: its {} network interfaces take \
                     the transports that hold them (QEMU's microvm has {MMIO_TRANSPORTS}, see \
                     docs/networking.md); attach the volume read-write, or use the builtin \
                     hypervisor",
                    self.nics
                ),
            };
        }
        let (kind, range) = match device.read_only {
            true => ("read-only", &ro_slots),
            false => ("read-write", &RW_BLOCK_SLOTS),
        };
        let taken = self
            .slots
            .iter()
            .filter(|slot| slot.read_only == device.read_only)
            .filter_map(|slot| {
                let volume = slot.volume.as_ref()?;
                Some(format!("{} in slot {}", volume.path.display(), slot.index))
            })
            .collect::<Vec<_>>()
            .join(", ");
        HypervisorError::NoFreeSlot {
            path: device.path.clone(),
            reason: format!(
                "all {} {kind} block slots of this qemu VM ({}-{}) are taken ({taken}); \
                 QEMU's microvm cannot hot-plug, so runv creates {} read-write and {} \
                 read-only block slots at boot and swaps volumes into them \
                 (docs/hotplug.md): detach a device first",
                range.clone().count(),
                range.start(),
                range.end(),
                RW_BLOCK_SLOTS.count(),
                ro_slots.clone().count(),
            ),
        }
    }

    async fn detach(&mut self, slot: u32) -> Result<(), HypervisorError> {
        let Some(index) = self.slots.iter().position(|s| s.index == slot) else {
            return Err(HypervisorError::NoBlockInSlot {
                slot,
                reason: format!(
                    "the block slots of this qemu VM are {}-{}",
                    RW_BLOCK_SLOTS.start(),
                    block_slots(self.nics).last().expect("read-write slots")
                ),
            });
        };
        let read_only = self.slots[index].read_only;
        let Some(node) = self.slots[index].volume.as_ref().map(|v| v.node.clone()) else {
            return Err(HypervisorError::NoBlockInSlot {
                slot,
                reason: "it is empty".into(),
            });
        };
        // Back onto the slot's empty node, which stayed in the graph.
        self.execute(
            "blockdev-reopen",
            reopen(slot, &empty_node(slot), read_only),
        )
        .await?;
        // The slot is empty from here on, whatever happens to the node.
        self.slots[index].volume = None;
        // Deleting the node closes the host's file or device.
        self.execute("blockdev-del", json!({ "node-name": node }))
            .await?;
        Ok(())
    }
}

/// `blockdev-reopen` arguments that give slot `slot`'s raw node the file
/// node `file`.
fn reopen(slot: u32, file: &str, read_only: bool) -> Value {
    json!({
        "options": [{
            "driver": "raw",
            "node-name": slot_node(slot),
            "file": file,
            "read-only": read_only,
        }]
    })
}

/// The fd set QEMU's console log is in.
const CONSOLE_FDSET: u32 = 0;

/// What QEMU gets as open fds instead of paths, opened by runv (root) before
/// QEMU starts; held until the spawn returns.
struct QemuFds {
    kernel: File,
    initramfs: File,
    console: File,
    qmp: UnixListener,
    /// Connections to the vhost-user backends' sockets.
    vsock: UnixStream,
    fs: Option<UnixStream>,
}

/// The numbers of [`QemuFds`], which QEMU inherits under the same numbers.
struct QemuFdNumbers {
    kernel: RawFd,
    initramfs: RawFd,
    console: RawFd,
    qmp: RawFd,
    vsock: RawFd,
    fs: Option<RawFd>,
}

impl QemuFds {
    /// `connections`: to the vsock backend, then virtiofsd if any.
    fn open(
        spec: &VmSpec,
        dir: &RunDir,
        connections: Vec<UnixStream>,
    ) -> Result<QemuFds, HypervisorError> {
        let io = |context: String| move |source| HypervisorError::Io { context, source };
        let readable = |path: &Path| -> Result<File, HypervisorError> {
            let file = File::open(path).map_err(io(format!("cannot open {}", path.display())))?;
            // QEMU reopens it through /proc/self/fd as its own uid.
            let mode = file
                .metadata()
                .map_err(io(format!("cannot stat {}", path.display())))?
                .mode();
            if mode & 0o004 == 0 {
                return Err(HypervisorError::StartFailed {
                    what: "qemu",
                    detail: format!(
                        "{} is not readable by others (mode {:o}): QEMU runs as an \
                         unprivileged uid and reads it; chmod a+r it",
                        path.display(),
                        mode & 0o777
                    ),
                });
            }
            Ok(file)
        };
        let console = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&spec.console_log)
            .map_err(io(format!("cannot open {}", spec.console_log.display())))?;
        let mut connections = connections.into_iter();
        let qmp = dir.join(QMP_SOCKET);
        Ok(QemuFds {
            kernel: readable(&spec.kernel)?,
            initramfs: readable(&spec.initramfs)?,
            console,
            qmp: UnixListener::bind(&qmp).map_err(io(format!("cannot bind {}", qmp.display())))?,
            vsock: connections.next().expect("the vsock backend runs"),
            fs: connections.next(),
        })
    }

    fn numbers(&self) -> QemuFdNumbers {
        QemuFdNumbers {
            kernel: self.kernel.as_raw_fd(),
            initramfs: self.initramfs.as_raw_fd(),
            console: self.console.as_raw_fd(),
            qmp: self.qmp.as_raw_fd(),
            vsock: self.vsock.as_raw_fd(),
            fs: self.fs.as_ref().map(AsRawFd::as_raw_fd),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::NetDevice;

    /// Fd numbers that stand for QEMU's inherited fds.
    fn fds(fs: bool) -> QemuFdNumbers {
        QemuFdNumbers {
            kernel: 10,
            initramfs: 11,
            console: 12,
            qmp: 13,
            vsock: 14,
            fs: fs.then_some(15),
        }
    }

    fn spec(dir: &Path) -> VmSpec {
        VmSpec {
            id: "vm,1".into(),
            kernel: dir.join("vmlinux"),
            initramfs: dir.join("initrd"),
            kernel_params: "runv.log_level=debug".into(),
            vcpus: 2,
            memory_mib: 128,
            run_dir: dir.to_owned(),
            console_log: dir.join("console,log"),
            shared_dir: None,
            net_devices: Vec::new(),
            vfio_devices: Vec::new(),
        }
    }

    #[test]
    fn command_line_shares_memory_and_wires_vsock() {
        let tmp = tempfile::tempdir().unwrap();
        let vm = QemuVm::new(spec(tmp.path()), QemuConfig::default());
        let args = vm
            .qemu_args(Accel::Tcg, &fds(vm.spec.shared_dir.is_some()))
            .join(" ");
        assert!(
            args.contains("memory-backend-memfd,id=ram,size=128M,share=on"),
            "{args}"
        );
        assert!(args.contains("memory-backend=ram"), "{args}");
        assert!(args.contains("microvm,rtc=on,acpi=off"), "{args}");
        assert!(args.contains("-accel tcg,thread=multi -cpu max"), "{args}");
        assert!(args.contains("-smp 2"), "{args}");
        assert!(args.contains("-no-reboot"), "{args}");
        assert!(
            args.contains("vhost-user-vsock-device,chardev=vsock,bus=virtio-mmio-bus.0"),
            "{args}"
        );
        assert!(
            args.contains(
                "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ),
            "{args}"
        );
        assert!(
            args.contains("-add-fd fd=12,set=0,opaque=console")
                && args.contains("-chardev file,id=console,path=/dev/fdset/0"),
            "{args}"
        );
        assert!(
            args.contains("-kernel /proc/self/fd/10 -initrd /proc/self/fd/11"),
            "{args}"
        );
        assert!(args.contains("-chardev socket,id=vsock,fd=14"), "{args}");
        assert!(
            args.contains(&format!("{BASE_KERNEL_PARAMS} runv.log_level=debug")),
            "{args}"
        );
        let kvm_args = vm.qemu_args(Accel::Kvm, &fds(false)).join(" ");
        assert!(kvm_args.contains("-accel kvm -cpu host"), "{kvm_args}");
        assert!(!args.contains("vhost-user-fs-device"), "no share: {args}");
    }

    #[test]
    fn shared_directory_is_wired_to_virtiofsd() {
        let tmp = tempfile::tempdir().unwrap();
        let mut spec = spec(tmp.path());
        spec.shared_dir = Some(tmp.path().join("shared"));
        let vm = QemuVm::new(spec, QemuConfig::default());
        let args = vm
            .qemu_args(Accel::Tcg, &fds(vm.spec.shared_dir.is_some()))
            .join(" ");
        assert!(
            args.contains(
                "-chardev socket,id=fs,fd=15 -device vhost-user-fs-device,chardev=fs,\
                 tag=runv-shared,bus=virtio-mmio-bus.1"
            ),
            "{args}"
        );
    }

    /// Every transport is declared with the index of its bus; each block
    /// slot has an empty node under a raw node, read-only in 6 and 7.
    #[test]
    fn block_slots_and_qmp_are_on_the_command_line() {
        let tmp = tempfile::tempdir().unwrap();
        let vm = QemuVm::new(spec(tmp.path()), QemuConfig::default());
        let args = vm.qemu_args(Accel::Tcg, &fds(vm.spec.shared_dir.is_some()));
        let joined = args.join(" ");
        assert!(joined.contains("auto-kernel-cmdline=off"), "{joined}");
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(
            append.ends_with(
                "runv.log_level=debug virtio_mmio.device=512@0xfeb00000:5:0 \
                 virtio_mmio.device=512@0xfeb00200:6:1 virtio_mmio.device=512@0xfeb00400:7:2 \
                 virtio_mmio.device=512@0xfeb00600:8:3 virtio_mmio.device=512@0xfeb00800:9:4 \
                 virtio_mmio.device=512@0xfeb00a00:10:5 virtio_mmio.device=512@0xfeb00c00:11:6 \
                 virtio_mmio.device=512@0xfeb00e00:12:7"
            ),
            "{append}"
        );
        assert!(
            joined.contains(
                "-blockdev driver=null-co,node-name=slot2-empty,size=0,read-zeroes=on \
                 -blockdev driver=raw,node-name=slot2,file=slot2-empty \
                 -device virtio-blk-device,bus=virtio-mmio-bus.2,drive=slot2,id=slot2 "
            ),
            "{joined}"
        );
        assert!(
            joined.contains(
                "-blockdev driver=null-co,node-name=slot7-empty,size=0,read-zeroes=on,\
                 read-only=on -blockdev driver=raw,node-name=slot7,file=slot7-empty,\
                 read-only=on -device virtio-blk-device,bus=virtio-mmio-bus.7,drive=slot7,\
                 id=slot7"
            ),
            "{joined}"
        );
        assert_eq!(joined.matches("virtio-blk-device").count(), 6);
        assert_eq!(joined.matches(",read-only=on").count(), 4, "{joined}");
        assert!(
            joined.contains(
                "-chardev socket,id=qmp,fd=13,server=on,wait=off -mon chardev=qmp,mode=control"
            ),
            "{joined}"
        );
        assert_eq!(vm.standby_slots(), vec![2, 3, 4, 5, 6, 7]);
    }

    /// A full slot set names the limit and the devices in it; a detach of
    /// a slot that is not a block slot, or empty, says so.
    #[test]
    fn slot_errors_are_clear() {
        let mut blocks = BlockSlots::new(PathBuf::from("/nonexistent/qmp.sock"), 0);
        for slot in &mut blocks.slots {
            slot.volume = Some(Volume {
                node: format!("volume{}", slot.index),
                path: PathBuf::from(format!("/dev/loop{}", slot.index)),
            });
        }
        let device = BlockDevice {
            path: "/images/more.img".into(),
            read_only: true,
        };
        let err = blocks.no_free_slot(&device).to_string();
        assert!(
            err.starts_with(
                "no free slot for /images/more.img: all 2 read-only block slots of this qemu VM \
                 (6-7) are taken (/dev/loop6 in slot 6, /dev/loop7 in slot 7); QEMU's \
                 microvm cannot hot-plug, so runv creates 4 read-write and 2 read-only"
            ),
            "{err}"
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut blocks = BlockSlots::new(PathBuf::from("/nonexistent/qmp.sock"), 0);
        let err = runtime.block_on(blocks.detach(0)).unwrap_err().to_string();
        assert_eq!(
            err,
            "slot 0 holds no attached block device: the block slots of this qemu VM are 2-7"
        );
        let err = runtime.block_on(blocks.detach(3)).unwrap_err().to_string();
        assert_eq!(err, "slot 3 holds no attached block device: it is empty");
    }

    /// A spec with `nics` network interfaces, on fds that stand for taps.
    fn spec_with_nics(dir: &Path, nics: u8) -> VmSpec {
        let mut spec = spec(dir);
        spec.net_devices = (0..nics)
            .map(|n| NetDevice {
                tap: Arc::new(std::fs::File::open("/dev/null").unwrap().into()),
                mac: [0x02, 0, 0, 0, 0, n],
            })
            .collect();
        spec
    }

    /// NICs take the top transports, in order, each on its tap's fd, and
    /// the read-only block slots shrink to the transports below them.
    #[test]
    fn network_interfaces_take_the_top_transports() {
        let tmp = tempfile::tempdir().unwrap();
        let vm = QemuVm::new(spec_with_nics(tmp.path(), 1), QemuConfig::default());
        let fd = vm.spec.net_devices[0].tap.as_raw_fd();
        assert_eq!(vm.inherited_fds(&fds(false)), vec![fd, 10, 11, 12, 13, 14]);
        let args = vm
            .qemu_args(Accel::Tcg, &fds(vm.spec.shared_dir.is_some()))
            .join(" ");
        assert!(
            args.contains(&format!(
                "-netdev tap,id=net0,fd={fd},vhost=off -device virtio-net-device,netdev=net0,\
                 mac=02:00:00:00:00:00,bus=virtio-mmio-bus.7"
            )),
            "{args}"
        );
        assert!(
            !args.contains("virtio-blk-device,bus=virtio-mmio-bus.7"),
            "{args}"
        );
        assert!(
            args.contains("virtio-blk-device,bus=virtio-mmio-bus.6"),
            "{args}"
        );
        assert_eq!(args.matches("virtio-blk-device").count(), 5);
        assert_eq!(vm.standby_slots(), vec![2, 3, 4, 5, 6]);

        let vm = QemuVm::new(spec_with_nics(tmp.path(), 2), QemuConfig::default());
        let taps = vm.inherited_fds(&fds(false));
        let args = vm
            .qemu_args(Accel::Tcg, &fds(vm.spec.shared_dir.is_some()))
            .join(" ");
        for (n, bus) in [(0, 6), (1, 7)] {
            assert!(
                args.contains(&format!(
                    "-netdev tap,id=net{n},fd={},vhost=off -device virtio-net-device,\
                     netdev=net{n},mac=02:00:00:00:00:0{n},bus=virtio-mmio-bus.{bus}",
                    taps[n]
                )),
                "{args}"
            );
        }
        assert_eq!(args.matches("virtio-blk-device").count(), 4);
        assert!(!args.contains("read-only=on"), "{args}");
        assert_eq!(vm.standby_slots(), vec![2, 3, 4, 5]);

        let vm = QemuVm::new(spec(tmp.path()), QemuConfig::default());
        let args = vm
            .qemu_args(Accel::Tcg, &fds(vm.spec.shared_dir.is_some()))
            .join(" ");
        assert!(!args.contains("-netdev"), "{args}");
        assert_eq!(vm.inherited_fds(&fds(true)), vec![10, 11, 12, 13, 14, 15]);
    }

    /// With NICs, the slot errors count the slots that are left.
    #[test]
    fn slot_errors_count_the_slots_nics_leave() {
        let blocks = BlockSlots::new(PathBuf::from("/nonexistent/qmp.sock"), 2);
        let device = BlockDevice {
            path: "/images/ro.img".into(),
            read_only: true,
        };
        let err = blocks.no_free_slot(&device).to_string();
        assert!(
            err.starts_with(
                "no free slot for /images/ro.img: this qemu VM has no read-only block slot: \
                 its 2 network interfaces take the transports that hold them"
            ),
            "{err}"
        );
        assert!(err.contains("builtin hypervisor"), "{err}");
        let mut blocks = BlockSlots::new(PathBuf::from("/nonexistent/qmp.sock"), 1);
        for slot in &mut blocks.slots {
            slot.volume = Some(Volume {
                node: format!("volume{}", slot.index),
                path: PathBuf::from(format!("/dev/loop{}", slot.index)),
            });
        }
        let err = blocks.no_free_slot(&device).to_string();
        assert!(
            err.contains(
                "all 1 read-only block slots of this qemu VM (6-6) are taken (/dev/loop6 in \
                 slot 6); QEMU's microvm cannot hot-plug, so runv creates 4 read-write and 1 \
                 read-only"
            ),
            "{err}"
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut blocks = BlockSlots::new(PathBuf::from("/nonexistent/qmp.sock"), 2);
        let err = runtime.block_on(blocks.detach(6)).unwrap_err().to_string();
        assert_eq!(
            err,
            "slot 6 holds no attached block device: the block slots of this qemu VM are 2-5"
        );
    }

    /// A directory with empty boot files, and a config whose binaries are
    /// `sh`: enough for a start that must refuse before running anything.
    fn refusal_setup() -> (tempfile::TempDir, QemuConfig) {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("vmlinux"), "").unwrap();
        std::fs::write(tmp.path().join("initrd"), "").unwrap();
        let config = QemuConfig {
            binary: "sh".into(),
            vhost_vsock_binary: "sh".into(),
            ..QemuConfig::default()
        };
        (tmp, config)
    }

    #[tokio::test]
    async fn too_many_network_interfaces_are_refused_before_anything_starts() {
        let (tmp, config) = refusal_setup();
        let mut vm = QemuVm::new(spec_with_nics(tmp.path(), 3), config);
        let err = vm.start().await.unwrap_err().to_string();
        assert!(
            err.starts_with(
                "qemu failed to start: the pod has 3 network interfaces, and a qemu VM takes \
                 at most 2"
            ),
            "{err}"
        );
        assert!(err.contains("hypervisor = \"builtin\""), "{err}");
        assert!(!tmp.path().join("vm,1").exists(), "no VM directory is left");
    }

    #[tokio::test]
    async fn pci_functions_are_refused_before_anything_starts() {
        let (tmp, config) = refusal_setup();
        let mut spec = spec(tmp.path());
        spec.vfio_devices = vec!["/sys/bus/pci/devices/0000:3b:02.1".into()];
        let err = QemuVm::new(spec, config)
            .start()
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "qemu failed to start: /sys/bus/pci/devices/0000:3b:02.1 asked to be passed \
                 through; the qemu hypervisor cannot pass PCI functions through"
            ),
            "{err}"
        );
        assert!(!tmp.path().join("vm,1").exists(), "no VM directory is left");
        assert!(crate::vfio_support(runv_config::HypervisorKind::Builtin).is_ok());
        assert_eq!(
            crate::vfio_support(runv_config::HypervisorKind::Qemu),
            Err(NO_VFIO)
        );
    }

    #[tokio::test]
    async fn attach_and_detach_need_a_running_vm() {
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("disk.img");
        std::fs::write(&image, "").unwrap();
        let vm = QemuVm::new(spec(tmp.path()), QemuConfig::default());
        let device = BlockDevice {
            path: image,
            read_only: false,
        };
        let err = vm.attach_block(&device).await.unwrap_err().to_string();
        assert_eq!(err, "the VM is not running: it has not been started");
        let err = vm.detach_block(2).await.unwrap_err().to_string();
        assert_eq!(err, "the VM is not running: it has not been started");
    }

    #[tokio::test]
    async fn missing_virtiofsd_is_reported_before_anything_starts() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("vmlinux"), "").unwrap();
        std::fs::write(tmp.path().join("initrd"), "").unwrap();
        let mut spec = spec(tmp.path());
        spec.shared_dir = Some(tmp.path().join("shared"));
        // Any program will do for QEMU and the vsock backend: none may start.
        let config = QemuConfig {
            binary: "sh".into(),
            vhost_vsock_binary: "sh".into(),
            virtiofsd_binary: "/nonexistent/virtiofsd".into(),
            ..QemuConfig::default()
        };
        let mut vm = QemuVm::new(spec.clone(), config.clone());
        let err = vm.start().await.unwrap_err().to_string();
        assert!(
            err.contains("shared directory") && err.contains("shared"),
            "{err}"
        );
        std::fs::create_dir(tmp.path().join("shared")).unwrap();
        let mut vm = QemuVm::new(spec, config);
        let err = vm.start().await.unwrap_err().to_string();
        assert!(
            err.contains("virtio-fs backend `/nonexistent/virtiofsd` not found")
                && err.contains("cargo install --locked --root /usr/local virtiofsd@1.14.0")
                && err.contains("qemu.virtiofsd_binary"),
            "{err}"
        );
        assert!(!tmp.path().join("vm,1").exists(), "no VM directory is left");
    }

    #[tokio::test]
    async fn missing_inputs_are_reported_before_anything_starts() {
        let tmp = tempfile::tempdir().unwrap();
        let mut vm = QemuVm::new(spec(tmp.path()), QemuConfig::default());
        let err = vm.start().await.unwrap_err().to_string();
        assert!(
            err.contains("guest kernel") && err.contains("build-kernel.sh"),
            "{err}"
        );
        std::fs::write(tmp.path().join("vmlinux"), "").unwrap();
        let err = vm.start().await.unwrap_err().to_string();
        assert!(
            err.contains("initramfs") && err.contains("build-initramfs.sh"),
            "{err}"
        );
        std::fs::write(tmp.path().join("initrd"), "").unwrap();
        let config = QemuConfig {
            binary: "/nonexistent/qemu-system-x86_64".into(),
            ..QemuConfig::default()
        };
        let mut vm = QemuVm::new(spec(tmp.path()), config);
        let err = vm.start().await.unwrap_err().to_string();
        assert!(
            err.contains("qemu-system-x86") && err.contains("qemu.binary"),
            "{err}"
        );
        assert!(!tmp.path().join("vm,1").exists(), "no VM directory is left");
    }
}
