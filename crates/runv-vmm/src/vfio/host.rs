//! The host side of passthrough: one VFIO container per VM (its IOMMU
//! domain, known to KVM through a KVM VFIO device), the functions opened
//! in it, and the guest's RAM mapped for their DMA.

use std::{
    ops::Range,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use kvm_bindings::{kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO};
use vfio_bindings::bindings::vfio::{VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioError, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;

use crate::{
    memory::GuestMemory,
    vfio::{
        function::{HostMapping, PassthroughFunction, RegionInfo},
        VfioConfig,
    },
    Vm, VmmError,
};

const CONTAINER_PATH: &str = "/dev/vfio/vfio";

/// The VM's VFIO container.
pub struct VfioHost {
    container: Arc<VfioContainer>,
}

impl VfioHost {
    /// Opens the container and tells KVM about it (KVM then lets the
    /// guest's DMA-coherency needs follow the devices').
    pub fn new(vm: &Vm) -> Result<VfioHost, VmmError> {
        if !Path::new(CONTAINER_PATH).exists() {
            return Err(VmmError::Device(format!(
                "VFIO passthrough needs {CONTAINER_PATH}, which this host lacks: load vfio-pci \
                 (modprobe vfio-pci); the host needs an IOMMU (intel_iommu=on or amd_iommu=on \
                 on the kernel command line)"
            )));
        }
        let mut request = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        let kvm_device = vm
            .fd()
            .create_device(&mut request)
            .map_err(crate::kvm("KVM_CREATE_DEVICE (VFIO)"))?;
        let container = VfioContainer::new(Some(Arc::new(VfioDeviceFd::new_from_kvm(kvm_device))))
            .map_err(|e| VmmError::Device(format!("opening {CONTAINER_PATH}: {e}")))?;
        Ok(VfioHost {
            container: Arc::new(container),
        })
    }

    /// Opens the function of `config` in the container.
    pub fn open(&self, config: &VfioConfig) -> Result<Arc<dyn PassthroughFunction>, VmmError> {
        let path = &config.sysfs_path;
        let name = function_name(path)?;
        check_bound_to_vfio_pci(path, &name)?;
        let device = VfioDevice::new(path, self.container.clone(), false)
            .map_err(|e| open_error(path, &name, e))?;
        Ok(Arc::new(HostFunction { name, device }))
    }

    /// Maps the guest's RAM for the functions' DMA, at guest-physical
    /// addresses: the guest's driver hands those to the device. Call it
    /// after every function is open (the IOMMU is set up with the first).
    pub fn map_guest_memory(&self, memory: &GuestMemory) -> Result<DmaMapping, VmmError> {
        // SAFETY: the RAM stays mapped while the returned value holds it,
        // and it unmaps the IOMMU's view before letting go.
        unsafe { self.container.vfio_map_guest_memory(memory) }.map_err(|e| {
            // Some regions may be mapped: unmap what can be.
            let _ = self.container.vfio_unmap_guest_memory(memory);
            VmmError::Device(format!("mapping guest RAM for VFIO DMA: {e}"))
        })?;
        Ok(DmaMapping {
            container: self.container.clone(),
            memory: memory.clone(),
        })
    }
}

/// Guest RAM as the IOMMU maps it for the passed-through functions;
/// unmapped when dropped.
pub struct DmaMapping {
    container: Arc<VfioContainer>,
    memory: GuestMemory,
}

impl Drop for DmaMapping {
    fn drop(&mut self) {
        if let Err(e) = self.container.vfio_unmap_guest_memory(&self.memory) {
            tracing::warn!(error = %e, "cannot unmap guest RAM from the IOMMU");
        }
    }
}

/// `0000:3b:02.1` from `/sys/bus/pci/devices/0000:3b:02.1`, which must
/// exist.
fn function_name(path: &Path) -> Result<String, VmmError> {
    if !path.is_dir() {
        return Err(VmmError::Device(format!(
            "VFIO function {}: no such PCI function (expected /sys/bus/pci/devices/<BDF>)",
            path.display()
        )));
    }
    let name = path.file_name().unwrap_or(path.as_os_str());
    Ok(name.to_string_lossy().into_owned())
}

fn check_bound_to_vfio_pci(path: &Path, name: &str) -> Result<(), VmmError> {
    let driver = std::fs::read_link(path.join("driver"))
        .ok()
        .and_then(|link| link.file_name().map(|n| n.to_string_lossy().into_owned()));
    if driver.as_deref() == Some("vfio-pci") {
        return Ok(());
    }
    let now = driver.map_or("no driver".to_owned(), |d| format!("driver {d}"));
    Err(VmmError::Device(format!(
        "VFIO function {name} is bound to {now}, not vfio-pci: \
         echo {name} > /sys/bus/pci/devices/{name}/driver/unbind; \
         echo vfio-pci > /sys/bus/pci/devices/{name}/driver_override; \
         echo {name} > /sys/bus/pci/drivers_probe"
    )))
}

fn open_error(path: &Path, name: &str, error: VfioError) -> VmmError {
    let group = std::fs::read_link(path.join("iommu_group"))
        .ok()
        .and_then(|link| link.file_name().map(PathBuf::from));
    let group = group.as_deref().unwrap_or(Path::new("?")).display();
    let why = match error {
        VfioError::InvalidPath => {
            "it has no IOMMU group: the host needs an IOMMU (intel_iommu=on or amd_iommu=on)"
                .to_owned()
        }
        VfioError::GroupViable => format!(
            "IOMMU group {group} is not viable: every function in \
             /sys/kernel/iommu_groups/{group}/devices must be bound to vfio-pci or to no driver"
        ),
        VfioError::OpenGroup(e, _) => format!(
            "cannot open /dev/vfio/{group} ({e}): the group is another process's, or this \
             process may not open it"
        ),
        e => e.to_string(),
    };
    VmmError::Device(format!("VFIO function {name}: {why}"))
}

/// A function opened through VFIO on this host.
struct HostFunction {
    name: String,
    device: VfioDevice,
}

impl PassthroughFunction for HostFunction {
    fn name(&self) -> &str {
        &self.name
    }

    fn region(&self, index: u32) -> RegionInfo {
        let flags = self.device.get_region_flags(index);
        if flags & VFIO_REGION_INFO_FLAG_READ == 0 {
            return RegionInfo::default();
        }
        let size = self.device.get_region_size(index);
        let mappable = if flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            Vec::new()
        } else {
            // A sparse-mmap capability names the mappable parts (the rest,
            // typically the MSI-X table, is not); without it, all is.
            let caps = self.device.get_region_caps(index);
            caps.iter()
                .find_map(|cap| match cap {
                    VfioRegionInfoCap::SparseMmap(sparse) => Some(
                        sparse
                            .areas
                            .iter()
                            .map(|area| area.offset..area.offset + area.size)
                            .collect(),
                    ),
                    _ => None,
                })
                .unwrap_or_else(|| std::iter::once(0..size).collect())
        };
        RegionInfo { size, mappable }
    }

    fn read_region(&self, index: u32, offset: u64, data: &mut [u8]) {
        self.device.region_read(index, data, offset);
    }

    fn write_region(&self, index: u32, offset: u64, data: &[u8]) {
        self.device.region_write(index, data, offset);
    }

    fn mmap_region(&self, index: u32, range: Range<u64>) -> Result<HostMapping, VmmError> {
        let offset = self.device.get_region_offset(index) + range.start;
        HostMapping::new(
            Some(self.device.as_raw_fd()),
            offset,
            range.end - range.start,
        )
        .map_err(|e| {
            VmmError::Device(format!(
                "VFIO function {}: mmap of BAR {index} {range:#x?}: {e}",
                self.name
            ))
        })
    }

    fn enable_msix(&self, events: &[&EventFd]) -> Result<(), VmmError> {
        self.device.enable_msix(events.to_vec()).map_err(|e| {
            VmmError::Device(format!(
                "VFIO function {}: enabling {} MSI-X vectors: {e}",
                self.name,
                events.len()
            ))
        })
    }

    fn disable_msix(&self) -> Result<(), VmmError> {
        self.device
            .disable_msix()
            .map_err(|e| VmmError::Device(format!("VFIO function {}: {e}", self.name)))
    }

    fn reset(&self) {
        self.device.reset();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{
        memory::create_guest_memory,
        pci::{BarAllocator, PciRoot},
        vfio::VfioPciDevice,
    };

    /// The function named by RUNV_TEST_VFIO_DEVICE, when this host can
    /// pass it through; says why not otherwise.
    fn real_function() -> Option<PathBuf> {
        let reason = match std::env::var_os("RUNV_TEST_VFIO_DEVICE") {
            _ if !Path::new(CONTAINER_PATH).exists() => {
                format!("{CONTAINER_PATH} is missing: no IOMMU, or vfio-pci not loaded")
            }
            None => "RUNV_TEST_VFIO_DEVICE does not name the sysfs path of a function \
                     bound to vfio-pci"
                .to_owned(),
            Some(path) => return Some(path.into()),
        };
        println!("SKIPPED: no VFIO on this host ({reason})");
        None
    }

    #[test]
    fn a_real_function_shows_its_vendor_id_through_the_root() {
        let Some(sysfs_path) = real_function() else {
            return;
        };
        if !crate::testing::kvm_usable() {
            return;
        }
        let memory_size = 64 << 20;
        let mut vm = Vm::new(create_guest_memory(memory_size).unwrap()).unwrap();
        let host = VfioHost::new(&vm).unwrap();
        let function = host
            .open(&VfioConfig {
                sysfs_path: sysfs_path.clone(),
            })
            .unwrap();
        let mut allocator = BarAllocator::new(memory_size);
        let device = VfioPciDevice::attach(&mut vm, &mut allocator, function).unwrap();
        let mut root = PciRoot::new();
        let number = root.add_device(Arc::new(Mutex::new(device))).unwrap();
        let _dma = host.map_guest_memory(vm.memory()).unwrap();
        let vendor = std::fs::read_to_string(sysfs_path.join("vendor")).unwrap();
        let vendor = u32::from_str_radix(vendor.trim().trim_start_matches("0x"), 16).unwrap();
        assert_eq!(root.read_config(0, number, 0, 0) & 0xffff, vendor);
    }

    #[test]
    fn a_host_without_vfio_is_told_what_to_load() {
        if Path::new(CONTAINER_PATH).exists() || !crate::testing::kvm_usable() {
            return;
        }
        let vm = Vm::new(create_guest_memory(1 << 20).unwrap()).unwrap();
        let error = VfioHost::new(&vm).err().unwrap().to_string();
        assert!(error.contains("modprobe vfio-pci"), "{error}");
        assert!(error.contains("intel_iommu=on"), "{error}");
    }

    #[test]
    fn a_function_bound_to_another_driver_is_named_with_the_fix() {
        let sys = tempfile::tempdir().unwrap();
        let function = sys.path().join("0000:3b:02.1");
        std::fs::create_dir(&function).unwrap();
        std::os::unix::fs::symlink("../../../bus/pci/drivers/iavf", function.join("driver"))
            .unwrap();
        let name = function_name(&function).unwrap();
        let error = check_bound_to_vfio_pci(&function, &name)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("0000:3b:02.1 is bound to driver iavf"),
            "{error}"
        );
        assert!(error.contains("driver_override"), "{error}");
        assert!(function_name(&sys.path().join("0000:00:00.9")).is_err());
    }
}
