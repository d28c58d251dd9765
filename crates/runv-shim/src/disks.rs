//! The pod's disks: container root file systems and volumes whose source is
//! a block device (a loop device, a raw disk, a devmapper volume) or a raw
//! image file. Each goes into the running pod VM as a hot-plugged
//! virtio-blk disk, which the agent mounts under [`GUEST_DISKS_DIR`]; the
//! container then gets a bind of that guest mount. Containers of the pod
//! that name the same source share its disk, and the disk is unplugged when
//! the last of them is deleted.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
};

use containerd_shim::protos::api::Mount;
use runv_sandbox::{BlockDevice, PodVm};
use serde_json::{Map, Value};

use crate::error::{Result, ShimError};

/// Where the agent mounts the pod's disks, one directory per slot.
const GUEST_DISKS_DIR: &str = "/run/runv/disks";

/// Mount options with a meaning on the host only: how the host made the
/// mount (a loop device, a bind) and its propagation.
const HOST_ONLY_OPTIONS: [&str; 12] = [
    "loop",
    "bind",
    "rbind",
    "private",
    "rprivate",
    "shared",
    "rshared",
    "slave",
    "rslave",
    "unbindable",
    "runbindable",
    "defaults",
];

/// A file system on a block device or image, to be mounted in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskMount {
    /// The host block device or image file.
    pub source: PathBuf,
    /// Empty: the agent detects it, as mount(8) does.
    pub fs_type: String,
    /// mount(8) options for the guest's mount.
    pub options: Vec<String>,
    pub read_only: bool,
}

impl DiskMount {
    fn new(source: PathBuf, fs_type: &str, options: &[String]) -> DiskMount {
        let fs_type = match fs_type {
            "bind" | "rbind" | "none" => "",
            other => other,
        };
        let options: Vec<String> = options
            .iter()
            .filter(|o| !HOST_ONLY_OPTIONS.contains(&o.as_str()))
            .cloned()
            .collect();
        DiskMount {
            source,
            fs_type: fs_type.to_owned(),
            read_only: options.iter().any(|o| o == "ro"),
            options,
        }
    }

    /// The container's root file system, when containerd's rootfs mounts
    /// are a single block file system (devmapper's `ext4` on a device, a
    /// `loop` mount of an image) rather than layers to share.
    pub fn rootfs(mounts: &[Mount]) -> Option<DiskMount> {
        let [mount] = mounts else { return None };
        let source = Path::new(&mount.source);
        is_disk_source(source, &mount.type_, &mount.options)
            .then(|| DiskMount::new(source.to_owned(), &mount.type_, &mount.options))
    }

    /// A mount of the OCI spec that is a disk: its source is a block device
    /// (mounted at the destination, not bound as a device node under /dev)
    /// or an image file mounted with `loop`.
    pub fn volume(mount: &Map<String, Value>) -> Option<DiskMount> {
        let field = |key: &str| mount.get(key).and_then(Value::as_str).unwrap_or_default();
        let source = Path::new(field("source"));
        if !source.is_absolute() || Path::new(field("destination")).starts_with("/dev") {
            return None;
        }
        let options: Vec<String> = mount
            .get("options")
            .and_then(Value::as_array)
            .map(|options| {
                options
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        is_disk_source(source, field("type"), &options)
            .then(|| DiskMount::new(source.to_owned(), field("type"), &options))
    }
}

/// A block device, or a regular file that a non-bind mount names with the
/// `loop` option.
fn is_disk_source(source: &Path, fs_type: &str, options: &[String]) -> bool {
    match fs::metadata(source) {
        Ok(meta) if meta.file_type().is_block_device() => true,
        Ok(meta) => {
            meta.is_file()
                && !matches!(fs_type, "bind" | "rbind")
                && options.iter().any(|o| o == "loop")
        }
        Err(_) => false,
    }
}

/// A disk plugged into the pod VM.
struct PluggedDisk {
    slot: u32,
    read_only: bool,
    /// Its node in the guest, e.g. "/dev/vdb", and that node's number.
    guest_device: String,
    guest_number: (u32, u32),
    /// Where the agent mounted it; none while its containers only use it
    /// as a raw device (see `devices`).
    guest_mount: Option<PathBuf>,
    /// The containers that use it.
    users: BTreeSet<String>,
}

/// The disks plugged into the pod VM, by host source.
#[derive(Default)]
pub struct PodDisks {
    plugged: HashMap<PathBuf, PluggedDisk>,
}

impl PodDisks {
    /// Plugs `disk` into the VM for `container_id` and mounts it there (or
    /// joins the disk already plugged from the same source), and returns
    /// the guest mount point. On error the container may still be among
    /// the disk's users: [`PodDisks::release`] lets go of it.
    pub async fn attach(
        &mut self,
        vm: &PodVm,
        container_id: &str,
        disk: &DiskMount,
    ) -> Result<PathBuf> {
        let plugged = self
            .plug(vm, container_id, &disk.source, disk.read_only)
            .await?;
        if let Some(guest_mount) = &plugged.guest_mount {
            return Ok(guest_mount.clone());
        }
        let guest_mount = Path::new(GUEST_DISKS_DIR).join(plugged.slot.to_string());
        vm.agent()
            .mount(
                &plugged.guest_device,
                &disk.fs_type,
                &disk.options,
                &guest_mount.to_string_lossy(),
            )
            .await
            .map_err(|e| {
                ShimError::InvalidArgument(format!(
                    "cannot mount {} (guest {}) in the pod VM: {e}",
                    disk.source.display(),
                    plugged.guest_device
                ))
            })?;
        plugged.guest_mount = Some(guest_mount.clone());
        Ok(guest_mount)
    }

    /// Plugs the block device `source` into the VM for `container_id` to
    /// use raw, unmounted (or joins the disk already plugged from it), and
    /// returns the guest's device number for it.
    pub async fn attach_raw(
        &mut self,
        vm: &PodVm,
        container_id: &str,
        source: &Path,
        read_only: bool,
    ) -> Result<(u32, u32)> {
        let plugged = self.plug(vm, container_id, source, read_only).await?;
        Ok(plugged.guest_number)
    }

    /// The disk plugged from `source`, plugged now if no container of the
    /// pod has it yet, with `container_id` among its users.
    async fn plug(
        &mut self,
        vm: &PodVm,
        container_id: &str,
        source: &Path,
        read_only: bool,
    ) -> Result<&mut PluggedDisk> {
        let key = fs::canonicalize(source)
            .map_err(|e| ShimError::InvalidArgument(format!("disk {}: {e}", source.display())))?;
        if !self.plugged.contains_key(&key) {
            let device = BlockDevice {
                path: key.clone(),
                read_only,
            };
            let block = vm.plug_block(&device).await.map_err(|e| {
                ShimError::Internal(format!(
                    "cannot plug {} into the pod VM: {e}",
                    source.display()
                ))
            })?;
            let disk = PluggedDisk {
                slot: block.slot,
                read_only,
                guest_device: block.guest_device,
                guest_number: block.guest_number,
                guest_mount: None,
                users: BTreeSet::new(),
            };
            self.plugged.insert(key.clone(), disk);
        }
        let plugged = self.plugged.get_mut(&key).expect("plugged above");
        if plugged.read_only && !read_only {
            return Err(ShimError::FailedPrecondition(format!(
                "{} is already in the pod read-only; a container cannot have it read-write \
                 (give every container `ro`, or none)",
                source.display()
            )));
        }
        plugged.users.insert(container_id.to_owned());
        Ok(plugged)
    }

    /// Lets go of `container_id`'s disks: those it was the last user of are
    /// unmounted in the guest and unplugged.
    pub async fn release(&mut self, vm: &PodVm, container_id: &str) {
        let unused: Vec<PathBuf> = self
            .plugged
            .iter_mut()
            .filter_map(|(source, disk)| {
                (disk.users.remove(container_id) && disk.users.is_empty()).then(|| source.clone())
            })
            .collect();
        for source in unused {
            let disk = self.plugged.remove(&source).expect("listed above");
            if let Some(guest_mount) = &disk.guest_mount {
                if let Err(e) = vm.agent().unmount(&guest_mount.to_string_lossy()).await {
                    // Unplugging a mounted disk would lose the guest's
                    // unwritten data: the disk stays until the VM goes.
                    tracing::error!(disk = %source.display(), error = %e,
                        "cannot unmount the disk in the guest; it stays plugged until the pod ends");
                    continue;
                }
            }
            unplug(vm, disk.slot, &source).await;
        }
    }
}

async fn unplug(vm: &PodVm, slot: u32, source: &Path) {
    if let Err(e) = vm.unplug_block(slot).await {
        tracing::error!(disk = %source.display(), slot, error = %e, "cannot unplug the disk");
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn mount(type_: &str, source: &Path, options: &[&str]) -> Mount {
        Mount {
            type_: type_.into(),
            source: source.to_string_lossy().into_owned(),
            options: options.iter().map(|o| o.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn loop_images_and_block_devices_are_disks() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("rootfs.img");
        fs::write(&image, b"").unwrap();
        let rootfs = DiskMount::rootfs(&[mount("ext4", &image, &["loop", "ro"])]).unwrap();
        assert_eq!(rootfs.fs_type, "ext4");
        assert_eq!(rootfs.options, vec!["ro"]);
        assert!(rootfs.read_only);
        // Without `loop` an image is not a file system to mount.
        assert_eq!(DiskMount::rootfs(&[mount("ext4", &image, &[])]), None);
        // Layers are shared, not plugged.
        let overlay = mount("overlay", Path::new("overlay"), &["lowerdir=/a"]);
        assert_eq!(DiskMount::rootfs(&[overlay]), None);

        if let Some(device) = ["/dev/loop0", "/dev/vda", "/dev/sda"]
            .iter()
            .map(Path::new)
            .find(|p| p.exists())
        {
            let disk = DiskMount::rootfs(&[mount("xfs", device, &["rw"])]).unwrap();
            assert!(!disk.read_only);
            let bind = json!({"destination": "/data", "type": "bind",
                "source": device, "options": ["rbind", "rprivate", "ro"]});
            let volume = DiskMount::volume(bind.as_object().unwrap()).unwrap();
            assert_eq!(volume.fs_type, "", "detected in the guest");
            assert_eq!(volume.options, vec!["ro"]);
            let node = json!({"destination": "/dev/xvda", "type": "bind", "source": device});
            assert_eq!(DiskMount::volume(node.as_object().unwrap()), None);
        }
    }

    #[test]
    fn directories_and_relative_sources_are_not_disks() {
        let dir = tempfile::tempdir().unwrap();
        let bind = json!({"destination": "/data", "type": "bind",
            "source": dir.path(), "options": ["rbind", "loop"]});
        assert_eq!(DiskMount::volume(bind.as_object().unwrap()), None);
        let proc = json!({"destination": "/proc", "type": "proc", "source": "proc"});
        assert_eq!(DiskMount::volume(proc.as_object().unwrap()), None);
    }
}
