//! virtio-pmem over a read-only image file: the guest's root file system,
//! which the guest mounts with DAX and runs from in place.
//!
//! The file is mapped shared and read-only into the VMM and, through a
//! read-only KVM memory slot, into the guest above its RAM. The guest's
//! loads of it are the host's page cache of the file: one copy for every
//! VM on the host, none of it in any VM's RAM. The guest cannot change
//! it: its writes to the region become MMIO exits that no device claims.
//!
//! The one request of virtio-pmem, FLUSH, has nothing to write back for a
//! read-only file: it is answered at once with success.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::Path,
    sync::{Arc, Mutex},
};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::Bytes;

use crate::{
    memory::GuestMemory,
    virtio::{
        notify_used,
        queue_device::{QueueDevice, QueueHandler},
        Interrupt,
    },
    vm::{DeviceMemory, GuestAccess, Vm},
    VmmError,
};

/// The virtio device ID of a persistent memory device.
pub const DEVICE_TYPE: u32 = 27;
/// The guest maps device memory in sections of this size (Linux's
/// subsection): the region's address and size are multiples of it.
pub const ALIGNMENT: u64 = 2 << 20;
/// One request queue.
const QUEUE_SIZES: &[u16] = &[16];
/// `virtio_pmem_req.type` of a flush, the only request there is.
const REQ_TYPE_FLUSH: u32 = 0;
/// `virtio_pmem_resp.ret`: 0 for success, anything else for failure.
const RESP_OK: u32 = 0;
const RESP_FAILED: u32 = 1;

/// The kernel command line that makes the first pmem device the guest's
/// root: ext4, read-only, executed in place (DAX), with runv-agent at
/// /init as in the initramfs. The device appears asynchronously, after
/// the kernel would first look for its root; a guest that has not found it
/// within 20 s panics (and so resets) instead of waiting in silence.
pub const ROOT_KERNEL_PARAMS: &str =
    "root=/dev/pmem0 rootfstype=ext4 rootflags=dax ro rootwait=20 init=/init";

/// The image file mapped into the host and the guest; dropping it takes
/// it out of the guest, then out of the host. The VM's owner holds it
/// (not the device, which ends on the event loop's confined thread).
pub struct ImageMapping {
    device_memory: Arc<DeviceMemory>,
    slot: u32,
    guest_address: u64,
    /// The host mapping's address (a pointer kept as an integer, so that
    /// the device can move between threads).
    host_address: usize,
    len: usize,
}

impl ImageMapping {
    /// Maps `file` (of `file_len` bytes, not empty) at `guest_address`;
    /// the region is rounded up to [`ALIGNMENT`] with zero pages.
    fn new(vm: &Vm, file: &File, file_len: u64, guest_address: u64) -> Result<Self, VmmError> {
        let len = file_len.next_multiple_of(ALIGNMENT);
        let len_usize = usize::try_from(len).map_err(|e| VmmError::Memory(e.to_string()))?;
        let file_len_usize =
            usize::try_from(file_len).map_err(|e| VmmError::Memory(e.to_string()))?;
        // The whole region first, as zero pages that cannot be written; the
        // file over its start. Past the file's last page the guest reads
        // zeros instead of faulting the VMM with SIGBUS.
        // SAFETY: a fresh mapping at an address of the kernel's choice.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(os_error("reserving the pmem region"));
        }
        // SAFETY: replaces the first pages of the mapping made above, which
        // is ours, with the file, read-only.
        let over = unsafe {
            libc::mmap(
                base,
                file_len_usize,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_FIXED,
                file.as_raw_fd(),
                0,
            )
        };
        let unmap = || {
            // SAFETY: the region mapped above, which nothing else uses.
            unsafe { libc::munmap(base, len_usize) };
        };
        if over == libc::MAP_FAILED {
            let error = os_error("mapping the pmem image");
            unmap();
            return Err(error);
        }
        // SAFETY: the mapping stays until this value's drop, which deletes
        // the slot first.
        let slot = unsafe {
            vm.device_memory()
                .map(guest_address, len, base.cast(), GuestAccess::ReadOnly)
        };
        match slot {
            Ok(slot) => Ok(ImageMapping {
                device_memory: vm.device_memory().clone(),
                slot,
                guest_address,
                host_address: base as usize,
                len: len_usize,
            }),
            Err(e) => {
                unmap();
                Err(e)
            }
        }
    }
}

impl ImageMapping {
    /// The guest-physical end of the region.
    pub fn guest_end(&self) -> u64 {
        self.guest_address + self.len as u64
    }
}

impl Drop for ImageMapping {
    fn drop(&mut self) {
        if let Err(e) = self.device_memory.unmap(self.slot) {
            tracing::warn!(error = %e, "cannot take the pmem image out of the guest");
            // The guest may still reach the mapping: keep it.
            return;
        }
        // SAFETY: the mapping made in `new`, which no slot refers to now.
        unsafe { libc::munmap(self.host_address as *mut libc::c_void, self.len) };
    }
}

fn os_error(what: &str) -> VmmError {
    VmmError::Memory(format!("{what}: {}", std::io::Error::last_os_error()))
}

/// The driver's queue while the device runs.
struct Active {
    memory: GuestMemory,
    queue: Queue,
    interrupt: Interrupt,
}

/// The device, shared between its transport and the event loop.
pub type SharedPmem = Arc<Mutex<QueueDevice<Pmem>>>;

/// A read-only virtio-pmem device over an image file.
pub struct Pmem {
    /// `start` and `size` of the region, little endian.
    config: [u8; 16],
    active: Option<Active>,
}

impl Pmem {
    /// Maps the image at `path` into `vm` at `guest_address` (a multiple
    /// of [`ALIGNMENT`], above RAM and clear of every other device) and
    /// returns the device and the mapping, which must outlive the guest's
    /// use of the device.
    pub fn new(
        vm: &Vm,
        path: &Path,
        guest_address: u64,
    ) -> Result<(SharedPmem, ImageMapping), VmmError> {
        let image_error =
            |why: String| VmmError::Device(format!("pmem root image {}: {why}", path.display()));
        let file = File::open(path).map_err(|e| image_error(e.to_string()))?;
        let file_len = file
            .metadata()
            .map_err(|e| image_error(e.to_string()))?
            .len();
        if file_len == 0 {
            return Err(image_error("the file is empty".into()));
        }
        if guest_address % ALIGNMENT != 0 {
            return Err(image_error(format!(
                "guest address {guest_address:#x} is not aligned to {ALIGNMENT:#x}"
            )));
        }
        let mapping = ImageMapping::new(vm, &file, file_len, guest_address)?;
        let size = mapping.len as u64;
        let mut config = [0; 16];
        config[..8].copy_from_slice(&guest_address.to_le_bytes());
        config[8..].copy_from_slice(&size.to_le_bytes());
        let device = QueueDevice::shared(Pmem {
            config,
            active: None,
        })?;
        Ok((device, mapping))
    }
}

impl QueueHandler for Pmem {
    const DEVICE_TYPE: u32 = DEVICE_TYPE;
    const QUEUE_MAX_SIZES: &'static [u16] = QUEUE_SIZES;

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn activate(
        &mut self,
        memory: GuestMemory,
        queues: Vec<Queue>,
        _features: u64,
        interrupt: Interrupt,
    ) -> Result<(), String> {
        if self.active.is_some() {
            return Err("virtio-pmem is already active".into());
        }
        let queue = queues
            .into_iter()
            .next()
            .ok_or("virtio-pmem needs its request queue")?;
        self.active = Some(Active {
            memory,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn process_queue(&mut self, _queue: usize) {
        let Some(Active {
            memory,
            queue,
            interrupt,
        }) = self.active.as_mut()
        else {
            return;
        };
        let mut answered = false;
        while let Some(chain) = queue.pop_descriptor_chain(&*memory) {
            let head = chain.head_index();
            let written = answer(memory, chain);
            if let Err(e) = queue.add_used(&*memory, head, written) {
                tracing::warn!(error = %e, "cannot return a pmem request");
            }
            answered = true;
        }
        if answered {
            notify_used(queue, memory, interrupt);
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

/// Answers one request: a 4-byte type the device reads, then a 4-byte
/// result it writes. Returns the bytes written; a malformed request gets
/// no answer.
fn answer(memory: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> u32 {
    let descriptors: Vec<_> = chain.collect();
    let [request, response] = descriptors.as_slice() else {
        tracing::debug!(count = descriptors.len(), "pmem request of the wrong shape");
        return 0;
    };
    if request.is_write_only()
        || !response.is_write_only()
        || request.len() < 4
        || response.len() < 4
    {
        tracing::debug!("pmem request with the wrong buffers");
        return 0;
    }
    let Ok(kind) = memory.read_obj::<u32>(request.addr()) else {
        return 0;
    };
    let result = if u32::from_le(kind) == REQ_TYPE_FLUSH {
        RESP_OK
    } else {
        RESP_FAILED
    };
    match memory.write_obj(result.to_le(), response.addr()) {
        Ok(()) => 4,
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use crate::{memory::create_guest_memory, virtio::test_driver::Ring};

    const BUFFERS: u64 = 0x10_0000;

    /// Sends one request made of `parts` (length, write-only), `kind` in
    /// its first buffer; returns the length the device reported and what
    /// its last buffer then holds.
    fn request(parts: &[(u32, bool)], kind: u32) -> (u32, u32) {
        let memory = create_guest_memory(4 << 20).unwrap();
        let (mut ring, mut queue) = Ring::new(&memory, 0);
        let address_of = |index: u16| BUFFERS + 0x100 * u64::from(index);
        let chain = ring.add_chain(&memory, parts, address_of);
        let last = GuestAddress(address_of(*chain.last().unwrap()));
        memory.write_obj(0xffff_ffff_u32, last).unwrap();
        memory
            .write_obj(kind.to_le(), GuestAddress(address_of(chain[0])))
            .unwrap();
        ring.publish(&memory, chain[0]);
        let popped = queue.pop_descriptor_chain(&memory).unwrap();
        let written = answer(&memory, popped);
        (written, u32::from_le(memory.read_obj(last).unwrap()))
    }

    #[test]
    fn flush_succeeds_at_once() {
        assert_eq!(
            request(&[(4, false), (4, true)], REQ_TYPE_FLUSH),
            (4, RESP_OK)
        );
    }

    #[test]
    fn unknown_request_fails() {
        assert_eq!(request(&[(4, false), (4, true)], 7), (4, RESP_FAILED));
    }

    #[test]
    fn malformed_requests_get_no_answer() {
        let shapes: [&[(u32, bool)]; 5] = [
            &[(4, false)],
            &[(4, true), (4, true)],
            &[(4, false), (2, true)],
            &[(4, false), (4, false)],
            &[(4, false), (4, true), (4, true)],
        ];
        for parts in shapes {
            let (written, last) = request(parts, REQ_TYPE_FLUSH);
            assert_eq!(written, 0, "{parts:?}");
            // The last buffer is the request's own where it is readable.
            if parts.last().unwrap().1 {
                assert_eq!(last, 0xffff_ffff, "{parts:?}");
            }
        }
    }
}
