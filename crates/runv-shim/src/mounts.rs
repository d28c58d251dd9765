//! Host mounts: a container's root file system from containerd's mounts,
//! and the pod's shared directory that virtio-fs exports to the guest,
//! into which each container's rootfs and host bind sources are bound.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use containerd_shim::{asynchronous::util::mount_rootfs, protos::api::Mount};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Where containerd expects a task's root file system: `<bundle>/rootfs`.
pub fn bundle_rootfs(bundle: &Path) -> PathBuf {
    bundle.join("rootfs")
}

/// Mounts containerd's `mounts` (an overlay from the snapshotter, say) at
/// `<bundle>/rootfs`, as runc's shim does. With no mounts the rootfs is
/// already in place.
pub async fn mount_bundle_rootfs(bundle: &Path, mounts: &[Mount]) -> Result<(), String> {
    let rootfs = bundle_rootfs(bundle);
    for (index, m) in mounts.iter().enumerate() {
        if let Err(e) = mount_rootfs(m, &rootfs).await {
            // Undo the layers already mounted: a failed create leaves nothing.
            let _ = unmount_tree(&rootfs);
            return Err(format!(
                "cannot mount rootfs mount {index} ({} from {}) at {}: {e}",
                m.type_,
                m.source,
                rootfs.display()
            ));
        }
    }
    Ok(())
}

/// The pod's shared directory. It is made a mount point of its own with
/// shared propagation, so that binds added after the VM started still
/// reach virtiofsd, which serves it from a mount namespace of its own.
pub struct SharedDir {
    path: PathBuf,
}

impl SharedDir {
    pub fn create(path: PathBuf) -> io::Result<SharedDir> {
        fs::create_dir_all(&path)?;
        let shared = SharedDir { path };
        let made_shared = mount(
            Some(&shared.path),
            &shared.path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .and_then(|()| {
            mount(
                None::<&str>,
                &shared.path,
                None::<&str>,
                MsFlags::MS_SHARED,
                None::<&str>,
            )
        });
        if let Err(e) = made_shared {
            let message = format!("cannot make {} a shared mount: {e}", shared.path.display());
            shared.remove();
            return Err(io::Error::other(message));
        }
        Ok(shared)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Binds `source` (a directory or a file) at
    /// `<shared>/<container_id>/<share_name>`.
    pub fn bind(&self, container_id: &str, share_name: &str, source: &Path) -> Result<(), String> {
        let target = self.path.join(container_id).join(share_name);
        let bound = create_mount_target(source, &target).and_then(|()| {
            mount(
                Some(source),
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(io::Error::from)
        });
        bound.map_err(|e| {
            format!(
                "cannot share {} with the guest at {}: {e}",
                source.display(),
                target.display()
            )
        })
    }

    /// Unmounts and removes everything shared for `container_id`.
    pub fn unshare(&self, container_id: &str) -> io::Result<()> {
        remove_unmounted(&self.path.join(container_id))
    }

    /// Unmounts and removes the whole directory, whatever is still in it.
    pub fn remove(self) {
        if let Err(e) = remove_unmounted(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the shared directory");
        }
    }
}

/// Unmounts everything at or below `dir` (deepest first, detached so that
/// a busy mount cannot keep it), then removes the tree. A mount that would
/// not go stops the removal, so no host file is ever deleted through one.
pub fn remove_unmounted(dir: &Path) -> io::Result<()> {
    unmount_tree(dir)?;
    if !mount_points_under(dir)?.is_empty() {
        return Err(io::Error::other(format!(
            "mounts remain under {}",
            dir.display()
        )));
    }
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Unmounts every mount at or below `dir`, deepest first.
pub fn unmount_tree(dir: &Path) -> io::Result<()> {
    let mut points = mount_points_under(dir)?;
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for point in points {
        match umount2(&point, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
            Err(e) => {
                return Err(io::Error::other(format!(
                    "cannot unmount {}: {e}",
                    point.display()
                )))
            }
        }
    }
    Ok(())
}

/// Mount points at or below `dir`, from /proc/self/mountinfo (one per
/// mount, stacked mounts included).
fn mount_points_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .filter(|point| point.starts_with(dir))
        .collect())
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes.get(i + 1..i + 4).filter(|_| bytes[i] == b'\\');
        match escape
            .and_then(|digits| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok())
        {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A bind target of the same kind as `source`: a directory for a
/// directory, an empty file for anything else.
fn create_mount_target(source: &Path, target: &Path) -> io::Result<()> {
    if fs::metadata(source)?.is_dir() {
        fs::create_dir_all(target)
    } else {
        fs::create_dir_all(target.parent().expect("a share target has a parent"))?;
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(target)
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(r"/a\040b/c"), "/a b/c");
        assert_eq!(unescape_mountinfo(r"/plain\0"), r"/plain\0");
    }

    #[test]
    fn shares_binds_and_removes_without_touching_sources() {
        // SAFETY: geteuid only reads the process's credentials.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: mounting needs root");
            return;
        }
        let scratch = tempfile::tempdir().unwrap();
        let source = scratch.path().join("volume");
        fs::create_dir(&source).unwrap();
        fs::write(source.join("keep"), "data").unwrap();
        let file = scratch.path().join("hosts");
        fs::write(&file, "127.0.0.1 localhost\n").unwrap();

        let shared = SharedDir::create(scratch.path().join("pod/shared")).unwrap();
        shared.bind("c1", "rootfs", &source).unwrap();
        shared.bind("c1", "mounts/1-hosts", &file).unwrap();
        let seen = shared.path().join("c1/mounts/1-hosts");
        assert_eq!(fs::read_to_string(seen).unwrap(), "127.0.0.1 localhost\n");
        assert!(shared.path().join("c1/rootfs/keep").is_file());

        shared.unshare("c1").unwrap();
        assert!(!shared.path().join("c1").exists());
        assert_eq!(fs::read_to_string(source.join("keep")).unwrap(), "data");
        let pod = scratch.path().join("pod/shared");
        shared.remove();
        assert!(!pod.exists());
        assert!(mount_points_under(scratch.path()).unwrap().is_empty());
    }
}
