//! A container of the pod: its processes, and what it holds on the host
//! (the rootfs mounted in its bundle, its binds in the shared directory).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use containerd_shim::protos::api::Mount;
use runv_protocol::GUEST_SHARED_DIR;

use crate::{
    error::{Result, ShimError},
    mounts::{self, SharedDir},
    process::Process,
    spec::{self, ROOTFS_SHARE},
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

/// What a container holds on the host, to be released at its delete.
pub struct HostMounts {
    container_id: String,
    /// The bundle's rootfs, when the shim mounted it.
    mounted_rootfs: Option<PathBuf>,
}

impl HostMounts {
    /// Mounts the rootfs in the bundle, shares it and every host bind
    /// source of the spec with the guest, and returns the guest's spec.
    /// On error nothing stays mounted.
    pub async fn prepare(
        shared: &SharedDir,
        container_id: &str,
        bundle: &Path,
        rootfs: &[Mount],
    ) -> Result<(HostMounts, Vec<u8>)> {
        let host_spec = spec::read(bundle).map_err(ShimError::InvalidArgument)?;
        let rootfs_path = match rootfs.is_empty() {
            true => host_root(&host_spec, bundle)?,
            false => {
                mounts::mount_bundle_rootfs(bundle, rootfs)
                    .await
                    .map_err(ShimError::Internal)?;
                mounts::bundle_rootfs(bundle)
            }
        };
        let host = HostMounts {
            container_id: container_id.to_owned(),
            mounted_rootfs: (!rootfs.is_empty()).then(|| rootfs_path.clone()),
        };
        let guest_dir = Path::new(GUEST_SHARED_DIR).join(container_id);
        let shared_all = spec::for_guest(host_spec, &guest_dir)
            .map_err(|e| ShimError::InvalidArgument(format!("{}: {e}", bundle.display())))
            .and_then(|guest| {
                shared
                    .bind(container_id, ROOTFS_SHARE, &rootfs_path)
                    .map_err(ShimError::Internal)?;
                for bind in &guest.binds {
                    shared
                        .bind(container_id, &bind.share_name, &bind.source)
                        .map_err(ShimError::Internal)?;
                }
                Ok(serde_json::to_vec(&guest.spec).expect("a JSON value serializes"))
            });
        match shared_all {
            Ok(guest_spec) => Ok((host, guest_spec)),
            Err(e) => {
                host.release(shared);
                Err(e)
            }
        }
    }

    /// Unmounts and removes everything the container held.
    pub fn release(self, shared: &SharedDir) {
        if let Err(e) = shared.unshare(&self.container_id) {
            tracing::warn!(container = %self.container_id, error = %e, "cannot unshare");
        }
        if let Some(rootfs) = &self.mounted_rootfs {
            if let Err(e) = mounts::unmount_tree(rootfs) {
                tracing::warn!(rootfs = %rootfs.display(), error = %e, "cannot unmount rootfs");
            }
        }
    }
}

/// The spec's own root, for a bundle that comes with its rootfs.
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
