//! The virtio-blk device: features and configuration space from the
//! backend, and each request of the queue answered on the event loop.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

use super::{
    backend::Backend,
    request::{Malformed, Request, RequestType, SECTOR_SIZE},
};
use crate::{
    memory::GuestMemory,
    virtio::{
        notify_used,
        queue_device::{QueueDevice, QueueHandler},
        Interrupt,
    },
    VmmError,
};

/// The virtio device ID of a block device.
pub const DEVICE_TYPE: u32 = 2;
const QUEUE_SIZE: u16 = 256;
/// Discard and write-zeroes ranges one request may carry.
const MAX_RANGES: u32 = 32;
/// sector, num_sectors, flags.
const RANGE_LEN: usize = 16;
/// The configuration space up to `write_zeroes_may_unmap` and its padding.
const CONFIG_LEN: usize = 60;

/// What to attach.
pub struct BlockConfig {
    /// A raw image file or a host block device.
    pub path: PathBuf,
    /// The guest may only read; writes fail with an I/O error.
    pub read_only: bool,
    /// What the guest reads as the device's ID (GET_ID, Linux's
    /// /sys/block/vdX/serial): at most 20 bytes.
    pub serial: String,
}

/// The driver's queue while the device runs.
struct Active {
    memory: GuestMemory,
    queue: Queue,
    features: u64,
    interrupt: Interrupt,
}

/// A virtio-blk device with one request queue.
pub struct Block {
    backend: Backend,
    read_only: bool,
    serial: Vec<u8>,
    features: u64,
    config: [u8; CONFIG_LEN],
    active: Option<Active>,
}

impl Block {
    /// Opens the backend; wire the result as in
    /// [`crate::virtio::queue_device`].
    pub fn new(config: BlockConfig) -> Result<Arc<Mutex<QueueDevice<Block>>>, VmmError> {
        if config.serial.len() > VIRTIO_BLK_ID_BYTES as usize {
            return Err(VmmError::Device(format!(
                "block device serial {:?} is longer than {VIRTIO_BLK_ID_BYTES} bytes",
                config.serial
            )));
        }
        let backend = Backend::open(&config.path, config.read_only).map_err(|e| {
            VmmError::Device(format!("block backend {}: {e}", config.path.display()))
        })?;
        let mut features =
            1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_SIZE_MAX | 1 << VIRTIO_BLK_F_FLUSH;
        if config.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        if backend.supports_discard() {
            features |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        if backend.supports_write_zeroes() {
            features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        let config_space = config_space(&backend);
        QueueDevice::shared(Block {
            backend,
            read_only: config.read_only,
            serial: config.serial.into_bytes(),
            features,
            config: config_space,
            active: None,
        })
    }

    /// Carries out one request; returns its status and how many bytes of
    /// data it wrote into the driver's buffers.
    fn execute(&self, request: &mut Request, active: &Active) -> (u32, usize) {
        let memory = &active.memory;
        let negotiated = |feature: u32| active.features & (1 << feature) != 0;
        let result = match request.request_type {
            RequestType::In => self.read(request, memory),
            RequestType::Out if self.read_only => Err("a write to a read-only device"),
            RequestType::Out => self.write(request, memory).map(|()| 0),
            RequestType::Flush => self.backend.flush().map(|()| 0).map_err(io_error),
            RequestType::GetId => request
                .writable
                .write(memory, &self.serial_id())
                .map_err(|()| "the ID buffer is not in guest memory"),
            kind @ (RequestType::Discard | RequestType::WriteZeroes) => {
                let feature = match kind {
                    RequestType::Discard => VIRTIO_BLK_F_DISCARD,
                    _ => VIRTIO_BLK_F_WRITE_ZEROES,
                };
                if self.read_only {
                    Err("a write to a read-only device")
                } else if !negotiated(feature) {
                    return (VIRTIO_BLK_S_UNSUPP, 0);
                } else {
                    match self.apply_ranges(request, memory) {
                        Err(RangeError::Unsupported) => return (VIRTIO_BLK_S_UNSUPP, 0),
                        Err(RangeError::Failed(why)) => Err(why),
                        Ok(()) => Ok(0),
                    }
                }
            }
            RequestType::Unsupported(_) => return (VIRTIO_BLK_S_UNSUPP, 0),
        };
        match result {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(why) => {
                tracing::debug!(request = ?request.request_type, sector = request.sector, why, "block request failed");
                (VIRTIO_BLK_S_IOERR, 0)
            }
        }
    }

    /// The byte range of a read or write of `len` bytes, if it is whole
    /// sectors within the device.
    fn data_range(&self, sector: u64, len: usize) -> Result<u64, &'static str> {
        if len as u64 % SECTOR_SIZE != 0 {
            return Err("data that is not whole sectors");
        }
        self.byte_range(sector, len as u64)
    }

    /// The offset of `len` bytes at `sector`, if they lie within the device.
    fn byte_range(&self, sector: u64, len: u64) -> Result<u64, &'static str> {
        sector
            .checked_mul(SECTOR_SIZE)
            .filter(|offset| {
                offset
                    .checked_add(len)
                    .is_some_and(|end| end <= self.capacity_bytes())
            })
            .ok_or("sectors beyond the capacity")
    }

    fn read(&self, request: &Request, memory: &GuestMemory) -> Result<usize, &'static str> {
        let len = request.writable.len();
        let offset = self.data_range(request.sector, len)?;
        let mut iovecs = request
            .writable
            .iovecs(memory)
            .map_err(|()| "a buffer outside guest memory")?;
        self.backend
            .read_at(&mut iovecs, offset)
            .map_err(io_error)?;
        Ok(len)
    }

    fn write(&self, request: &Request, memory: &GuestMemory) -> Result<(), &'static str> {
        let offset = self.data_range(request.sector, request.readable.len())?;
        let mut iovecs = request
            .readable
            .iovecs(memory)
            .map_err(|()| "a buffer outside guest memory")?;
        self.backend.write_at(&mut iovecs, offset).map_err(io_error)
    }

    /// Discards or zeroes every range of a discard or write-zeroes request.
    fn apply_ranges(&self, request: &mut Request, memory: &GuestMemory) -> Result<(), RangeError> {
        let data_len = request.readable.len();
        if data_len == 0 || data_len % RANGE_LEN != 0 || data_len / RANGE_LEN > MAX_RANGES as usize
        {
            return Err(RangeError::Failed("a malformed list of ranges"));
        }
        let mut ranges = vec![0u8; data_len];
        request
            .readable
            .read_exact(memory, &mut ranges)
            .map_err(|()| RangeError::Failed("ranges outside guest memory"))?;
        for range in ranges.chunks_exact(RANGE_LEN) {
            let field = |at: usize, len: usize| {
                let mut bytes = [0u8; 8];
                bytes[..len].copy_from_slice(&range[at..at + len]);
                u64::from_le_bytes(bytes)
            };
            let (sector, sectors, flags) = (field(0, 8), field(8, 4), field(12, 4) as u32);
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
                return Err(RangeError::Unsupported);
            }
            let len = sectors * SECTOR_SIZE;
            let offset = self.byte_range(sector, len).map_err(RangeError::Failed)?;
            let done = if request.request_type == RequestType::Discard {
                // The spec keeps the unmap flag of a discard reserved.
                if unmap {
                    return Err(RangeError::Unsupported);
                }
                self.backend.discard(offset, len)
            } else {
                self.backend.write_zeroes(offset, len, unmap)
            };
            done.map_err(|e| RangeError::Failed(io_error(e)))?;
        }
        Ok(())
    }

    /// The ID: the serial, NUL-padded to 20 bytes (no NUL when it fills them).
    fn serial_id(&self) -> [u8; VIRTIO_BLK_ID_BYTES as usize] {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        id[..self.serial.len()].copy_from_slice(&self.serial);
        id
    }

    fn capacity_bytes(&self) -> u64 {
        self.backend.size() / SECTOR_SIZE * SECTOR_SIZE
    }
}

enum RangeError {
    Unsupported,
    Failed(&'static str),
}

fn io_error(e: std::io::Error) -> &'static str {
    tracing::debug!(error = %e, "block backend I/O failed");
    "backend I/O failed"
}

/// `struct virtio_blk_config` (virtio spec 5.2.4), little-endian.
fn config_space(backend: &Backend) -> [u8; CONFIG_LEN] {
    let mut config = [0u8; CONFIG_LEN];
    let mut put = |offset: usize, bytes: &[u8]| {
        config[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(0, &(backend.size() / SECTOR_SIZE).to_le_bytes()); // capacity
                                                           // A descriptor's length is 32 bits: any segment the driver can
                                                           // describe is fine.
    put(8, &u32::MAX.to_le_bytes()); // size_max
                                     // Without indirect descriptors a request needs a header and a status
                                     // descriptor besides its data (Linux checks seg_max against this).
    put(12, &u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
    if backend.supports_discard() {
        let granularity = (backend.discard_granularity() / SECTOR_SIZE) as u32;
        put(36, &u32::MAX.to_le_bytes()); // max_discard_sectors
        put(40, &MAX_RANGES.to_le_bytes()); // max_discard_seg
        put(44, &granularity.to_le_bytes()); // discard_sector_alignment
    }
    if backend.supports_write_zeroes() {
        put(48, &u32::MAX.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_RANGES.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[u8::from(backend.supports_discard())]); // write_zeroes_may_unmap
    }
    config
}

impl QueueHandler for Block {
    const DEVICE_TYPE: u32 = DEVICE_TYPE;
    const QUEUE_MAX_SIZES: &'static [u16] = &[QUEUE_SIZE];

    fn features(&self) -> u64 {
        self.features
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn activate(
        &mut self,
        memory: GuestMemory,
        queues: Vec<Queue>,
        features: u64,
        interrupt: Interrupt,
    ) -> Result<(), String> {
        let Ok([queue]) = <[Queue; 1]>::try_from(queues) else {
            return Err("virtio-blk has one queue".into());
        };
        if self.active.is_some() {
            return Err("virtio-blk is already active".into());
        }
        self.active = Some(Active {
            memory,
            queue,
            features,
            interrupt,
        });
        Ok(())
    }

    fn process_queue(&mut self, _queue: usize) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        let mut returned = false;
        while let Some(chain) = active.queue.pop_descriptor_chain(&active.memory) {
            let head = chain.head_index();
            let used = match Request::parse(chain, &active.memory) {
                Ok(mut request) => {
                    let (status, written) = self.execute(&mut request, &active);
                    answer(&active.memory, request.status, status, written)
                }
                Err(Malformed::Answerable(status, why)) => {
                    tracing::debug!(why, "malformed block request");
                    answer(&active.memory, status, VIRTIO_BLK_S_IOERR, 0)
                }
                Err(Malformed::NoStatus) => {
                    tracing::debug!("block request without a status byte returned unanswered");
                    0
                }
            };
            if let Err(e) = active.queue.add_used(&active.memory, head, used) {
                tracing::warn!(error = %e, "cannot return a block request");
            }
            returned = true;
        }
        if returned {
            notify_used(&mut active.queue, &active.memory, &active.interrupt);
        }
        self.active = Some(active);
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

/// Writes the status byte; returns the used length: the data written and
/// the status.
fn answer(
    memory: &GuestMemory,
    status_at: vm_memory::GuestAddress,
    status: u32,
    written: usize,
) -> u32 {
    match memory.write_obj(status as u8, status_at) {
        Ok(()) => written as u32 + 1,
        Err(e) => {
            tracing::warn!(error = %e, "cannot write a block request's status");
            0
        }
    }
}
