//! Tap devices: `/dev/net/tun` and its `TUNSETIFF` ioctl.

use std::{
    fs::OpenOptions,
    io,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::OpenOptionsExt,
    },
};

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
pub const TUN_DEVICE: &str = "/dev/net/tun";

/// `struct ifreq` as `TUNSETIFF` reads it: a name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Where opening or creating a tap failed.
#[derive(Debug)]
pub enum TapError {
    /// Opening `/dev/net/tun`.
    Open(io::Error),
    /// `TUNSETIFF`.
    SetIff(io::Error),
}

/// Creates tap `name` in the calling thread's network namespace (the one
/// `/dev/net/tun` is opened in): `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, not
/// persistent, so that the device goes away with the last copy of the fd.
pub fn create(name: &str) -> Result<OwnedFd, TapError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_DEVICE)
        .map_err(TapError::Open)?;
    let mut request = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    let bytes = name.as_bytes();
    assert!(bytes.len() < libc::IFNAMSIZ, "tap name {name} too long");
    request.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `request`
    // is laid out as, and the fd is open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut request) };
    if rc < 0 {
        return Err(TapError::SetIff(io::Error::last_os_error()));
    }
    Ok(file.into())
}
