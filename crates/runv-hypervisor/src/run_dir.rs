//! A VM's private directory for its sockets and helper logs.

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
};

use crate::{HypervisorError, VmSpec};

/// Created at VM start, removed with everything in it when dropped.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Creates `parent/id`, 0700. A leftover of a crashed VM with the same
    /// id is removed first: ids are unique among live VMs. `parent`, runv's
    /// run directory, is 0711 whatever the umask: nobody else lists it, and
    /// a helper that runs under its own uid can still reach its VM's
    /// directory (docs/security.md).
    pub fn create(parent: &Path, id: &str) -> io::Result<RunDir> {
        let path = parent.join(id);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(parent)?;
        fs::set_permissions(parent, fs::Permissions::from_mode(0o711))?;
        match fs::remove_dir_all(&path) {
            Ok(()) => tracing::warn!(path = %path.display(), "removed a stale VM directory"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::DirBuilder::new().mode(0o700).create(&path)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700))?;
        Ok(RunDir { path })
    }

    /// The private directory of the VM `spec` describes.
    pub fn for_vm(spec: &VmSpec) -> Result<RunDir, HypervisorError> {
        RunDir::create(&spec.run_dir, &spec.id).map_err(|source| HypervisorError::Io {
            context: format!(
                "cannot create the VM directory under {}",
                spec.run_dir.display()
            ),
            source,
        })
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove VM directory");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_on_drop_and_stale_one_replaced() {
        let parent = tempfile::tempdir().unwrap();
        let stale = parent.path().join("vm1");
        fs::create_dir(&stale).unwrap();
        fs::write(stale.join("old.sock"), "").unwrap();
        let dir = RunDir::create(parent.path(), "vm1").unwrap();
        assert!(!dir.join("old.sock").exists());
        let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&stale), 0o700);
        assert_eq!(mode(parent.path()), 0o711);
        fs::write(dir.join("new.sock"), "").unwrap();
        drop(dir);
        assert!(!stale.exists());
    }
}
