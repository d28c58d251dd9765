//! virtio-fs (device type 26) with the FUSE server inside the VMM: no
//! virtiofsd process. fuse-backend-rs decodes the requests and serves them
//! with its passthrough file system over the shared directory; the hiprio
//! queue and one request queue are answered on the device's own worker
//! thread, whose file system root is the share ([`worker`]).
//!
//! No DAX window: it needs a shared memory region the guest maps file
//! pages through, and measurements that it pays for runv's workloads.

mod bridge;
mod device;
mod gate;
pub mod worker;

#[cfg(test)]
mod tests;

pub use device::{Fs, FsConfig, DEVICE_TYPE, MAX_TAG_LEN};
