//! The seam between the device logic and VFIO: what a passed-through
//! function must offer. The host's VFIO device is one implementation
//! (`host.rs`); tests use an in-memory function.

use std::{ops::Range, os::fd::RawFd};

use vmm_sys_util::eventfd::EventFd;

use crate::VmmError;

/// VFIO's region index of the configuration space (BARs are 0..6).
pub const CONFIG_REGION: u32 = vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;

/// One region (a BAR) as VFIO describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// 0 where the function has no such BAR.
    pub size: u64,
    /// The parts that may be mmap-ed, as offsets in the region; empty
    /// where every access must go through `read_region`/`write_region`.
    pub mappable: Vec<Range<u64>>,
}

/// A PCI function that the VMM drives on the guest's behalf.
pub trait PassthroughFunction: Send + Sync {
    /// What the VMM calls the function in errors and logs.
    fn name(&self) -> &str;
    fn region(&self, index: u32) -> RegionInfo;
    /// Reads `data.len()` bytes at `offset` of region `index`.
    fn read_region(&self, index: u32, offset: u64, data: &mut [u8]);
    fn write_region(&self, index: u32, offset: u64, data: &[u8]);
    /// Maps `range` (page-aligned, inside `RegionInfo::mappable`) of
    /// region `index` into the VMM.
    fn mmap_region(&self, index: u32, range: Range<u64>) -> Result<HostMapping, VmmError>;
    /// Delivers MSI-X vector i by signalling `events[i]`.
    fn enable_msix(&self, events: &[&EventFd]) -> Result<(), VmmError>;
    fn disable_msix(&self) -> Result<(), VmmError>;
    /// A function-level reset, so that the guest finds the function as
    /// after power-on.
    fn reset(&self);
}

/// A shared mapping in the VMM's address space, unmapped when dropped.
#[derive(Debug)]
pub struct HostMapping {
    address: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory, owned by this value alone.
unsafe impl Send for HostMapping {}

impl HostMapping {
    /// Maps `len` bytes of `fd` at `offset` (anonymous memory when `fd` is
    /// None), readable and writable, shared.
    pub fn new(fd: Option<RawFd>, offset: u64, len: u64) -> std::io::Result<HostMapping> {
        let len = usize::try_from(len).map_err(std::io::Error::other)?;
        let offset = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
        let flags = match fd {
            Some(_) => libc::MAP_SHARED,
            None => libc::MAP_SHARED | libc::MAP_ANONYMOUS,
        };
        // SAFETY: a new mapping at an address the kernel chooses; checked
        // below and owned by the returned value.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd.unwrap_or(-1),
                offset,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(HostMapping {
            address: address.cast(),
            len,
        })
    }

    pub fn address(&self) -> *mut u8 {
        self.address
    }

    pub fn size(&self) -> u64 {
        self.len as u64
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours, and its users (a KVM memory slot)
        // are gone before it.
        unsafe { libc::munmap(self.address.cast(), self.len) };
    }
}
