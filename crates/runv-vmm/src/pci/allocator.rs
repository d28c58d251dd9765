//! Guest-physical addresses for BARs, handed out as firmware would.

use crate::{pci::BarKind, VmmError};

/// Hands out naturally aligned BAR addresses: 32-bit BARs in the MMIO gap
/// above the virtio-mmio slots and below the IOAPIC, 64-bit BARs in a
/// window above guest RAM.
pub struct BarAllocator {}

impl BarAllocator {
    /// An allocator for a VM whose RAM ends (highest address + 1) at
    /// `ram_end`.
    pub fn new(ram_end: u64) -> BarAllocator {
        todo!("{ram_end}")
    }

    /// A free, `size`-aligned range of `size` bytes (a power of two) for a
    /// BAR of `kind`.
    pub fn allocate(&mut self, size: u64, kind: BarKind) -> Result<u64, VmmError> {
        todo!("{size} {kind:?}")
    }
}
