//! PID 1 leaves the initial ramfs for a tmpfs, as switch_root does.
//!
//! The kernel unpacks the initramfs into "rootfs", the root of the mount
//! tree, which has no parent mount: pivot_root(2) refuses it with EINVAL,
//! and so would every container mount namespace cloned from it. The agent
//! therefore moves the initramfs content onto a tmpfs, moves that tmpfs
//! onto `/` and chroots into it, then goes on running. Its own binary
//! (`/init`) stays behind on the hidden ramfs: a running program keeps its
//! mapped file, and copying and re-executing the 6 MiB agent cost about
//! 80 ms of boot under TCG. The memory is the same either way: the pages
//! live in the ramfs instead of in the tmpfs.

use std::{
    collections::HashMap,
    fs, io,
    os::unix::fs::{lchown, symlink, MetadataExt, PermissionsExt},
    path::Path,
};

use nix::{
    mount::{mount, MsFlags},
    sys::{
        stat::{mknod, Mode, SFlag},
        statfs::{statfs, FsType, TMPFS_MAGIC},
    },
    unistd::{chdir, chroot},
};

/// Where the new root is assembled before it moves onto `/`.
const NEW_ROOT: &str = "/.runv-root";

/// The agent's own binary, which stays on the ramfs.
const AGENT_BINARY: &str = "/init";

/// Moves the root onto a tmpfs if it is the initramfs; a root the kernel
/// mounted from a device (the builtin VMM's pmem root image) has a parent
/// mount already and stays. Runs before any thread is started and any
/// file system is mounted.
pub fn leave_initramfs() -> io::Result<()> {
    if !root_is_initramfs()? {
        return Ok(());
    }
    switch_to_tmpfs()
}

/// linux/magic.h's; neither nix nor libc names it.
const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);

/// The kernel unpacks an initramfs into a ramfs, or a tmpfs where the
/// kernel has one and no root device was named.
fn root_is_initramfs() -> io::Result<bool> {
    let root = statfs("/").map_err(|e| context(e.into(), "looking at", Path::new("/")))?;
    Ok([RAMFS_MAGIC, TMPFS_MAGIC].contains(&root.filesystem_type()))
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
        if entry.path() != new_root && entry.path() != Path::new(AGENT_BINARY) {
            mover.move_entry(&entry.path(), &new_root.join(entry.file_name()))?;
        }
    }
    chdir(new_root).map_err(|e| context(e.into(), "entering", new_root))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| context(e.into(), "moving onto / the tmpfs at", new_root))?;
    chroot(".").map_err(|e| context(e.into(), "chroot into", new_root))?;
    chdir("/").map_err(|e| context(e.into(), "entering", Path::new("/")))?;
    // The empty mount point and the agent's binary stay on the hidden ramfs.
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
