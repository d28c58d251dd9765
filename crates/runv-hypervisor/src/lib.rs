//! The `Hypervisor` abstraction: what runv needs of whatever runs a pod VM,
//! and the backends that provide it. A backend boots the guest kernel and
//! initramfs, exposes the guest's vsock as a hybrid vsock Unix socket,
//! captures the serial console, and leaves no process or file behind.

mod builtin;
pub mod confine;
mod console;
pub mod host;
pub mod process;
mod qemu;
pub mod qmp;
mod run_dir;
mod vhost_user;

use std::{
    os::{fd::OwnedFd, unix::fs::FileTypeExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use runv_config::{Config, HypervisorKind};
use tokio::sync::watch;

pub use builtin::BuiltinVm;
pub use console::{CappedLog, ConsoleCapture};
pub use host::{Accel, KvmSupport};
pub use qemu::QemuVm;

/// Guest kernel parameters every backend passes: the console on the first
/// serial port; a reset (the triple fault of `reboot=t`) as the way the
/// guest ends itself, which backends turn into the VM's exit; an
/// immediate reset on panic, so that a dead guest does not linger; and no
/// check of the timer interrupt at boot: on a busy host a vCPU can be
/// descheduled through the check's short window, and the guest then
/// panics with "IO-APIC + timer doesn't work" (seen at 50 pods under TCG).
/// Per-CPU areas in page-sized units (`percpu_alloc=page`): with the
/// default 2 MiB-aligned units, the first per-CPU allocation past the boot
/// chunk (a pod's cgroups make one) creates a chunk whose memory-cgroup
/// bookkeeping is a zeroed array of 8 bytes per 4 bytes of the unit, 4 MiB
/// of guest RAM for a 1-vCPU guest's 2 MiB unit; with page units it is a
/// few hundred KiB (docs/guest-kernel.md).
pub const BASE_KERNEL_PARAMS: &str =
    "console=ttyS0 reboot=t panic=-1 no_timer_check percpu_alloc=page";

/// The hybrid vsock socket for host clients, in the VM's directory.
const HYBRID_VSOCK_SOCKET: &str = "vsock.sock";

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Unique among running VMs; names the VM's private directory.
    pub id: String,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Parameters appended to [`BASE_KERNEL_PARAMS`].
    pub kernel_params: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The parent of the VM's private directory (sockets, helper logs),
    /// which the backend creates at start and removes when the VM is gone.
    pub run_dir: PathBuf,
    /// Where the guest's serial console goes. The caller owns this file.
    pub console_log: PathBuf,
    /// A host directory shared with the guest through virtio-fs, under the
    /// tag `runv_protocol::SHARED_FS_TAG`: container root file systems and
    /// volumes. The caller owns the directory.
    pub shared_dir: Option<PathBuf>,
    /// The guest's network interfaces, in order (the guest's eth0 first).
    pub net_devices: Vec<NetDevice>,
    /// Host PCI functions the guest gets whole (VFIO), cold-plugged at
    /// boot: their `/sys/bus/pci/devices/<BDF>` directories, each bound
    /// to vfio-pci. Only where [`vfio_support`] says Ok.
    pub vfio_devices: Vec<PathBuf>,
}

/// A guest network interface (virtio-net) backed by a host tap device.
#[derive(Debug, Clone)]
pub struct NetDevice {
    /// The tap, opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`: frames
    /// travel with a `virtio_net_hdr` in front. Shared: the caller keeps
    /// the tap (it made it in the pod's network namespace) and the backend
    /// hands it to the device.
    pub tap: Arc<OwnedFd>,
    /// The guest interface's MAC address.
    pub mac: [u8; 6],
}

impl VmSpec {
    /// The hybrid vsock socket through which the host dials guest ports,
    /// whichever backend runs the VM.
    fn vsock_socket(&self) -> PathBuf {
        self.run_dir.join(&self.id).join(HYBRID_VSOCK_SOCKET)
    }
}

/// How the hypervisor started, for logs and the boot timeline.
#[derive(Debug, Clone)]
pub struct StartInfo {
    pub accel: Accel,
    /// Why this accelerator was chosen.
    pub accel_reason: String,
    /// From the call of `start` until the VM was running.
    pub spawn: Duration,
}

/// Why a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off or reset itself.
    GuestShutdown,
    /// `stop` ended it.
    Stopped,
    /// The hypervisor or one of its helpers failed, with its own words.
    Failed(String),
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::GuestShutdown => f.write_str("the guest shut down"),
            VmExit::Stopped => f.write_str("the VM was stopped"),
            VmExit::Failed(why) => write!(f, "the hypervisor failed: {why}"),
        }
    }
}

/// Waits for a VM's end; any number of them may wait.
#[derive(Debug, Clone)]
pub struct ExitWatch(watch::Receiver<Option<VmExit>>);

impl ExitWatch {
    /// Resolves once the VM has ended and every helper process is reaped.
    pub async fn wait(&mut self) -> VmExit {
        match self.0.wait_for(Option::is_some).await {
            Ok(exit) => exit.clone().expect("waited for Some"),
            // The sender only goes away after sending the exit, or when the
            // runtime shuts down, and then nobody is left to wait anyway.
            Err(_) => VmExit::Failed("the VM supervisor went away".into()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("{what} {path} not found: {fix}")]
    MissingFile {
        what: &'static str,
        path: PathBuf,
        fix: &'static str,
    },
    #[error("{what} `{program}` not found: {fix}")]
    MissingProgram {
        what: &'static str,
        program: PathBuf,
        fix: &'static str,
    },
    #[error("cannot choose an accelerator: {0}")]
    Accel(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{what} failed to start: {detail}")]
    StartFailed { what: &'static str, detail: String },
    #[error("the VM was already started")]
    AlreadyStarted,
    /// The VM has not started, or has ended.
    #[error("the VM is not running: {0}")]
    NotRunning(String),
    /// A device to attach that cannot be one.
    #[error("cannot attach {path} as a block device: {reason}")]
    BadBlockDevice { path: PathBuf, reason: String },
    /// Every slot that could take the device holds one.
    #[error("no free slot for {path}: {reason}")]
    NoFreeSlot { path: PathBuf, reason: String },
    /// A slot that holds no device attached by `attach_block`.
    #[error("slot {slot} holds no attached block device: {reason}")]
    NoBlockInSlot { slot: u32, reason: String },
    /// A QMP command QEMU refused, with its own description.
    #[error("QEMU refused QMP command `{command}`: {desc}")]
    Qmp { command: String, desc: String },
    /// The QMP connection itself failed.
    #[error("QMP {context}: {detail}")]
    QmpConnection { context: String, detail: String },
    /// The builtin VMM refused a hot-plug operation.
    #[error("the builtin VMM {what}: {detail}")]
    Vmm { what: String, detail: String },
}

/// A host block device or regular image file to attach to a running VM,
/// used raw: the guest sees its bytes as a virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    pub path: PathBuf,
    /// The guest sees a read-only disk, and the host opens it read-only.
    pub read_only: bool,
}

/// What a [`BlockDevice`]'s path is on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    File,
    BlockDevice,
}

impl BlockDevice {
    /// Checks that the path exists and is a regular file or a block device.
    pub fn check(&self) -> Result<BlockKind, HypervisorError> {
        let bad = |reason: String| HypervisorError::BadBlockDevice {
            path: self.path.clone(),
            reason,
        };
        if !self.path.is_absolute() {
            return Err(bad("the path must be absolute".into()));
        }
        let metadata = std::fs::metadata(&self.path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => bad("no such file or device".into()),
            _ => bad(e.to_string()),
        })?;
        let file_type = metadata.file_type();
        if file_type.is_file() {
            Ok(BlockKind::File)
        } else if file_type.is_block_device() {
            Ok(BlockKind::BlockDevice)
        } else {
            let what = if file_type.is_dir() {
                "a directory"
            } else if file_type.is_char_device() {
                "a character device"
            } else {
                "neither a regular file nor a block device"
            };
            Err(bad(format!(
                "it is {what}; give a raw image file or a block device (a loop device, say)"
            )))
        }
    }
}

/// A pod VM's hypervisor.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Checks the inputs, starts the VM and returns once it runs. On error
    /// nothing is left running and no file is left behind.
    async fn start(&mut self) -> Result<StartInfo, HypervisorError>;

    /// The hybrid vsock Unix socket through which the host dials guest ports.
    fn vsock_socket(&self) -> PathBuf;

    /// The PIDs of the host processes that make up the VM.
    fn pids(&self) -> Vec<u32>;

    /// Watches for the VM's end. Only valid after a successful `start`.
    fn exit_watch(&self) -> Option<ExitWatch>;

    /// Attaches `device` to the running VM as a virtio-blk disk and returns
    /// its slot: the N of the guest's platform device `virtio-mmio.N`,
    /// which the guest agent then binds (`PlugVirtioMmio`).
    async fn attach_block(&self, device: &BlockDevice) -> Result<u32, HypervisorError>;

    /// Empties `slot`, which `attach_block` returned, so that the host lets
    /// go of the device. The guest must have unbound the slot first
    /// (`UnplugVirtioMmio`).
    async fn detach_block(&self, slot: u32) -> Result<(), HypervisorError>;

    /// Slots whose placeholder device the guest found at boot: they are
    /// bound to the virtio-mmio driver, so the owner unbinds them in the
    /// guest once the agent answers, for a later bind to probe afresh.
    fn standby_slots(&self) -> Vec<u32>;

    /// Ends the VM: a polite request, then a kill after `grace`. Reaps every
    /// helper and removes the VM's directory. Safe to call more than once.
    async fn stop(&mut self, grace: Duration) -> VmExit;
}

/// Whether `kind` can pass host PCI functions through (VFIO): Ok, or why
/// not, so that callers choose before they bind anything to vfio-pci.
pub fn vfio_support(kind: HypervisorKind) -> Result<(), &'static str> {
    match kind {
        HypervisorKind::Builtin => Ok(()),
        HypervisorKind::Qemu => Err(qemu::NO_VFIO),
    }
}

/// The guest's PCI address of `VmSpec.vfio_devices[index]`: the builtin
/// VMM puts the functions on bus 0 as devices 1, 2, ... in the list's
/// order (device 0 is its host bridge).
pub fn guest_pci_address(index: usize) -> String {
    format!("0000:00:{:02x}.0", index + 1)
}

/// The hypervisor the configuration names, for `spec`.
pub fn create(config: &Config, spec: VmSpec) -> Box<dyn Hypervisor> {
    match config.hypervisor {
        HypervisorKind::Builtin => Box::new(BuiltinVm::new(spec, config.builtin.clone())),
        HypervisorKind::Qemu => Box::new(QemuVm::new(spec, config.qemu.clone())),
    }
}

/// Ok if a VM whose exit watch is `exit` (None: never started) still
/// runs; else why not, from how it ended (`ended`, once stopped).
fn ensure_running(exit: Option<&ExitWatch>, ended: Option<&VmExit>) -> Result<(), HypervisorError> {
    let Some(exit) = exit else {
        return Err(HypervisorError::NotRunning(match ended {
            Some(exit) => exit.to_string(),
            None => "it has not been started".into(),
        }));
    };
    match exit.0.borrow().as_ref() {
        Some(exit) => Err(HypervisorError::NotRunning(exit.to_string())),
        None => Ok(()),
    }
}

/// Checks that the guest kernel and the guest's root exist, naming the
/// fix: the initramfs, or `root_image` where the backend boots from one.
fn check_boot_files(spec: &VmSpec, root_image: Option<&Path>) -> Result<(), HypervisorError> {
    if !spec.kernel.is_file() {
        return Err(HypervisorError::MissingFile {
            what: "guest kernel",
            path: spec.kernel.clone(),
            fix: "build it with scripts/build-kernel.sh (or run scripts/install.sh) and set \
                  vm.kernel in the runv config",
        });
    }
    match root_image {
        Some(image) if !image.is_file() => Err(HypervisorError::MissingFile {
            what: "guest root image",
            path: image.to_owned(),
            fix: "build it with scripts/build-initramfs.sh (or run scripts/install.sh), or \
                  remove builtin.root_image from the runv config to boot from vm.initramfs",
        }),
        Some(_) => Ok(()),
        None if !spec.initramfs.is_file() => Err(HypervisorError::MissingFile {
            what: "guest initramfs",
            path: spec.initramfs.clone(),
            fix: "build it with scripts/build-initramfs.sh (or run scripts/install.sh) and set \
                  vm.initramfs in the runv config",
        }),
        None => Ok(()),
    }
}
