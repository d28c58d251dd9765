//! Guest memory and queues in the vm-memory and virtio-queue versions
//! fuse-backend-rs is built on (0.17), one behind the VMM's (0.18); the
//! two are different types to the compiler, not different data.
//!
//! The memory is the VMM's own mapping seen through the older types:
//! every guest address is the same host page for the guest, the VMM and
//! this device, boot files mapped privately over RAM (boot.rs) included,
//! which a second mapping of the memfd would not see. A queue is
//! carried over by its state (ring addresses, size, positions) at
//! activation; from then on only the device uses it.

use fuse_virtio_queue::QueueState;
use virtio_queue::Queue;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::memory::GuestMemory;

/// Guest RAM as fuse-backend-rs reads and writes it.
pub(super) type FuseMemory = fuse_vm_memory::GuestMemoryMmap<()>;
/// A queue as fuse-backend-rs takes descriptor chains from it.
pub(super) type FuseQueue = fuse_virtio_queue::Queue;

/// `memory`'s regions at the same host and guest addresses, without a
/// mapping of their own: the caller keeps `memory` alive for as long as
/// it uses the result.
pub(super) fn fuse_memory(memory: &GuestMemory) -> Result<FuseMemory, String> {
    let regions = memory
        .iter()
        .map(|region| {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| format!("guest RAM at {:#x}: {e}", region.start_addr().raw_value()))?;
            let len = region.len() as usize;
            // SAFETY: the range is one whole region of the VMM's guest
            // RAM; the view does not unmap it (a raw region is not owned)
            // and the device that holds the view holds `memory` too.
            let view = unsafe {
                fuse_vm_memory::MmapRegion::build_raw(
                    host,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                )
            }
            .map_err(|e| format!("viewing guest RAM: {e}"))?;
            fuse_vm_memory::GuestRegionMmap::new(
                view,
                fuse_vm_memory::GuestAddress(region.start_addr().raw_value()),
            )
            .ok_or_else(|| "guest RAM region overflows the address space".to_owned())
        })
        .collect::<Result<Vec<_>, String>>()?;
    FuseMemory::from_regions(regions).map_err(|e| format!("viewing guest RAM: {e}"))
}

/// The same ring, as the older virtio-queue's queue.
pub(super) fn fuse_queue(queue: &Queue) -> Result<FuseQueue, String> {
    let state = queue.state();
    FuseQueue::try_from(QueueState {
        max_size: state.max_size,
        next_avail: state.next_avail,
        next_used: state.next_used,
        event_idx_enabled: state.event_idx_enabled,
        size: state.size,
        ready: state.ready,
        desc_table: state.desc_table,
        avail_ring: state.avail_ring,
        used_ring: state.used_ring,
    })
    .map_err(|e| format!("carrying a queue over: {e}"))
}
