//! The virtio-vsock packet (virtio spec 5.10.6): a 44-byte little-endian
//! header, then `len` bytes of payload, read from the guest's tx chains and
//! written into its rx chains.

use std::io::Read;

use virtio_queue::{DescriptorChain, Reader, Writer};

use crate::memory::GuestMemory;

/// The size of the packet header on the wire.
pub const HEADER_LEN: usize = 44;
/// The host's address.
pub const HOST_CID: u64 = 2;
/// The only socket type this device supports.
pub const TYPE_STREAM: u16 = 1;

/// `flags` of a SHUTDOWN: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `flags` of a SHUTDOWN: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// The operation a packet carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Request = 1,
    Response = 2,
    Rst = 3,
    Shutdown = 4,
    Rw = 5,
    CreditUpdate = 6,
    CreditRequest = 7,
}

impl Op {
    pub fn from_wire(op: u16) -> Option<Op> {
        Some(match op {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// A packet header, fields in host order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub socket_type: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn from_bytes(bytes: &[u8; HEADER_LEN]) -> Header {
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            socket_type: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        bytes[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.len.to_le_bytes());
        bytes[28..30].copy_from_slice(&self.socket_type.to_le_bytes());
        bytes[30..32].copy_from_slice(&self.op.to_le_bytes());
        bytes[32..36].copy_from_slice(&self.flags.to_le_bytes());
        bytes[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        bytes[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        bytes
    }

    /// The operation, if it is one the spec defines.
    pub fn op(&self) -> Option<Op> {
        Op::from_wire(self.op)
    }
}

/// Why a chain from the guest could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("the chain's buffers lie outside guest memory: {0}")]
    Memory(virtio_queue::Error),
    #[error("the chain's readable part is {0} bytes, shorter than a packet header")]
    ShortHeader(usize),
    #[error("the header announces {announced} payload bytes, the chain holds {available}")]
    ShortPayload { announced: u32, available: usize },
    #[error("the rx buffer is {0} bytes, too small for a packet header")]
    SmallRxBuffer(usize),
}

/// A packet the guest sent: its header and a reader positioned at exactly
/// `header.len` payload bytes.
pub struct TxPacket<'a> {
    pub header: Header,
    pub payload: Reader<'a>,
}

/// Parses the packet in a tx chain. The header is taken from the chain's
/// device-readable part only, so a header placed in a write-only descriptor
/// reads as too short.
pub fn read_tx_packet<'a>(
    chain: DescriptorChain<&'a GuestMemory>,
    memory: &'a GuestMemory,
) -> Result<TxPacket<'a>, ChainError> {
    let mut reader = chain.reader(memory).map_err(ChainError::Memory)?;
    let available = reader.available_bytes();
    let mut bytes = [0u8; HEADER_LEN];
    if available < HEADER_LEN || reader.read_exact(&mut bytes).is_err() {
        return Err(ChainError::ShortHeader(available));
    }
    let header = Header::from_bytes(&bytes);
    let payload_available = reader.available_bytes();
    if header.len as usize > payload_available {
        return Err(ChainError::ShortPayload {
            announced: header.len,
            available: payload_available,
        });
    }
    // Split off whatever follows the payload, so readers see exactly `len`.
    let _rest = reader
        .split_at(header.len as usize)
        .map_err(|_| ChainError::ShortPayload {
            announced: header.len,
            available: payload_available,
        })?;
    Ok(TxPacket {
        header,
        payload: reader,
    })
}

/// An rx chain ready to take one packet.
pub struct RxBuffer<'a> {
    header: Writer<'a>,
    payload: Writer<'a>,
}

impl<'a> RxBuffer<'a> {
    pub fn new(
        chain: DescriptorChain<&'a GuestMemory>,
        memory: &'a GuestMemory,
    ) -> Result<RxBuffer<'a>, ChainError> {
        let mut header = chain.writer(memory).map_err(ChainError::Memory)?;
        let size = header.available_bytes();
        let payload = header
            .split_at(HEADER_LEN)
            .map_err(|_| ChainError::SmallRxBuffer(size))?;
        Ok(RxBuffer { header, payload })
    }

    /// How many payload bytes fit.
    pub fn payload_room(&self) -> usize {
        self.payload.available_bytes()
    }

    /// Writes the packet; `payload` must fit in [`Self::payload_room`].
    /// Returns the bytes written, for the used ring.
    pub fn write(mut self, header: Header, payload: &[u8]) -> std::io::Result<u32> {
        use std::io::Write;
        self.payload.write_all(payload)?;
        self.header.write_all(&header.to_bytes())?;
        Ok((HEADER_LEN + payload.len()) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_little_endian() {
        let header = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x0102_0304,
            dst_port: 1024,
            len: 5,
            socket_type: TYPE_STREAM,
            op: Op::Rw as u16,
            flags: SHUTDOWN_SEND,
            buf_alloc: 0x10000,
            fwd_cnt: 7,
        };
        let bytes = header.to_bytes();
        assert_eq!(&bytes[0..8], &3u64.to_le_bytes());
        assert_eq!(&bytes[16..20], &[4, 3, 2, 1]);
        assert_eq!(&bytes[30..32], &[5, 0]);
        assert_eq!(Header::from_bytes(&bytes), header);
        assert_eq!(header.op(), Some(Op::Rw));
        assert_eq!(Op::from_wire(0), None);
        assert_eq!(Op::from_wire(8), None);
    }
}
