//! A PCI root bus for the devices that runv passes through with VFIO
//! (docs/vfio.md). Virtio devices stay on virtio-mmio slots; PCI exists
//! only because a passed-through function is a PCI function.
//!
//! The guest reaches configuration space through the legacy port pair
//! 0xcf8/0xcfc (`PciConfigIo`), which Linux probes without ACPI. The VMM
//! plays firmware: it places every BAR itself (`BarAllocator`) and the
//! guest keeps those places; a BAR write other than the sizing protocol's
//! is ignored. Interrupts are MSI-X only (`MsixVectors`), routed by KVM.

mod allocator;
mod bar;
mod config_io;
mod msix;
mod root;

pub use allocator::BarAllocator;
pub use bar::{Bar, BarKind, BarRegisters, BAR_COUNT, FIRST_BAR_REGISTER};
pub use config_io::{PciConfigIo, CONFIG_IO_PORT, CONFIG_IO_PORT_LEN};
pub use msix::{MsixVectors, MSIX_TABLE_ENTRY_SIZE};
pub use root::PciRoot;

/// A function on the root bus, as configuration space sees it.
pub trait PciDevice: Send {
    /// The 32-bit configuration register `register` (byte offset / 4).
    fn read_config(&mut self, register: usize) -> u32;
    /// A write of `data` (1, 2 or 4 bytes) at byte `offset` (0..4) of
    /// configuration register `register`.
    fn write_config(&mut self, register: usize, offset: u64, data: &[u8]);
}
