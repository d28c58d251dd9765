//! A host end for virtio-net that is a socket instead of a tap, so that
//! the device can be driven without CAP_NET_ADMIN (the fuzz targets).
//! Frames cross it exactly as they cross a tap: one message each, with
//! its `virtio_net_hdr_v1` in front; there are no offloads to set.

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd, RawFd},
};

use super::tap::{read_fd, writev_fd, NetBackend};

pub(crate) struct SocketBackend {
    fd: OwnedFd,
}

impl SocketBackend {
    /// `fd` must be non-blocking, like a tap the device set up.
    pub(crate) fn new(fd: OwnedFd) -> SocketBackend {
        SocketBackend { fd }
    }
}

impl NetBackend for SocketBackend {
    fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        read_fd(self.fd.as_raw_fd(), buf)
    }

    fn write_frame(&mut self, iovecs: &[libc::iovec]) -> io::Result<usize> {
        writev_fd(self.fd.as_raw_fd(), iovecs)
    }

    fn set_offload(&mut self, _tun_flags: u32) -> io::Result<()> {
        Ok(())
    }
}
