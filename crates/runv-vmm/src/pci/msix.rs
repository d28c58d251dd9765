//! MSI-X emulated in front of a device whose interrupts arrive on
//! eventfds: the guest programs the table and mask bits here, and KVM
//! delivers each vector from its eventfd (irqfd) to the MSI route the guest
//! programmed, without the VMM in the path.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::{irq_routing::IrqRouting, VmmError};

/// Bytes per MSI-X table entry: address low, address high, data, control.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;

/// The MSI-X vectors of one function: table, pending bits, one GSI and one
/// eventfd per vector.
pub struct MsixVectors {}

impl MsixVectors {
    /// `count` vectors, masked, with a GSI each from `routing`.
    pub fn new(routing: Arc<IrqRouting>, count: u16) -> Result<MsixVectors, VmmError> {
        todo!("{}", Arc::strong_count(&routing) + usize::from(count))
    }

    /// The eventfd that raises each vector, for the device's back-end
    /// (VFIO_DEVICE_SET_IRQS).
    pub fn eventfds(&self) -> Vec<&EventFd> {
        todo!()
    }

    /// A guest read at `offset` in the table.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        todo!("{offset} {data:?}")
    }

    /// A guest write at `offset` in the table: a vector's new route, or its
    /// mask bit, reach KVM at once.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Result<(), VmmError> {
        todo!("{offset} {data:?}")
    }

    /// A guest read at `offset` in the pending-bit array.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        todo!("{offset} {data:?}")
    }

    /// The capability's Message Control as the guest wrote it (enable, bit
    /// 15; function mask, bit 14). Returns whether MSI-X was just enabled
    /// (`Some(true)`) or disabled (`Some(false)`), for the back-end.
    pub fn set_control(&mut self, control: u16) -> Result<Option<bool>, VmmError> {
        todo!("{control}")
    }
}
