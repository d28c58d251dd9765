//! A container of the pod: its processes, and what it holds on the host
//! and in the VM (the rootfs mounted in its bundle, its binds in the shared
//! directory, its disks and raw block devices).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use containerd_shim::protos::api::Mount;
use runv_protocol::GUEST_SHARED_DIR;

use crate::{
    devices,
    disks::DiskMount,
    error::{Result, ShimError},
    mounts,
    pod::Pod,
    process::Process,
    spec::{self, DiskPlacement, ROOTFS_SHARE},
};

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub init: Process,
    pub execs: HashMap<String, Process>,
    pub paused: bool,
    pub host: HostMounts,
}

impl Container {
    /// The process `exec_id` names (empty: the init process).
    pub fn process(&self, exec_id: &str) -> Result<&Process> {
        match exec_id {
            "" => Ok(&self.init),
            _ => self
                .execs
                .get(exec_id)
                .ok_or_else(|| no_exec(&self.id, exec_id)),
        }
    }

    pub fn process_mut(&mut self, exec_id: &str) -> Result<&mut Process> {
        match exec_id {
            "" => Ok(&mut self.init),
            _ => self
                .execs
                .get_mut(exec_id)
                .ok_or_else(|| no_exec(&self.id, exec_id)),
        }
    }
}

fn no_exec(container_id: &str, exec_id: &str) -> ShimError {
    ShimError::NotFound(format!("container {container_id} has no process {exec_id}"))
}

/// What a container holds on the host and in the pod VM, to be released
/// at its delete: the rootfs mounted in its bundle, its shares, its disks.
pub struct HostMounts {
    container_id: String,
    /// The bundle's rootfs, when the shim mounted it.
    mounted_rootfs: Option<PathBuf>,
}

impl HostMounts {
    /// Puts the container's root file system and volumes where the guest
    /// reaches them (disks plugged into the VM, everything else shared),
    /// and returns the guest's spec. On error nothing stays mounted or
    /// plugged.
    pub async fn prepare(
        pod: &mut Pod,
        container_id: &str,
        bundle: &Path,
        rootfs: &[Mount],
    ) -> Result<(HostMounts, Vec<u8>)> {
        let host_spec = spec::read(bundle).map_err(ShimError::InvalidArgument)?;
        let mut host = HostMounts {
            container_id: container_id.to_owned(),
            mounted_rootfs: None,
        };
        match host.place(pod, host_spec, bundle, rootfs).await {
            Ok(guest_spec) => Ok((host, guest_spec)),
            Err(e) => {
                host.release(pod).await;
                Err(e)
            }
        }
    }

    async fn place(
        &mut self,
        pod: &mut Pod,
        mut host_spec: serde_json::Value,
        bundle: &Path,
        rootfs: &[Mount],
    ) -> Result<Vec<u8>> {
        let id = self.container_id.as_str();
        // Before anything is plugged or mounted: a device the VM cannot
        // pass refuses the container.
        let host_blocks = devices::host_blocks(&host_spec)
            .map_err(|e| ShimError::InvalidArgument(format!("{}: {e}", bundle.display())))?;
        let vm = pod.vm();
        let mut plugged_blocks = Vec::new();
        for block in host_blocks {
            let guest_number = pod
                .disks
                .attach_raw(&vm, id, &block.node, block.read_only())
                .await?;
            plugged_blocks.push((block, guest_number));
        }
        let mut disks = DiskPlacement::default();
        let mut shared_root = None;
        match DiskMount::rootfs(rootfs) {
            Some(disk) => disks.root = Some(pod.disks.attach(&vm, id, &disk).await?),
            None if rootfs.is_empty() => shared_root = Some(host_root(&host_spec, bundle)?),
            None => {
                mounts::mount_bundle_rootfs(bundle, rootfs)
                    .await
                    .map_err(ShimError::Internal)?;
                self.mounted_rootfs = Some(mounts::bundle_rootfs(bundle));
                shared_root.clone_from(&self.mounted_rootfs);
            }
        }
        let volumes = host_spec
            .get("mounts")
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
            .filter_map(|(index, m)| Some((index, DiskMount::volume(m.as_object()?)?)));
        for (index, disk) in volumes.collect::<Vec<_>>() {
            let guest_mount = pod.disks.attach(&vm, id, &disk).await?;
            disks.volumes.insert(index, guest_mount);
        }
        spec::default_hostname(&mut host_spec, &node_hostname()?);
        let mount_points = spec::mount_points(&host_spec);
        let guest_dir = Path::new(GUEST_SHARED_DIR).join(id);
        let mut guest =
            spec::for_guest(host_spec, &guest_dir, &disks, pod.sandbox_init().as_slice())
                .map_err(|e| ShimError::InvalidArgument(format!("{}: {e}", bundle.display())))?;
        devices::for_guest(&mut guest.spec, &plugged_blocks);
        let shared = pod.shared();
        if let Some(root) = &shared_root {
            // readOnlyRootFilesystem holds on the host, not only in the
            // guest, which then cannot make its mount points itself.
            let read_only = guest
                .spec
                .pointer("/root/readonly")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false);
            if read_only {
                mounts::create_mount_points(root, &mount_points)
                    .map_err(|e| ShimError::Internal(e.to_string()))?;
            }
            shared
                .bind(id, ROOTFS_SHARE, root, read_only, false)
                .map_err(ShimError::Internal)?;
        }
        for bind in &guest.binds {
            shared
                .bind(
                    id,
                    &bind.share_name,
                    &bind.source,
                    bind.read_only,
                    bind.follows_host,
                )
                .map_err(ShimError::Internal)?;
        }
        Ok(serde_json::to_vec(&guest.spec).expect("a JSON value serializes"))
    }

    /// Unmounts, unshares and unplugs everything the container held.
    pub async fn release(self, pod: &mut Pod) {
        if let Err(e) = pod.shared().unshare(&self.container_id) {
            tracing::warn!(container = %self.container_id, error = %e, "cannot unshare");
        }
        let vm = pod.vm();
        pod.disks.release(&vm, &self.container_id).await;
        if let Some(rootfs) = &self.mounted_rootfs {
            if let Err(e) = mounts::unmount_tree(rootfs) {
                tracing::warn!(rootfs = %rootfs.display(), error = %e, "cannot unmount rootfs");
            }
        }
    }
}

/// The spec's own root, for a bundle that comes with its rootfs.
/// The node's hostname, which runc's containers start with.
fn node_hostname() -> Result<String> {
    let name = nix::unistd::gethostname()
        .map_err(|e| ShimError::Internal(format!("cannot read the node's hostname: {e}")))?;
    Ok(name.to_string_lossy().into_owned())
}

fn host_root(spec: &serde_json::Value, bundle: &Path) -> Result<PathBuf> {
    let root = spec
        .pointer("/root/path")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| {
            ShimError::InvalidArgument(format!(
                "{}: config.json has no root.path and containerd passed no rootfs mounts",
                bundle.display()
            ))
        })?;
    Ok(bundle.join(root))
}
