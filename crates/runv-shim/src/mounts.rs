//! Host mounts: a container's root file system from containerd's mounts,
//! and the pod's shared directory that virtio-fs exports to the guest,
//! into which each container's rootfs and host bind sources are bound.
//! The guest is hostile: nothing here resolves a path through a directory
//! it can write (docs/security.md).

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use std::os::{
    fd::{AsRawFd, OwnedFd},
    unix::fs::{DirBuilderExt, PermissionsExt},
};

use crate::spec::MountPoint;
use containerd_shim::{asynchronous::util::mount_rootfs, protos::api::Mount};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use rustix::{
    fs::{mkdirat, openat, openat2, Mode, OFlags, ResolveFlags, CWD},
    mount::{move_mount, open_tree, MoveMountFlags, OpenTreeFlags},
};

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

/// The skeleton's and the view's names in the pod directory.
const SKELETON: &str = "share";
const VIEW: &str = "shared";

/// The pod's shared directory, in two views of one tree so that the guest
/// never writes where the shim resolves paths (the class of Kata's
/// CVE-2020-2026):
/// - `<pod>/share`, the skeleton: the directories and file mount targets,
///   made only by the shim and never exported;
/// - `<pod>/shared`, what virtio-fs exports: a read-only, nosuid, nodev
///   bind of the skeleton with shared propagation (binds added after the
///   VM started still reach virtiofsd's own mount namespace). Each bind
///   sits on a target in this view, resolved from the view's root without
///   following a symlink or crossing into another mount, and attached with
///   its attributes already set, so the guest sees no bind rw for an
///   instant.
pub struct SharedDir {
    skeleton: PathBuf,
    view: PathBuf,
}

impl SharedDir {
    /// Creates the two views under the pod directory `pod_dir`.
    pub fn create(pod_dir: &Path) -> io::Result<SharedDir> {
        let shared = SharedDir {
            skeleton: pod_dir.join(SKELETON),
            view: pod_dir.join(VIEW),
        };
        let made = private_dir(&shared.skeleton)
            .and_then(|()| private_dir(&shared.view))
            .and_then(|()| {
                let tree = clone_tree(&shared.skeleton)?;
                set_attributes(&tree, MountAttributes::read_only(true))?;
                attach(&tree, &shared.view)
            })
            .and_then(|()| {
                // A peer group of its own: a clone of a shared mount joins
                // its source's, and binds on the view would show up in the
                // skeleton too.
                [MsFlags::MS_PRIVATE, MsFlags::MS_SHARED]
                    .into_iter()
                    .try_for_each(|propagation| {
                        mount(
                            None::<&str>,
                            &shared.view,
                            None::<&str>,
                            propagation,
                            None::<&str>,
                        )
                    })
                    .map_err(io::Error::from)
            });
        if let Err(e) = made {
            let message = format!(
                "cannot make {} a read-only shared view of {}: {e}",
                shared.view.display(),
                shared.skeleton.display()
            );
            shared.remove();
            return Err(io::Error::other(message));
        }
        Ok(shared)
    }

    /// The shared directory whose exported view is `view` (what a
    /// bundle's marker names), to clean up after a shim that died.
    pub fn from_view(view: &Path) -> SharedDir {
        let pod_dir = view.parent().unwrap_or(Path::new("/"));
        SharedDir {
            skeleton: pod_dir.join(SKELETON),
            view: view.to_owned(),
        }
    }

    /// No container shares anything any more.
    pub fn is_empty(&self) -> bool {
        fs::read_dir(&self.skeleton).is_ok_and(|mut entries| entries.next().is_none())
    }

    /// The directory virtio-fs exports.
    pub fn path(&self) -> &Path {
        &self.view
    }

    /// Binds `source` (a directory or a file) at
    /// `<shared>/<container_id>/<share_name>`, read-only on the host when
    /// `read_only`, always nosuid and nodev. The bind is a slave of a
    /// shared source when `follows_host` (the host's later mounts under it
    /// reach the guest), else private; never a peer, so nothing mounted on
    /// the share's side reaches the host.
    pub fn bind(
        &self,
        container_id: &str,
        share_name: &str,
        source: &Path,
        read_only: bool,
        follows_host: bool,
    ) -> Result<(), String> {
        let relative = Path::new(container_id).join(share_name);
        let bound = create_mount_target(source, &self.skeleton.join(&relative)).and_then(|()| {
            let tree = clone_tree(source)?;
            let propagation = if follows_host {
                libc::MS_SLAVE
            } else {
                libc::MS_PRIVATE
            };
            set_attributes(
                &tree,
                MountAttributes::read_only(read_only).with_propagation(propagation),
            )?;
            let view = fs::File::open(&self.view)?;
            let target = resolve_beneath(&view, &relative)?;
            attach_at(&tree, &target)
        });
        bound.map_err(|e| {
            format!(
                "cannot share {} with the guest at {}: {e}",
                source.display(),
                self.view.join(&relative).display()
            )
        })
    }

    /// Unmounts and removes everything shared for `container_id`.
    pub fn unshare(&self, container_id: &str) -> io::Result<()> {
        unmount_tree(&self.view.join(container_id))?;
        remove_unmounted(&self.skeleton.join(container_id))
    }

    /// Unmounts and removes both views, whatever is still in them.
    pub fn remove(self) {
        for dir in [&self.view, &self.skeleton] {
            if let Err(e) = remove_unmounted(dir) {
                tracing::warn!(path = %dir.display(), error = %e, "cannot remove the shared directory");
            }
        }
    }
}

/// Creates in the root file system at `root` each of `points` that is
/// missing, as runc would inside the container: a read-only root is
/// read-only on the host too, so the guest could not make them. Paths
/// resolve as inside the container (RESOLVE_IN_ROOT: an image's symlinks
/// stay within its root), and only the last component is created, next
/// to a parent that was resolved that way.
pub fn create_mount_points(root: &Path, points: &[MountPoint]) -> io::Result<()> {
    let root = fs::File::open(root)?;
    for point in points {
        let relative = point.path.strip_prefix("/").unwrap_or(&point.path);
        let mut prefix = PathBuf::new();
        let components: Vec<_> = relative.components().collect();
        for (index, component) in components.iter().enumerate() {
            let parent = resolve_in_root(&root, &prefix)?;
            prefix.push(component);
            match resolve_in_root(&root, &prefix) {
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            let name = component.as_os_str();
            let made = if index + 1 == components.len() && point.file {
                openat(
                    &parent,
                    name,
                    OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::WRONLY
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o644),
                )
                .map(drop)
            } else {
                mkdirat(&parent, name, Mode::from_raw_mode(0o755))
            };
            match made {
                Ok(()) => {}
                // A dangling symlink of the image's: left as it is, for
                // the guest to report.
                Err(rustix::io::Errno::EXIST) => break,
                Err(e) => {
                    return Err(io::Error::other(format!(
                        "cannot create the mount point {} in {}: {e}",
                        point.path.display(),
                        prefix.display()
                    )))
                }
            }
        }
    }
    Ok(())
}

/// Opens `relative` as an O_PATH handle as if `root` were `/`.
fn resolve_in_root(root: &fs::File, relative: &Path) -> io::Result<OwnedFd> {
    let path = if relative.as_os_str().is_empty() {
        Path::new(".")
    } else {
        relative
    };
    openat2(
        root,
        path,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(io::Error::from)
}

/// Creates `dir` and its missing parents, each 0700 whatever the umask:
/// runv's state is root's alone.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// The attributes of a bind runv makes: never setuid or device files on
/// the host, read-only on request (recursively: submounts too), and the
/// propagation asked for (0 keeps the clone's: a peer of a shared source).
struct MountAttributes {
    set: u64,
    propagation: u64,
}

impl MountAttributes {
    fn read_only(read_only: bool) -> MountAttributes {
        let mut set = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
        if read_only {
            set |= libc::MOUNT_ATTR_RDONLY;
        }
        MountAttributes {
            set,
            propagation: 0,
        }
    }

    fn with_propagation(self, propagation: libc::c_ulong) -> MountAttributes {
        MountAttributes {
            propagation,
            ..self
        }
    }
}

/// A detached copy of the mount tree at `source` (a recursive bind not
/// yet attached anywhere).
fn clone_tree(source: &Path) -> io::Result<OwnedFd> {
    open_tree(
        CWD,
        source,
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_RECURSIVE,
    )
    .map_err(io::Error::from)
}

/// Sets `attributes` on every mount of the detached tree `tree`.
fn set_attributes(tree: &OwnedFd, attributes: MountAttributes) -> io::Result<()> {
    let attr = libc::mount_attr {
        attr_set: attributes.set,
        attr_clr: 0,
        propagation: attributes.propagation,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr reads `attr` (of the size passed) and an empty
    // NUL-terminated path; neither outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Opens `relative` below the directory `root` as an O_PATH handle,
/// refusing symlinks, `..` escapes and mount crossings on the way.
fn resolve_beneath(root: &fs::File, relative: &Path) -> io::Result<OwnedFd> {
    openat2(
        root,
        relative,
        OFlags::PATH | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::BENEATH
            | ResolveFlags::NO_SYMLINKS
            | ResolveFlags::NO_MAGICLINKS
            | ResolveFlags::NO_XDEV,
    )
    .map_err(io::Error::from)
}

/// Attaches the detached tree `tree` at the path `target`, which only runv
/// writes.
fn attach(tree: &OwnedFd, target: &Path) -> io::Result<()> {
    let target = fs::File::open(target)?;
    attach_at(tree, &target.into())
}

/// Attaches the detached tree `tree` on the already resolved `target`.
fn attach_at(tree: &OwnedFd, target: &OwnedFd) -> io::Result<()> {
    move_mount(
        tree,
        c"",
        target,
        c"",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(io::Error::from)
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
        match umount2(&point, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
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

    fn is_root() -> bool {
        // SAFETY: geteuid only reads the process's credentials.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!("SKIPPED: mounting needs root");
        }
        root
    }

    /// The options field (the 6th) of the mountinfo line of `point`.
    fn mount_options(point: &Path) -> String {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = mountinfo
            .lines()
            .rfind(|line| line.split(' ').nth(4) == Some(point.to_str().unwrap()))
            .unwrap_or_else(|| panic!("{} is not a mount point", point.display()));
        line.split(' ').nth(5).unwrap().to_owned()
    }

    #[test]
    fn shares_binds_and_removes_without_touching_sources() {
        if !is_root() {
            return;
        }
        let scratch = tempfile::tempdir().unwrap();
        let source = scratch.path().join("volume");
        fs::create_dir(&source).unwrap();
        fs::write(source.join("keep"), "data").unwrap();
        let file = scratch.path().join("hosts");
        fs::write(&file, "127.0.0.1 localhost\n").unwrap();

        let pod = scratch.path().join("pod");
        let shared = SharedDir::create(&pod).unwrap();
        shared.bind("c1", "rootfs", &source, false, false).unwrap();
        shared
            .bind("c1", "mounts/1-hosts", &file, true, false)
            .unwrap();
        let seen = shared.path().join("c1/mounts/1-hosts");
        assert_eq!(fs::read_to_string(&seen).unwrap(), "127.0.0.1 localhost\n");
        assert!(shared.path().join("c1/rootfs/keep").is_file());
        // Host-enforced: read-only where asked, never setuid or devices.
        let options = mount_options(&seen);
        assert!(options.starts_with("ro,"), "{options}");
        assert!(
            options.contains("nosuid") && options.contains("nodev"),
            "{options}"
        );
        let options = mount_options(&shared.path().join("c1/rootfs"));
        assert!(
            options.starts_with("rw,") && options.contains("nosuid,nodev"),
            "{options}"
        );
        assert_eq!(
            fs::write(&seen, "overwritten").unwrap_err().raw_os_error(),
            Some(libc::EROFS)
        );
        fs::write(shared.path().join("c1/rootfs/new"), "written").unwrap();
        assert_eq!(
            fs::metadata(&pod).unwrap().permissions().mode() & 0o777,
            0o700
        );

        shared.unshare("c1").unwrap();
        assert!(!shared.path().join("c1").exists());
        assert_eq!(fs::read_to_string(source.join("keep")).unwrap(), "data");
        assert_eq!(fs::read_to_string(&file).unwrap(), "127.0.0.1 localhost\n");
        shared.remove();
        assert!(!pod.join("shared").exists() && !pod.join("share").exists());
        assert!(mount_points_under(scratch.path()).unwrap().is_empty());
    }

    /// What the guest sees of the share it cannot change: no directory,
    /// file or symlink appears in the exported view, whoever writes.
    #[test]
    fn the_exported_view_is_read_only_on_the_host() {
        if !is_root() {
            return;
        }
        let scratch = tempfile::tempdir().unwrap();
        let shared = SharedDir::create(&scratch.path().join("pod")).unwrap();
        let view = shared.path().to_owned();
        let refused = [
            fs::create_dir(view.join("c1")),
            fs::write(view.join("c1"), ""),
            std::os::unix::fs::symlink("/etc", view.join("c1")),
        ];
        for attempt in refused {
            assert_eq!(attempt.unwrap_err().raw_os_error(), Some(libc::EROFS));
        }
        let options = mount_options(&view);
        assert!(
            options.starts_with("ro,") && options.contains("nosuid,nodev"),
            "{options}"
        );
        shared.remove();
        assert!(mount_points_under(scratch.path()).unwrap().is_empty());
    }

    /// Mount points are made inside the root, an image's symlinks
    /// resolving within it, never on the host.
    #[test]
    fn mount_points_stay_inside_the_root() {
        let scratch = tempfile::tempdir().unwrap();
        let (root, host) = (scratch.path().join("root"), scratch.path().join("host"));
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir(&host).unwrap();
        // An image (or an earlier guest) planted links out of the root.
        std::os::unix::fs::symlink(&host, root.join("escape")).unwrap();
        std::os::unix::fs::symlink("../../../..", root.join("up")).unwrap();
        let point = |path: &str, file| MountPoint {
            path: path.into(),
            file,
        };
        let points = [
            point("/etc/hosts", true),
            point("/data/deep", false),
            point("/escape/x", false),
            point("/up/y", true),
        ];
        create_mount_points(&root, &points).unwrap();
        assert!(root.join("etc/hosts").is_file());
        assert!(root.join("data/deep").is_dir());
        assert_eq!(
            fs::read_dir(&host).unwrap().count(),
            0,
            "nothing made outside"
        );
        // The absolute link dangles inside the root and stays as it is;
        // the relative one resolves to the root itself.
        assert!(root.join("escape").is_symlink());
        assert!(root.join("y").is_file());
    }

    /// A volume that follows the host (rslave, rshared) sees what the host
    /// mounts under its source after it was shared; a private one does
    /// not; and a mount on the share's side never reaches the host.
    #[test]
    fn host_mounts_reach_only_the_binds_that_follow_the_host() {
        if !is_root() {
            return;
        }
        let scratch = tempfile::tempdir().unwrap();
        // The source is shared, as the kubelet's pod directories are.
        let source = scratch.path().join("volume");
        fs::create_dir_all(source.join("late")).unwrap();
        fs::create_dir(source.join("from-share")).unwrap();
        mount(
            Some(&source),
            &source,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        mount(
            None::<&str>,
            &source,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .unwrap();
        let shared = SharedDir::create(&scratch.path().join("pod")).unwrap();
        shared
            .bind("c1", "mounts/1-follows", &source, false, true)
            .unwrap();
        shared
            .bind("c1", "mounts/2-private", &source, false, false)
            .unwrap();

        mount(
            Some("tmpfs"),
            &source.join("late"),
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        fs::write(source.join("late/flag"), "mounted later").unwrap();
        let seen = |share: &str| {
            shared
                .path()
                .join("c1")
                .join(share)
                .join("late/flag")
                .exists()
        };
        assert!(
            seen("mounts/1-follows"),
            "the host's mount did not reach the follower"
        );
        assert!(
            !seen("mounts/2-private"),
            "the host's mount reached a private bind"
        );

        let on_share_side = shared.path().join("c1/mounts/1-follows/from-share");
        mount(
            Some("tmpfs"),
            &on_share_side,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        fs::write(on_share_side.join("flag"), "guest side").unwrap();
        assert!(
            !source.join("from-share/flag").exists(),
            "a mount on the share's side reached the host"
        );

        umount2(&on_share_side, MntFlags::MNT_DETACH).unwrap();
        shared.unshare("c1").unwrap();
        shared.remove();
        umount2(&source.join("late"), MntFlags::MNT_DETACH).unwrap();
        umount2(&source, MntFlags::MNT_DETACH).unwrap();
    }

    /// Were a symlink ever in a bind's way, the bind fails rather than
    /// land where it points, and mounts nothing.
    #[test]
    fn a_bind_never_follows_a_symlink_in_its_target() {
        if !is_root() {
            return;
        }
        let scratch = tempfile::tempdir().unwrap();
        let elsewhere = scratch.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        let source = scratch.path().join("volume");
        fs::create_dir(&source).unwrap();
        let pod = scratch.path().join("pod");
        let shared = SharedDir::create(&pod).unwrap();
        for planted in ["c1", "c1/rootfs"] {
            let skeleton = pod.join("share");
            let _ = fs::remove_dir_all(skeleton.join("c1"));
            if planted == "c1/rootfs" {
                fs::create_dir(skeleton.join("c1")).unwrap();
            }
            std::os::unix::fs::symlink(&elsewhere, skeleton.join(planted)).unwrap();
            let error = shared
                .bind("c1", "rootfs", &source, false, false)
                .unwrap_err();
            assert!(error.contains("cannot share"), "{error}");
            assert!(mount_points_under(&elsewhere).unwrap().is_empty());
        }
        shared.remove();
        assert!(mount_points_under(scratch.path()).unwrap().is_empty());
    }
}
