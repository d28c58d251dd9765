//! PID 1 leaves the initial ramfs for a tmpfs, as switch_root does.
//!
//! The kernel unpacks the initramfs into "rootfs", the root of the mount
//! tree, which has no parent mount: pivot_root(2) refuses it with EINVAL,
//! and so would every container mount namespace cloned from it. The agent
//! therefore moves the whole initramfs content onto a tmpfs, moves that
//! tmpfs onto `/`, chroots into it and executes itself again from there,
//! which frees the last page of the ramfs (its own old binary).

use std::{
    collections::HashMap,
    fs, io,
    os::unix::{
        fs::{lchown, symlink, MetadataExt, PermissionsExt},
        process::CommandExt,
    },
    path::Path,
    process::Command,
};

use nix::{
    mount::{mount, MsFlags},
    sys::stat::{mknod, Mode, SFlag},
    unistd::{chdir, chroot},
};

/// Set in the environment of the agent's second execution: the boot-clock
/// nanoseconds at which the first one started, for the boot timeline.
const STARTED_ENV: &str = "RUNV_INIT_STARTED_NS";

/// Where the new root is assembled before it moves onto `/`.
const NEW_ROOT: &str = "/.runv-root";

/// When this execution follows the switch, the time the first one
/// started; `None` while still on the initial ramfs.
pub fn switched_at_start() -> Option<u64> {
    std::env::var(STARTED_ENV).ok()?.parse().ok()
}

/// Moves the root onto a tmpfs and executes the agent again there; returns
/// only on failure. Runs before any thread is started and any file system
/// is mounted.
pub fn leave_initramfs(init_started_ns: u64) -> io::Error {
    match switch_to_tmpfs() {
        Ok(()) => {
            let error = Command::new("/init")
                .args(std::env::args_os().skip(1))
                .env(STARTED_ENV, init_started_ns.to_string())
                .exec();
            io::Error::other(format!("re-executing /init on the new root: {error}"))
        }
        Err(e) => e,
    }
}

fn switch_to_tmpfs() -> io::Result<()> {
    let new_root = Path::new(NEW_ROOT);
    fs::create_dir(new_root).map_err(|e| context(e, "creating", new_root))?;
    mount(
        Some("tmpfs"),
        new_root,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(|e| context(e.into(), "mounting a tmpfs on", new_root))?;
    let mut mover = Mover::default();
    for entry in fs::read_dir("/")? {
        let entry = entry?;
        if entry.path() != new_root {
            mover.move_entry(&entry.path(), &new_root.join(entry.file_name()))?;
        }
    }
    chdir(new_root).map_err(|e| context(e.into(), "entering", new_root))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| context(e.into(), "moving onto / the tmpfs at", new_root))?;
    chroot(".").map_err(|e| context(e.into(), "chroot into", new_root))?;
    chdir("/").map_err(|e| context(e.into(), "entering", Path::new("/")))?;
    // The empty mount point stays on the hidden ramfs, which is empty now.
    Ok(())
}

/// Moves files across file systems, keeping hard links linked (busybox
/// trees link hundreds of applets to one binary).
#[derive(Default)]
struct Mover {
    /// Inode of a moved multiply-linked file to its new path.
    linked: HashMap<u64, std::path::PathBuf>,
}

impl Mover {
    /// Copies `from` (recursively) to `to` with its mode and owner, then
    /// removes it, so the ramfs frees its pages as the tmpfs fills.
    fn move_entry(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        let meta = fs::symlink_metadata(from).map_err(|e| context(e, "reading", from))?;
        let file_type = meta.file_type();
        if file_type.is_dir() {
            fs::create_dir(to).map_err(|e| context(e, "creating", to))?;
            for entry in fs::read_dir(from)? {
                let entry = entry?;
                self.move_entry(&entry.path(), &to.join(entry.file_name()))?;
            }
            fs::set_permissions(to, fs::Permissions::from_mode(meta.mode()))?;
            fs::remove_dir(from).map_err(|e| context(e, "removing", from))?;
        } else {
            if file_type.is_symlink() {
                symlink(fs::read_link(from)?, to).map_err(|e| context(e, "linking", to))?;
            } else if file_type.is_file() {
                self.move_file(from, to, &meta)?;
            } else {
                let kind = SFlag::from_bits_truncate(meta.mode() & SFlag::S_IFMT.bits());
                let mode = Mode::from_bits_truncate(meta.mode());
                mknod(to, kind, mode, meta.rdev())
                    .map_err(|e| context(e.into(), "creating", to))?;
            }
            fs::remove_file(from).map_err(|e| context(e, "removing", from))?;
        }
        lchown(to, Some(meta.uid()), Some(meta.gid())).map_err(|e| context(e, "chown", to))
    }

    fn move_file(&mut self, from: &Path, to: &Path, meta: &fs::Metadata) -> io::Result<()> {
        // Moving a link lowers the link count of the others: once an
        // inode is known, its other names are links whatever their count.
        if let Some(first) = self.linked.get(&meta.ino()) {
            return fs::hard_link(first, to).map_err(|e| context(e, "linking", to));
        }
        if meta.nlink() > 1 {
            self.linked.insert(meta.ino(), to.to_owned());
        }
        fs::copy(from, to).map_err(|e| context(e, "copying", from))?;
        Ok(())
    }
}

fn context(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_trees_keeping_links_modes_and_content() {
        let scratch = tempfile::tempdir().unwrap();
        let from = scratch.path().join("from");
        let to = scratch.path().join("to");
        fs::create_dir_all(from.join("bin")).unwrap();
        fs::write(from.join("bin/busybox"), b"applets").unwrap();
        fs::set_permissions(from.join("bin/busybox"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::hard_link(from.join("bin/busybox"), from.join("bin/sh")).unwrap();
        symlink("busybox", from.join("bin/ls")).unwrap();

        Mover::default().move_entry(&from, &to).unwrap();

        assert!(!from.exists());
        assert_eq!(fs::read(to.join("bin/sh")).unwrap(), b"applets");
        let busybox = fs::metadata(to.join("bin/busybox")).unwrap();
        assert_eq!(busybox.mode() & 0o777, 0o755);
        assert_eq!(busybox.nlink(), 2);
        assert_eq!(
            busybox.ino(),
            fs::metadata(to.join("bin/sh")).unwrap().ino()
        );
        assert_eq!(
            fs::read_link(to.join("bin/ls")).unwrap(),
            Path::new("busybox")
        );
    }
}
