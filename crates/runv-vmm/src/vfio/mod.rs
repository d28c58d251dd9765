//! PCI functions passed through to the guest with VFIO: a VF of an SR-IOV
//! NIC, bound to vfio-pci on the host (docs/vfio.md).
//!
//! Passthrough is cold-plug only: the functions are attached when the
//! sandbox's VM is built, before its vCPUs start, and found by the guest's
//! PCI scan at boot; they stay until the VM ends. There is no hot-plug.
//!
//! - `host`: the VFIO container, the functions opened in it, DMA mapping.
//! - `function`: the seam between the device logic and VFIO.
//! - `config`: what the function's configuration space tells at attach.
//! - `bars`: the BARs in the guest, mapped or trapped.
//! - `device`: the function on the guest's PCI bus.

mod bars;
mod config;
mod device;
#[cfg(test)]
mod fake;
mod function;
mod host;

use std::path::PathBuf;

pub use device::VfioPciDevice;
pub use function::{HostMapping, PassthroughFunction, RegionInfo, CONFIG_REGION};
pub use host::{DmaMapping, VfioHost};

/// A host PCI function to pass through.
#[derive(Debug, Clone)]
pub struct VfioConfig {
    /// The function's sysfs directory, `/sys/bus/pci/devices/<BDF>`; the
    /// function must be bound to vfio-pci.
    pub sysfs_path: PathBuf,
}
