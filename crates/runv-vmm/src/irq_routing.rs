//! The VM's GSI routing table: the in-kernel irqchip's default routes for
//! GSIs 0..24 (which KVM_SET_GSI_ROUTING would otherwise drop) and one MSI
//! route per vector that a PCI function uses.

use std::sync::Arc;

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::VmmError;

/// MSI routes and the irqfds that fire them.
pub struct IrqRouting {}

impl IrqRouting {
    pub(crate) fn new(vm: Arc<VmFd>) -> IrqRouting {
        todo!("{}", Arc::strong_count(&vm))
    }

    /// A GSI of its own (above the IOAPIC's pins), with no route yet.
    pub fn allocate_gsi(&self) -> Result<u32, VmmError> {
        todo!()
    }

    /// Routes `gsi` to the MSI message `address`/`data`.
    pub fn set_msi_route(&self, gsi: u32, address: u64, data: u32) -> Result<(), VmmError> {
        todo!("{gsi} {address} {data}")
    }

    /// Drops `gsi`'s route and returns the GSI to the pool.
    pub fn release_gsi(&self, gsi: u32) -> Result<(), VmmError> {
        todo!("{gsi}")
    }

    pub fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<(), VmmError> {
        todo!("{} {gsi}", event.as_raw_fd())
    }

    pub fn unregister_irqfd(&self, event: &EventFd, gsi: u32) -> Result<(), VmmError> {
        todo!("{} {gsi}", event.as_raw_fd())
    }
}

use std::os::fd::AsRawFd as _;
