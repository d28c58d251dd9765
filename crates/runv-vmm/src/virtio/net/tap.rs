//! The host end of a virtio-net device: a tap opened by the caller with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, so that every frame read or
//! written carries a `virtio_net_hdr_v1` in front, exactly as the guest
//! lays it out. The device only moves bytes; the kernel's tap driver does
//! checksums and segmentation from what the header says.

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd, RawFd},
};

/// `struct virtio_net_hdr_v1`: the header of every frame with
/// VIRTIO_F_VERSION_1, `num_buffers` included whatever else is negotiated.
pub(crate) const VNET_HDR_LEN: usize = 12;

/// What the device needs of its host end; a tap in production, a socket
/// pair in tests.
pub(crate) trait NetBackend: Send + 'static {
    /// Watched by the event loop for frames to the guest.
    fn raw_fd(&self) -> RawFd;
    /// Reads one frame with its header; `WouldBlock` when there is none.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame with its header, gathered from `iovecs`.
    fn write_frame(&mut self, iovecs: &[libc::iovec]) -> io::Result<usize>;
    /// Which offloads the frames to the guest may use (`TUN_F_*`): only
    /// those the guest driver accepted.
    fn set_offload(&mut self, tun_flags: u32) -> io::Result<()>;
}

/// A tap device.
pub(crate) struct Tap {
    fd: OwnedFd,
}

impl Tap {
    /// Takes a tap the caller opened, checks its flags, and sets the
    /// header size and non-blocking mode. O_NONBLOCK belongs to the open
    /// file, so the caller's descriptors of it become non-blocking too.
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Tap> {
        // SAFETY: an all-zero ifreq is valid.
        let mut ifreq: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF fills the ifreq we pass and nothing else.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut ifreq) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("not a tap device: {e}")));
        }
        // SAFETY: TUNGETIFF set the flags member.
        let flags = i32::from(unsafe { ifreq.ifr_ifru.ifru_flags });
        let wanted = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if flags & wanted != wanted || flags & libc::IFF_TUN != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the tap must be opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (its flags are {flags:#x})"),
            ));
        }
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: plain fcntl on a descriptor we own.
        let status = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if status < 0
            // SAFETY: as above.
            || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, status | libc::O_NONBLOCK) } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(Tap { fd })
    }
}

impl NetBackend for Tap {
    fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        read_fd(self.fd.as_raw_fd(), buf)
    }

    fn write_frame(&mut self, iovecs: &[libc::iovec]) -> io::Result<usize> {
        writev_fd(self.fd.as_raw_fd(), iovecs)
    }

    fn set_offload(&mut self, tun_flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                tun_flags as libc::c_ulong,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

pub(crate) fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `iovecs` must point into memory that stays mapped for the call.
pub(crate) fn writev_fd(fd: RawFd, iovecs: &[libc::iovec]) -> io::Result<usize> {
    loop {
        // SAFETY: the kernel only reads the buffers the iovecs describe,
        // which the caller keeps mapped.
        let n = unsafe { libc::writev(fd, iovecs.as_ptr(), iovecs.len() as libc::c_int) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
