//! Guest memory and queues in the vm-memory and virtio-queue versions
//! fuse-backend-rs is built on (0.17), one behind the VMM's (0.18); the
//! two are different types to the compiler, not different data.
//!
//! The memory is the same memfd mapped a second time: the guest's pages
//! are shared, nothing is copied, and the second mapping costs address
//! space and page tables only for pages the device touches. A queue is
//! carried over by its state (ring addresses, size, positions) at
//! activation; from then on only the device uses it.

use fuse_virtio_queue::QueueState;
use virtio_queue::Queue;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;

/// Guest RAM as fuse-backend-rs reads and writes it.
pub(super) type FuseMemory = fuse_vm_memory::GuestMemoryMmap<()>;
/// A queue as fuse-backend-rs takes descriptor chains from it.
pub(super) type FuseQueue = fuse_virtio_queue::Queue;

/// Maps `memory`'s backing file again, region by region, at the same guest
/// addresses.
pub(super) fn fuse_memory(memory: &GuestMemory) -> Result<FuseMemory, String> {
    let ranges = memory
        .iter()
        .map(|region| {
            let file = region
                .file_offset()
                .ok_or("guest RAM without a backing file cannot be shared with the fs device")?;
            Ok((
                fuse_vm_memory::GuestAddress(region.start_addr().raw_value()),
                region.len() as usize,
                Some(fuse_vm_memory::FileOffset::from_arc(
                    file.arc().clone(),
                    file.start(),
                )),
            ))
        })
        .collect::<Result<Vec<_>, String>>()?;
    FuseMemory::from_ranges_with_files(ranges).map_err(|e| format!("mapping guest RAM: {e}"))
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
