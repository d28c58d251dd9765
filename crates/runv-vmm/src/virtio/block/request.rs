//! A virtio-blk request as the driver laid it out in one descriptor chain:
//! a header the device reads, data the device reads (writes, discard and
//! write-zeroes ranges) or writes (reads, the ID), and a status byte it
//! writes last (virtio spec 5.2.6).

use std::collections::VecDeque;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::{desc::split::Descriptor, DescriptorChain};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMemory;

/// The unit of virtio-blk addresses, whatever the backend's block size.
pub(super) const SECTOR_SIZE: u64 = 512;
/// type, reserved, sector.
const HEADER_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> RequestType {
        match value {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

/// Guest buffers in chain order, each checked to lie in guest memory.
#[derive(Default)]
pub(super) struct Buffers(VecDeque<(GuestAddress, usize)>);

impl Buffers {
    /// Their total length.
    pub(super) fn len(&self) -> usize {
        self.0.iter().map(|&(_, len)| len).sum()
    }

    /// Reads the next `buf.len()` bytes, consuming them.
    pub(super) fn read_exact(&mut self, memory: &GuestMemory, buf: &mut [u8]) -> Result<(), ()> {
        let mut filled = 0;
        while filled < buf.len() {
            let (address, len) = self.0.pop_front().ok_or(())?;
            let take = len.min(buf.len() - filled);
            memory
                .read_slice(&mut buf[filled..filled + take], address)
                .map_err(drop)?;
            filled += take;
            if take < len {
                self.0
                    .push_front((address.unchecked_add(take as u64), len - take));
            }
        }
        Ok(())
    }

    /// Writes as much of `bytes` as fits; returns how much did.
    pub(super) fn write(&self, memory: &GuestMemory, mut bytes: &[u8]) -> Result<usize, ()> {
        let mut written = 0;
        for &(address, len) in &self.0 {
            let take = len.min(bytes.len());
            memory.write_slice(&bytes[..take], address).map_err(drop)?;
            written += take;
            bytes = &bytes[take..];
        }
        Ok(written)
    }

    /// Host iovecs for the buffers, valid while `memory` stays mapped.
    pub(super) fn iovecs(&self, memory: &GuestMemory) -> Result<Vec<libc::iovec>, ()> {
        self.0
            .iter()
            .map(|&(address, len)| {
                let slice = memory.get_slice(address, len).map_err(drop)?;
                Ok(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: len,
                })
            })
            .collect()
    }
}

pub(super) struct Request {
    pub(super) request_type: RequestType,
    pub(super) sector: u64,
    /// What the driver gave the device to read, after the header.
    pub(super) readable: Buffers,
    /// What the driver gave the device to write, before the status byte.
    pub(super) writable: Buffers,
    pub(super) status: GuestAddress,
}

/// Why a chain is not a request.
pub(super) enum Malformed {
    /// There is a status byte to say so in.
    Answerable(GuestAddress, &'static str),
    /// No writable last byte in guest memory: the chain can only be
    /// returned.
    NoStatus,
}

impl Request {
    pub(super) fn parse(
        chain: DescriptorChain<&GuestMemory>,
        memory: &GuestMemory,
    ) -> Result<Request, Malformed> {
        let descriptors: Vec<Descriptor> = chain.collect();
        let status = match descriptors.last() {
            Some(last) if last.is_write_only() && last.len() > 0 => last
                .addr()
                .checked_add(u64::from(last.len()) - 1)
                .filter(|&status| memory.address_in_range(status))
                .ok_or(Malformed::NoStatus)?,
            _ => return Err(Malformed::NoStatus),
        };
        let malformed = |why| Malformed::Answerable(status, why);
        let (mut readable, mut writable) = (Buffers::default(), Buffers::default());
        let mut seen_writable = false;
        for (position, descriptor) in descriptors.iter().enumerate() {
            seen_writable |= descriptor.is_write_only();
            if seen_writable && !descriptor.is_write_only() {
                return Err(malformed("a readable buffer after a writable one"));
            }
            let mut len = descriptor.len() as usize;
            if position + 1 == descriptors.len() {
                len -= 1;
            }
            if len == 0 {
                continue;
            }
            if !memory.check_range(descriptor.addr(), len) {
                return Err(malformed("a buffer outside guest memory"));
            }
            let buffers = if seen_writable {
                &mut writable
            } else {
                &mut readable
            };
            buffers.0.push_back((descriptor.addr(), len));
        }
        let mut header = [0u8; HEADER_LEN];
        readable
            .read_exact(memory, &mut header)
            .map_err(|()| malformed("no readable header"))?;
        let [t0, t1, t2, t3, _, _, _, _, sector @ ..] = header;
        Ok(Request {
            request_type: RequestType::from(u32::from_le_bytes([t0, t1, t2, t3])),
            sector: u64::from_le_bytes(sector),
            readable,
            writable,
            status,
        })
    }
}
