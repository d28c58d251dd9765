//! Macvtap queues: the character device of a macvtap link, opened from
//! inside the pod's network namespace.
//!
//! A macvtap's device is `tap<ifindex>`, with a dynamic major and a minor
//! of the driver's own choosing. `/dev/tap<ifindex>` (devtmpfs or udev)
//! cannot be trusted: `/dev` is the host's, and ifindexes are allocated
//! per namespace, so `/dev/tap5` may well be another pod's macvtap, or
//! missing. The numbers come from sysfs instead, but the host's `/sys`
//! shows the host's namespace, not the pod's: the thread that works in the
//! pod's namespace gets a mount namespace of its own (private, so nothing
//! propagates to the host), mounts a fresh sysfs (which shows the net
//! devices of the mounting thread's network namespace) and a tmpfs in a
//! private directory, reads `class/net/<name>/macvtap/tap<N>/dev`, makes
//! the node there with mknod, opens it and removes it all again.

use std::{
    cell::Cell,
    fs, io,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::OpenOptionsExt,
    },
    path::{Path, PathBuf},
};

use nix::{
    mount::{mount, umount2, MntFlags, MsFlags},
    sched::{unshare, CloneFlags},
    sys::stat::{makedev, mknod, Mode, SFlag},
};

/// The size of `struct virtio_net_hdr`: what a tun tap uses by default,
/// so that the hypervisors get the same kind of fd in every mode (they set
/// the size they want themselves anyway).
const VNET_HDR_SIZE: libc::c_int = 10;

/// What failed, as the error names it: the operation, the system's error,
/// and a hint at the fix where there is one.
#[derive(Debug)]
pub struct Failure {
    pub operation: String,
    pub error: io::Error,
    pub hint: Option<&'static str>,
}

fn failure(operation: impl Into<String>, error: impl Into<io::Error>) -> Failure {
    Failure {
        operation: operation.into(),
        error: error.into(),
        hint: None,
    }
}

thread_local! {
    /// Whether this thread has a private mount namespace already.
    static PRIVATE_MOUNTS: Cell<bool> = const { Cell::new(false) };
}

/// Gives the calling thread a mount namespace of its own, with every mount
/// private: what it mounts is seen by nobody else and goes when the thread
/// exits. `unshare(CLONE_NEWNS)` implies `CLONE_FS`, which a thread of a
/// multi-threaded process may unshare.
fn private_mounts() -> Result<(), Failure> {
    if PRIVATE_MOUNTS.get() {
        return Ok(());
    }
    let hint = Some("runv needs CAP_SYS_ADMIN to mount a sysfs of the pod's namespace");
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| Failure {
        hint,
        ..failure("unshare the mount namespace of its thread", e)
    })?;
    // Not private yet, the new namespace's mounts would propagate to the
    // host's: nothing is mounted unless this succeeds.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| Failure {
        hint,
        ..failure("make the thread's mounts private", e)
    })?;
    PRIVATE_MOUNTS.set(true);
    Ok(())
}

/// A private directory with a tmpfs on it and a sysfs under that, undone
/// on drop.
struct Scratch {
    dir: PathBuf,
    tmpfs: bool,
    sysfs: bool,
}

impl Scratch {
    fn sys(&self) -> PathBuf {
        self.dir.join("sys")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.sysfs {
            let _ = umount2(&self.sys(), MntFlags::MNT_DETACH);
        }
        if self.tmpfs {
            // The node and the sysfs mount point go with it.
            let _ = umount2(&self.dir, MntFlags::MNT_DETACH);
        }
        if let Err(e) = fs::remove_dir(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e,
                "cannot remove the private directory of a macvtap node");
        }
    }
}

fn scratch() -> Result<Scratch, Failure> {
    private_mounts()?;
    let template = std::env::temp_dir().join("runv-macvtap-XXXXXX");
    let dir = nix::unistd::mkdtemp(&template).map_err(|e| {
        failure(
            format!("make a private directory {}", template.display()),
            e,
        )
    })?;
    let mut scratch = Scratch {
        dir,
        tmpfs: false,
        sysfs: false,
    };
    // A tmpfs of its own: the temporary directory's filesystem may be
    // mounted nodev, which would make the node unusable.
    mount(
        Some("runv-macvtap"),
        &scratch.dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0700,size=64k"),
    )
    .map_err(|e| failure(format!("mount a tmpfs on {}", scratch.dir.display()), e))?;
    scratch.tmpfs = true;
    let sys = scratch.sys();
    fs::create_dir(&sys).map_err(|e| failure(format!("make {}", sys.display()), e))?;
    mount(
        Some("sysfs"),
        &sys,
        Some("sysfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| {
        failure(
            format!("mount a sysfs of the namespace on {}", sys.display()),
            e,
        )
    })?;
    scratch.sysfs = true;
    Ok(scratch)
}

/// `major:minor` as sysfs's `dev` files hold it.
fn parse_dev(text: &str) -> Option<(u64, u64)> {
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Opens a queue of macvtap `name` (ifindex `ifindex`) of the calling
/// thread's network namespace, with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`
/// and a 10-byte `virtio_net_hdr`, as the tun taps of the other modes.
/// The device node is made and removed in a private directory; nothing is
/// left in the filesystem.
pub fn open(name: &str, ifindex: u32) -> Result<OwnedFd, Failure> {
    let scratch = scratch()?;
    let queue = format!("tap{ifindex}");
    let dev_file = scratch
        .sys()
        .join("class/net")
        .join(name)
        .join("macvtap")
        .join(&queue)
        .join("dev");
    let shown = Path::new("/sys/class/net")
        .join(name)
        .join("macvtap")
        .join(&queue)
        .join("dev");
    let text = fs::read_to_string(&dev_file)
        .map_err(|e| failure(format!("read {} in the namespace", shown.display()), e))?;
    let (major, minor) = parse_dev(&text).ok_or_else(|| {
        failure(
            format!("read {} in the namespace", shown.display()),
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("`{}` is not major:minor", text.trim()),
            ),
        )
    })?;
    let node = scratch.dir.join(&queue);
    mknod(
        &node,
        SFlag::S_IFCHR,
        Mode::S_IRUSR | Mode::S_IWUSR,
        makedev(major, minor),
    )
    .map_err(|e| failure(format!("make device node {major}:{minor}"), e))?;
    let opened = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&node);
    let _ = fs::remove_file(&node);
    drop(scratch);
    let file = opened.map_err(|e| failure(format!("open /dev/{queue} ({major}:{minor})"), e))?;
    let fd = OwnedFd::from(file);
    configure(&fd, name)?;
    Ok(fd)
}

/// The queue's flags and header size, checked with `TUNGETIFF`. On a
/// macvtap queue (drivers/net/tap.c) `TUNSETIFF` ignores the name and only
/// sets the queue's flags: `IFF_TAP | IFF_NO_PI` are required, and
/// `IFF_VNET_HDR` is the feature that puts a `virtio_net_hdr` in front of
/// every frame (the driver's default already; set here so as not to rely
/// on it).
fn configure(fd: &OwnedFd, name: &str) -> Result<(), Failure> {
    // SAFETY: an all-zero ifreq is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads a `struct ifreq`, and the fd is open.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut request) } < 0 {
        return Err(failure(
            "set IFF_TAP | IFF_NO_PI | IFF_VNET_HDR on its queue (TUNSETIFF)",
            io::Error::last_os_error(),
        ));
    }
    let size = VNET_HDR_SIZE;
    // SAFETY: TUNSETVNETHDRSZ reads one int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) } < 0 {
        return Err(failure(
            "set the virtio_net_hdr size (TUNSETVNETHDRSZ)",
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: an all-zero ifreq is valid.
    let mut got: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF fills the ifreq we pass.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut got) } < 0 {
        return Err(failure(
            "read its queue's flags (TUNGETIFF)",
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: TUNGETIFF set the flags member.
    let flags = i32::from(unsafe { got.ifr_ifru.ifru_flags });
    let got_name: Vec<u8> = got
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    let wanted = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if got_name != name.as_bytes() || flags & wanted != wanted {
        return Err(failure(
            "check its queue (TUNGETIFF)",
            io::Error::other(format!(
                "the device opened is {} with flags {flags:#x}, not {name} with \
                 IFF_TAP | IFF_NO_PI | IFF_VNET_HDR",
                String::from_utf8_lossy(&got_name)
            )),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_dev;

    #[test]
    fn parses_dev_numbers() {
        assert_eq!(parse_dev("246:1\n"), Some((246, 1)));
        assert_eq!(parse_dev("246"), None);
        assert_eq!(parse_dev("a:1"), None);
    }
}
