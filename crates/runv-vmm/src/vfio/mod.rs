//! PCI functions passed through to the guest with VFIO: a VF of an SR-IOV
//! NIC, bound to vfio-pci on the host (docs/vfio.md).

use std::path::PathBuf;

/// A host PCI function to pass through.
#[derive(Debug, Clone)]
pub struct VfioConfig {
    /// The function's sysfs directory, `/sys/bus/pci/devices/<BDF>`; the
    /// function must be bound to vfio-pci.
    pub sysfs_path: PathBuf,
}
