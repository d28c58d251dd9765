//! The virtio-fs worker: an event loop of the device's own, on a thread
//! whose file system root and working directory are the share, and that
//! runs under the fs worker's seccomp filter. The passthrough file system
//! resolves every guest path from there, so a bug that let a guest name
//! `..` or an absolute path still ends inside the share: the thread has no
//! view of the host's tree, and its filter refuses chroot, mount and
//! unshare, the ways back out. Its umask (0, which the passthrough sets
//! so that the guest's modes stand) is the thread's own too.

use std::path::Path;

use crate::{event_loop::EventLoop, machine::THREAD_NAME_PREFIX, seccomp::ThreadKind, VmmError};

/// The worker's thread name.
pub const THREAD_NAME: &str = "runv-fs";

/// Starts the worker for a share at `shared_dir`: the thread enters the
/// share, runs `import` (which opens the file system's root, `/` there),
/// installs its filter, then serves the devices added to it.
pub(crate) fn spawn(
    shared_dir: &Path,
    import: impl FnOnce() -> std::io::Result<()> + Send + 'static,
) -> Result<EventLoop, VmmError> {
    debug_assert!(THREAD_NAME.starts_with(THREAD_NAME_PREFIX));
    let shared_dir = shared_dir.to_owned();
    EventLoop::spawn_confined(THREAD_NAME, ThreadKind::FsWorker, move || {
        enter(&shared_dir).and_then(|()| import()).map_err(|e| {
            format!(
                "entering the virtio-fs share {} (the worker's root; chroot takes \
                     CAP_SYS_CHROOT, so the VMM runs as root): {e}",
                shared_dir.display()
            )
        })
    })
}

/// Makes `dir` the calling thread's root and working directory, and no
/// other thread's.
fn enter(dir: &Path) -> std::io::Result<()> {
    // SAFETY: unshare(CLONE_FS) gives this thread a copy of the process's
    // root, working directory and umask; it touches no memory of ours.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::os::unix::fs::chroot(dir)?;
    std::env::set_current_dir("/")
}
