//! virtio-blk (device type 2): one request queue served on the VM's event
//! loop, backed by a raw image file or a host block device.
//!
//! Offered: read-only devices (VIRTIO_BLK_F_RO: writes, discards and
//! write-zeroes fail with IOERR), flush (fdatasync), discard and
//! write-zeroes where the backend can (hole punching and range zeroing on
//! files, BLKDISCARD and BLKZEROOUT on block devices), GET_ID with a serial
//! the owner chooses, SEG_MAX and SIZE_MAX. Other request types get
//! UNSUPP. A request beyond the capacity or a malformed chain gets IOERR
//! when it has a status byte to say so in, and is returned unanswered
//! otherwise.

mod backend;
mod device;
mod request;

#[cfg(test)]
mod tests;

pub(crate) use backend::{BLKDISCARD, BLKZEROOUT};
pub use device::{Block, BlockConfig, DEVICE_TYPE};
