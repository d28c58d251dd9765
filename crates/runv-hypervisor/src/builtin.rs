//! The `builtin` backend: the pod VM runs inside this process, on runv-vmm.
//! There is no helper process at all; the guest's vsock is served by the
//! VMM's own virtio-vsock device behind the same hybrid Unix socket as the
//! qemu path, so the agent client cannot tell the two apart, and a shared
//! directory by its in-process virtio-fs device under the same tag as
//! virtiofsd's.

use std::{
    collections::BTreeSet,
    fs::File,
    path::PathBuf,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use runv_config::BuiltinConfig;
use runv_protocol::SHARED_FS_TAG;
use runv_vmm::{
    device_manager::SlotIndex, mptable, BlockConfig, FsConfig, GuestRoot, MicroVm, MicroVmConfig,
    NetConfig, VfioConfig, VmEnd, VmmError, VsockConfig,
};
use tokio::sync::watch;

use crate::{
    check_boot_files, ensure_running,
    host::{builtin_usable, KvmSupport},
    run_dir::RunDir,
    Accel, BlockDevice, ExitWatch, Hypervisor, HypervisorError, StartInfo, VmExit, VmSpec,
    BASE_KERNEL_PARAMS,
};

/// The guest's vsock context id, as on the qemu path.
const GUEST_CID: u64 = 3;

struct Running {
    vm: Arc<MicroVm>,
    /// Holds the VM's vsock socket: removed once the VM is gone.
    dir: RunDir,
    exit: ExitWatch,
    /// The slots `attach_block` filled: only those may `detach_block`
    /// empty (not the vsock's, say).
    blocks: Mutex<BTreeSet<u32>>,
}

/// A pod VM run by the in-process VMM.
pub struct BuiltinVm {
    spec: VmSpec,
    config: BuiltinConfig,
    running: Option<Running>,
    /// How the VM ended, once `stop` has seen it.
    ended: Option<VmExit>,
}

impl BuiltinVm {
    pub fn new(spec: VmSpec, config: BuiltinConfig) -> BuiltinVm {
        BuiltinVm {
            spec,
            config,
            running: None,
            ended: None,
        }
    }

    /// What the VMM boots: runv's kernel parameters come first, the
    /// caller's last, so that an operator's parameter wins.
    fn machine_config(&self) -> Result<MicroVmConfig, HypervisorError> {
        let spec = &self.spec;
        let console = File::create(&spec.console_log).map_err(|source| HypervisorError::Io {
            context: format!(
                "cannot create the console log {}",
                spec.console_log.display()
            ),
            source,
        })?;
        // The MP table, which tells the guest its CPUs, bounds the count.
        let vcpus = u8::try_from(spec.vcpus)
            .ok()
            .filter(|vcpus| *vcpus <= mptable::MAX_VCPUS)
            .ok_or_else(|| {
                HypervisorError::Accel(format!(
                    "{} vCPUs asked; the builtin hypervisor runs at most {}",
                    spec.vcpus,
                    mptable::MAX_VCPUS
                ))
            })?;
        // The caller keeps its tap; the device gets a descriptor of its
        // own (which shares the open file: the device makes it
        // non-blocking and sets its header size and offloads).
        let net_devices = spec
            .net_devices
            .iter()
            .enumerate()
            .map(|(index, net)| {
                let tap = net.tap.try_clone().map_err(|source| HypervisorError::Io {
                    context: format!("cannot duplicate the tap of network interface {index}"),
                    source,
                })?;
                Ok(NetConfig { tap, mac: net.mac })
            })
            .collect::<Result<Vec<_>, HypervisorError>>()?;
        Ok(MicroVmConfig {
            name: spec.id.clone(),
            kernel: spec.kernel.clone(),
            root: match &self.config.root_image {
                Some(image) => GuestRoot::PmemImage(image.clone()),
                None => GuestRoot::Initramfs(spec.initramfs.clone()),
            },
            kernel_params: format!("{BASE_KERNEL_PARAMS} {}", spec.kernel_params)
                .trim_end()
                .to_owned(),
            vcpus,
            memory_bytes: u64::from(spec.memory_mib) << 20,
            console: Box::new(console),
            vsock: Some(VsockConfig {
                guest_cid: GUEST_CID,
                uds_path: self.spec.vsock_socket(),
            }),
            // In the slots after the vsock's and the shared directory's,
            // in order: the guest's eth0 is the first.
            net_devices,
            // The in-process FUSE server runs in this process's mount
            // namespace: whatever is mounted under the directory later
            // (container root file systems) is seen at once.
            filesystems: spec
                .shared_dir
                .iter()
                .map(|shared_dir| FsConfig {
                    tag: SHARED_FS_TAG.to_owned(),
                    shared_dir: shared_dir.clone(),
                    read_only: false,
                })
                .collect(),
            vfio_devices: spec
                .vfio_devices
                .iter()
                .map(|sysfs_path| VfioConfig {
                    sysfs_path: sysfs_path.clone(),
                })
                .collect(),
            free_page_reporting: self.config.free_page_reporting,
            share_boot_files: self.config.share_boot_files,
        })
    }
}

#[async_trait]
impl Hypervisor for BuiltinVm {
    async fn start(&mut self) -> Result<StartInfo, HypervisorError> {
        if self.running.is_some() || self.ended.is_some() {
            return Err(HypervisorError::AlreadyStarted);
        }
        let begin = Instant::now();
        check_boot_files(&self.spec, self.config.root_image.as_deref())?;
        if let Some(dir) = &self.spec.shared_dir {
            if !dir.is_dir() {
                return Err(HypervisorError::MissingFile {
                    what: "shared directory",
                    path: dir.clone(),
                    fix: "create it before starting the VM",
                });
            }
        }
        let kvm = KvmSupport::probe();
        let accel_reason =
            builtin_usable(&kvm, self.config.pvm_guest_kernel).map_err(HypervisorError::Accel)?;
        // PVM is a KVM backend; the reason says which one ran.
        let accel = Accel::Kvm;
        tracing::info!(vm = %self.spec.id, %accel, reason = %accel_reason, "starting the builtin VM");
        let dir = RunDir::for_vm(&self.spec)?;
        let config = self.machine_config()?;
        let (exit_tx, exit_rx) = watch::channel(None);
        // The VMM reports the end from its own thread; the watch is how
        // async waiters learn of it.
        let on_end = Box::new(move |end: VmEnd| {
            let _ = exit_tx.send(Some(vm_exit(end)));
        });
        // Building the VM (memory, kernel load, KVM setup) blocks: keep it
        // off the runtime's worker.
        let vm = tokio::task::spawn_blocking(move || MicroVm::start(config, on_end))
            .await
            .map_err(|e| HypervisorError::StartFailed {
                what: "the builtin VMM",
                detail: e.to_string(),
            })?
            .map_err(|e| HypervisorError::StartFailed {
                what: "the builtin VMM",
                detail: e.to_string(),
            })?;
        let vm = Arc::new(vm);
        tokio::spawn(reset_devices_at_end(
            Arc::downgrade(&vm),
            ExitWatch(exit_rx.clone()),
        ));
        self.running = Some(Running {
            dir,
            vm,
            exit: ExitWatch(exit_rx),
            blocks: Mutex::default(),
        });
        Ok(StartInfo {
            accel,
            accel_reason,
            spawn: begin.elapsed(),
        })
    }

    fn vsock_socket(&self) -> PathBuf {
        self.spec.vsock_socket()
    }

    /// None: the VM lives in this process.
    fn pids(&self) -> Vec<u32> {
        Vec::new()
    }

    fn exit_watch(&self) -> Option<ExitWatch> {
        self.running.as_ref().map(|r| r.exit.clone())
    }

    /// Puts a virtio-blk device in the first free slot of the VM's 16; the
    /// slot index is the guest's `virtio-mmio.N` (the VMM names every slot
    /// explicitly on the kernel command line).
    async fn attach_block(&self, device: &BlockDevice) -> Result<u32, HypervisorError> {
        device.check()?;
        let running = self.running()?;
        let config = BlockConfig {
            path: device.path.clone(),
            read_only: device.read_only,
            serial: String::new(),
        };
        let slot = running.vm.attach_block(config).map_err(|e| match e {
            VmmError::NoFreeSlot { slots } => HypervisorError::NoFreeSlot {
                path: device.path.clone(),
                reason: format!(
                    "all {slots} virtio-mmio slots of this builtin VM hold a device (the vsock \
                     and a shared directory take one each); the slots are declared on the \
                     guest's kernel command line at boot (docs/hotplug.md): detach a device \
                     first"
                ),
            },
            other => HypervisorError::Vmm {
                what: format!("cannot attach {}", device.path.display()),
                detail: other.to_string(),
            },
        })?;
        let slot = u32::try_from(slot.0).expect("at most 16 slots");
        running.blocks.lock().expect("blocks lock").insert(slot);
        tracing::info!(vm = %self.spec.id, slot, path = %device.path.display(),
            read_only = device.read_only, "block device attached");
        Ok(slot)
    }

    async fn detach_block(&self, slot: u32) -> Result<(), HypervisorError> {
        let running = self.running()?;
        if !running.blocks.lock().expect("blocks lock").contains(&slot) {
            return Err(HypervisorError::NoBlockInSlot {
                slot,
                reason: "attach_block did not fill it".into(),
            });
        }
        running
            .vm
            .detach(SlotIndex(slot as usize))
            .map_err(|e| HypervisorError::Vmm {
                what: format!("cannot empty slot {slot}"),
                detail: e.to_string(),
            })?;
        running.blocks.lock().expect("blocks lock").remove(&slot);
        tracing::info!(vm = %self.spec.id, slot, "block device detached");
        Ok(())
    }

    /// None: a slot the VMM fills after boot is empty while the guest
    /// probes at boot, so the guest never bound it.
    fn standby_slots(&self) -> Vec<u32> {
        Vec::new()
    }

    /// The guest has been asked to power off by the agent before this is
    /// called; what is left is to end the vCPUs, which takes no grace: an
    /// in-process VM cannot ignore its owner.
    async fn stop(&mut self, _grace: Duration) -> VmExit {
        let Some(Running {
            vm, dir, mut exit, ..
        }) = self.running.take()
        else {
            return self.ended.clone().unwrap_or(VmExit::Stopped);
        };
        // Joining the VM's threads blocks; the last reference to the VM
        // goes with it, closing its devices and sockets.
        let _ = tokio::task::spawn_blocking(move || vm.shutdown()).await;
        let ended = exit.wait().await;
        drop(dir);
        self.ended = Some(ended.clone());
        ended
    }
}

impl BuiltinVm {
    /// The running VM, or why there is none.
    fn running(&self) -> Result<&Running, HypervisorError> {
        let exit = self.running.as_ref().map(|running| &running.exit);
        ensure_running(exit, self.ended.as_ref())?;
        Ok(self.running.as_ref().expect("checked above"))
    }
}

/// Once the guest has ended the VM (a reset, a crash), resets its devices:
/// the shim's agent calls and stdio streams on the vsock then end at once
/// instead of waiting on a guest that is gone, and its tasks are reported
/// exited. A VM its owner has dropped needs nothing.
async fn reset_devices_at_end(vm: Weak<MicroVm>, mut exit: ExitWatch) {
    exit.wait().await;
    if let Some(vm) = vm.upgrade() {
        let _ = tokio::task::spawn_blocking(move || vm.devices().reset_all()).await;
    }
}

fn vm_exit(end: VmEnd) -> VmExit {
    match end {
        VmEnd::GuestReset => VmExit::GuestShutdown,
        VmEnd::Stopped => VmExit::Stopped,
        VmEnd::Failed(why) => VmExit::Failed(why),
    }
}

#[cfg(test)]
mod tests {
    use runv_vmm::testing::{namespaced_tap, print, pvh_image, RESET, SPIN};

    use super::*;

    fn spec(dir: &std::path::Path) -> VmSpec {
        VmSpec {
            id: "vm1".into(),
            kernel: dir.join("vmlinux"),
            initramfs: dir.join("initrd"),
            kernel_params: String::new(),
            vcpus: 1,
            memory_mib: 128,
            run_dir: dir.to_owned(),
            console_log: dir.join("console.log"),
            shared_dir: None,
            net_devices: Vec::new(),
            vfio_devices: Vec::new(),
        }
    }

    #[tokio::test]
    async fn missing_boot_files_are_named_and_nothing_is_left() {
        let tmp = tempfile::tempdir().unwrap();
        let mut vm = BuiltinVm::new(spec(tmp.path()), BuiltinConfig::default());
        let err = vm.start().await.unwrap_err().to_string();
        assert!(
            err.contains("guest kernel") && err.contains("build-kernel.sh"),
            "{err}"
        );
        assert!(!tmp.path().join("vm1").exists(), "no VM directory is left");
        assert!(vm.exit_watch().is_none());
    }

    /// A configured root image that is not there is named with the fix,
    /// even where the initramfs is.
    #[tokio::test]
    async fn a_missing_root_image_is_named_with_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("vmlinux"), "").unwrap();
        std::fs::write(tmp.path().join("initrd"), "").unwrap();
        let config = BuiltinConfig {
            root_image: Some(tmp.path().join("runv-root.img")),
            ..BuiltinConfig::default()
        };
        let mut vm = BuiltinVm::new(spec(tmp.path()), config);
        let err = vm.start().await.unwrap_err().to_string();
        assert!(
            err.contains("guest root image")
                && err.contains("runv-root.img")
                && err.contains("builtin.root_image"),
            "{err}"
        );
        assert!(!tmp.path().join("vm1").exists(), "no VM directory is left");
    }

    /// On a host whose KVM cannot boot an ordinary guest (this project's
    /// PVM machines among them), start fails before anything is created,
    /// naming the qemu hypervisor as the way out.
    #[tokio::test]
    async fn a_host_that_cannot_boot_the_guest_is_told_to_use_qemu() {
        let kvm = KvmSupport::probe();
        if builtin_usable(&kvm, false).is_ok() {
            println!("SKIPPED: this host's KVM can boot the guest with the builtin hypervisor");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("vmlinux"), "").unwrap();
        std::fs::write(tmp.path().join("initrd"), "").unwrap();
        let mut vm = BuiltinVm::new(spec(tmp.path()), BuiltinConfig::default());
        let err = vm.start().await.unwrap_err().to_string();
        assert!(err.contains("hypervisor = \"qemu\""), "{err}");
        assert!(!tmp.path().join("vm1").exists(), "no VM directory is left");
        assert!(
            !tmp.path().join("console.log").exists(),
            "no console log is left"
        );
    }

    /// A VM whose "kernel" is `code` behind a PVH entry (runv_vmm::testing),
    /// which runs wherever KVM runs protected-mode code, PVM hosts included.
    fn payload_vm(dir: &std::path::Path, code: &[u8]) -> Option<BuiltinVm> {
        if let KvmSupport::Unavailable(why) = KvmSupport::probe() {
            println!("SKIPPED: {why}");
            return None;
        }
        std::fs::write(dir.join("vmlinux"), pvh_image(code)).unwrap();
        std::fs::write(dir.join("initrd"), "").unwrap();
        // The payload runs on a PVM host as a PVM guest kernel would.
        let config = BuiltinConfig {
            pvm_guest_kernel: true,
            ..BuiltinConfig::default()
        };
        Some(BuiltinVm::new(spec(dir), config))
    }

    /// Waits for the started `vm`'s payload to end it (RESET), then stops
    /// it; returns what the payload printed.
    async fn console_after_guest_shutdown(vm: &mut BuiltinVm, dir: &std::path::Path) -> String {
        let mut exit = vm.exit_watch().unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(20), exit.wait())
            .await
            .expect("the guest ends the VM");
        assert_eq!(ended, VmExit::GuestShutdown);
        assert_eq!(vm.stop(Duration::ZERO).await, VmExit::GuestShutdown);
        std::fs::read_to_string(dir.join("console.log")).unwrap()
    }

    #[tokio::test]
    async fn a_guest_reset_ends_the_vm_and_its_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let code = [print(b"up\n").as_slice(), &RESET].concat();
        let Some(mut vm) = payload_vm(tmp.path(), &code) else {
            return;
        };
        let info = vm.start().await.expect("the VM starts");
        assert_eq!(info.accel, Accel::Kvm);
        assert!(vm.pids().is_empty(), "no helper process");
        assert_eq!(
            console_after_guest_shutdown(&mut vm, tmp.path()).await,
            "up\n"
        );
        assert!(!tmp.path().join("vm1").exists(), "the VM directory is gone");
        assert!(matches!(
            vm.start().await,
            Err(HypervisorError::AlreadyStarted)
        ));
    }

    #[tokio::test]
    async fn stop_ends_a_running_guest_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let Some(mut vm) = payload_vm(tmp.path(), &SPIN) else {
            return;
        };
        // With a shared directory, served by the in-process virtio-fs.
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        vm.spec.shared_dir = Some(shared.clone());
        vm.start().await.expect("the VM starts");
        assert!(
            vm.vsock_socket().exists(),
            "the hybrid vsock socket listens"
        );
        assert_eq!(vm.stop(Duration::ZERO).await, VmExit::Stopped);
        assert_eq!(
            vm.stop(Duration::ZERO).await,
            VmExit::Stopped,
            "twice is fine"
        );
        assert!(!tmp.path().join("vm1").exists(), "the VM directory is gone");
        assert!(
            shared.is_dir(),
            "the caller's shared directory is left alone"
        );
    }

    #[tokio::test]
    async fn a_missing_shared_directory_is_named_before_anything_starts() {
        let tmp = tempfile::tempdir().unwrap();
        let Some(mut vm) = payload_vm(tmp.path(), &SPIN) else {
            return;
        };
        vm.spec.shared_dir = Some(tmp.path().join("absent"));
        let err = vm.start().await.unwrap_err().to_string();
        assert!(
            err.contains("shared directory") && err.contains("absent"),
            "{err}"
        );
        assert!(!tmp.path().join("vm1").exists(), "no VM directory is left");
    }

    /// The guest finds its network interfaces in the slots after the
    /// vsock's (no shared directory here), in the spec's order, each a
    /// virtio-net device (ID 1) with its MAC in the configuration space:
    /// the payload prints slot 1's and slot 2's device ID and MAC bytes 1
    /// to 5, read through MMIO.
    #[tokio::test]
    async fn network_interfaces_are_cold_plugged_in_order() {
        let slot_base = |slot: u32| 0xd000_0000u32 + slot * 0x1000;
        let mut code = Vec::new();
        for slot in [1, 2] {
            let base = slot_base(slot);
            // mov eax, [base + DEVICE_ID]; add al, '0'; mov dx, 0x3f8; out dx, al
            code.push(0xa1);
            code.extend_from_slice(&(base + 8).to_le_bytes());
            code.extend_from_slice(&[0x04, b'0', 0x66, 0xba, 0xf8, 0x03, 0xee]);
            for byte in 1..6u32 {
                // mov al, [base + CONFIG + byte]; out dx, al
                code.push(0xa0);
                code.extend_from_slice(&(base + 0x100 + byte).to_le_bytes());
                code.push(0xee);
            }
            code.extend_from_slice(&print(b" "));
        }
        code.extend_from_slice(&print(b"\n"));
        code.extend_from_slice(&RESET);
        let tmp = tempfile::tempdir().unwrap();
        let Some(mut vm) = payload_vm(tmp.path(), &code) else {
            return;
        };
        let (eth0, eth1) = match (namespaced_tap("runvtest0"), namespaced_tap("runvtest1")) {
            (Ok(eth0), Ok(eth1)) => (eth0, eth1),
            (Err(why), _) | (_, Err(why)) => {
                println!("SKIPPED: no tap: {why}");
                return;
            }
        };
        let eth0 = std::sync::Arc::new(eth0);
        vm.spec.net_devices = vec![
            crate::NetDevice {
                tap: eth0.clone(),
                mac: [0x02, b'e', b't', b'h', b'_', b'0'],
            },
            crate::NetDevice {
                tap: std::sync::Arc::new(eth1),
                mac: [0x02, b'e', b't', b'h', b'_', b'1'],
            },
        ];
        vm.start().await.expect("the VM starts");
        assert_eq!(
            console_after_guest_shutdown(&mut vm, tmp.path()).await,
            "1eth_0 1eth_1 \n"
        );
        // The caller's descriptor is still open, on the same open file
        // the device had (which it made non-blocking).
        // SAFETY: F_GETFL on a descriptor the Arc keeps open.
        let flags = unsafe {
            nix::libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&*eth0), nix::libc::F_GETFL)
        };
        assert!(
            flags >= 0 && flags & nix::libc::O_NONBLOCK != 0,
            "{flags:#x}"
        );
    }

    /// Block devices go into free slots while the guest runs and come out
    /// again; errors name the path, the slot or the limit.
    #[tokio::test]
    async fn block_devices_fill_and_leave_slots() {
        let tmp = tempfile::tempdir().unwrap();
        let Some(mut vm) = payload_vm(tmp.path(), &SPIN) else {
            return;
        };
        let image = tmp.path().join("disk.img");
        std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
        let device = |path: &std::path::Path, read_only| BlockDevice {
            path: path.to_owned(),
            read_only,
        };
        let err = vm.attach_block(&device(&image, false)).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("the VM is not running: it has not been started"),
            "{err}"
        );
        vm.start().await.expect("the VM starts");
        assert!(vm.standby_slots().is_empty());

        let err = vm
            .attach_block(&device(&tmp.path().join("absent.img"), false))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("absent.img") && err.contains("no such file or device"),
            "{err}"
        );
        let err = vm
            .attach_block(&device(tmp.path(), false))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("it is a directory"), "{err}");

        // Slot 0 holds the vsock device, slot 1 the balloon.
        let rw = vm.attach_block(&device(&image, false)).await.unwrap();
        let ro = vm.attach_block(&device(&image, true)).await.unwrap();
        assert_eq!((rw, ro), (2, 3));
        let err = vm.detach_block(0).await.unwrap_err().to_string();
        assert!(
            err.contains("slot 0 holds no attached block device"),
            "{err}"
        );
        vm.detach_block(rw).await.unwrap();
        let err = vm.detach_block(rw).await.unwrap_err().to_string();
        assert!(err.contains("slot 2"), "{err}");
        // The freed slot is taken first; then every slot up to the 16th.
        for expected in [2].into_iter().chain(4..16) {
            let slot = vm.attach_block(&device(&image, true)).await.unwrap();
            assert_eq!(slot, expected);
        }
        let err = vm
            .attach_block(&device(&image, true))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no free slot for") && err.contains("all 16 virtio-mmio slots"),
            "{err}"
        );
        assert_eq!(vm.stop(Duration::ZERO).await, VmExit::Stopped);
        let err = vm.detach_block(ro).await.unwrap_err().to_string();
        assert!(
            err.contains("the VM is not running: the VM was stopped"),
            "{err}"
        );
    }
}
