//! A function's memory BARs in the guest. Each BAR is placed by the
//! allocator; the parts VFIO lets us mmap go straight into the guest as
//! KVM memory slots (no exits), and the rest is trapped on the MMIO bus
//! and forwarded to VFIO. The pages holding the MSI-X table and PBA are
//! always trapped: the guest programs its vectors there, in `MsixVectors`.

use std::{
    ops::Range,
    sync::{Arc, Mutex},
};

use crate::{
    bus::BusDevice,
    pci::{Bar, BarAllocator, BarRegisters, MsixVectors},
    vfio::{
        config::{BarInfo, BarPart, MsixCapability},
        function::{HostMapping, PassthroughFunction},
    },
    vm::{DeviceMemory, GuestAccess},
    Vm, VmmError,
};

/// KVM maps whole pages only.
const PAGE_SIZE: u64 = 4096;

/// Places every BAR of `bars` and makes it reachable from the guest.
/// Returns the BAR registers the guest reads and the mapped parts, which
/// leave the guest when dropped. Trapped parts stay on the bus until the
/// VM ends (passthrough is cold-plug only).
pub fn place(
    vm: &mut Vm,
    allocator: &mut BarAllocator,
    function: &Arc<dyn PassthroughFunction>,
    bars: &[BarInfo],
    msix: &MsixCapability,
    vectors: &Arc<Mutex<MsixVectors>>,
) -> Result<(BarRegisters, Vec<MappedPart>), VmmError> {
    let mut registers = BarRegisters::default();
    let mut mapped = Vec::new();
    for info in bars {
        let address = allocator.allocate(info.size, info.kind)?;
        registers.set(
            info.index,
            Bar {
                address,
                // A BAR under a page is a page in the guest; the rest of
                // that page answers nothing.
                size: BarAllocator::guest_size(info.size),
                kind: info.kind,
                prefetchable: info.prefetchable,
            },
        );
        let in_this_bar = |part: &BarPart| (part.bar == info.index).then(|| part.range.clone());
        let (table, pba) = (in_this_bar(&msix.table), in_this_bar(&msix.pba));
        let msix_pages: Vec<_> = table.iter().chain(&pba).map(whole_pages).collect();
        let direct: Vec<_> = function
            .region(info.index as u32)
            .mappable
            .iter()
            .filter_map(pages_within)
            .flat_map(|pages| subtract(pages, &msix_pages))
            .collect();
        for range in &direct {
            mapped.push(MappedPart::new(
                vm.device_memory(),
                function.as_ref(),
                info.index as u32,
                address,
                range.clone(),
            )?);
        }
        for range in subtract(0..info.size, &direct) {
            let trap = BarTrap {
                function: function.clone(),
                region: info.index as u32,
                start: range.start,
                table: table.clone(),
                pba: pba.clone(),
                vectors: vectors.clone(),
            };
            vm.mmio.insert(
                "vfio-bar",
                address + range.start,
                range.end - range.start,
                Arc::new(Mutex::new(trap)),
            )?;
        }
    }
    Ok((registers, mapped))
}

/// A part of a BAR mmap-ed from the device and mapped into the guest.
pub struct MappedPart {
    device_memory: Arc<DeviceMemory>,
    slot: u32,
    /// Unmapped after the slot is gone (fields drop after `drop`).
    _mapping: HostMapping,
}

impl MappedPart {
    fn new(
        device_memory: &Arc<DeviceMemory>,
        function: &dyn PassthroughFunction,
        region: u32,
        bar_address: u64,
        range: Range<u64>,
    ) -> Result<MappedPart, VmmError> {
        let mapping = function.mmap_region(region, range.clone())?;
        // SAFETY: the mapping lives in this value until the slot is gone.
        let slot = unsafe {
            device_memory.map(
                bar_address + range.start,
                mapping.size(),
                mapping.address(),
                GuestAccess::ReadWrite,
            )
        }?;
        Ok(MappedPart {
            device_memory: device_memory.clone(),
            slot,
            _mapping: mapping,
        })
    }
}

impl Drop for MappedPart {
    fn drop(&mut self) {
        if let Err(e) = self.device_memory.unmap(self.slot) {
            tracing::warn!(error = %e, slot = self.slot, "cannot unmap a passed-through BAR");
        }
    }
}

/// A trapped range of a BAR: MSI-X table and PBA accesses go to the
/// emulated vectors, the rest to the function through VFIO.
struct BarTrap {
    function: Arc<dyn PassthroughFunction>,
    region: u32,
    /// Where the range starts in the BAR.
    start: u64,
    table: Option<Range<u64>>,
    pba: Option<Range<u64>>,
    vectors: Arc<Mutex<MsixVectors>>,
}

impl BarTrap {
    /// `at` as an offset into the table or PBA, when it is in one.
    fn locate(range: &Option<Range<u64>>, at: u64) -> Option<u64> {
        range
            .as_ref()
            .filter(|range| range.contains(&at))
            .map(|range| at - range.start)
    }
}

impl BusDevice for BarTrap {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let at = self.start + offset;
        if let Some(offset) = Self::locate(&self.table, at) {
            self.vectors
                .lock()
                .expect("MSI-X lock")
                .read_table(offset, data);
        } else if let Some(offset) = Self::locate(&self.pba, at) {
            self.vectors
                .lock()
                .expect("MSI-X lock")
                .read_pba(offset, data);
        } else {
            self.function.read_region(self.region, at, data);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let at = self.start + offset;
        if let Some(offset) = Self::locate(&self.table, at) {
            let mut vectors = self.vectors.lock().expect("MSI-X lock");
            if let Err(e) = vectors.write_table(offset, data) {
                tracing::warn!(
                    function = self.function.name(),
                    error = %e,
                    "MSI-X table write failed"
                );
            }
        } else if Self::locate(&self.pba, at).is_some() {
            // The PBA is read-only.
        } else {
            self.function.write_region(self.region, at, data);
        }
    }
}

/// The pages that `range` touches.
fn whole_pages(range: &Range<u64>) -> Range<u64> {
    range.start & !(PAGE_SIZE - 1)..range.end.next_multiple_of(PAGE_SIZE)
}

/// The whole pages inside `range`, if any.
fn pages_within(range: &Range<u64>) -> Option<Range<u64>> {
    let pages = range.start.next_multiple_of(PAGE_SIZE)..range.end & !(PAGE_SIZE - 1);
    (pages.start < pages.end).then_some(pages)
}

/// `range` less `holes`.
fn subtract(range: Range<u64>, holes: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut left = vec![range];
    for hole in holes {
        left = left
            .into_iter()
            .flat_map(|range| {
                [
                    range.start..range.end.min(hole.start),
                    range.start.max(hole.end)..range.end,
                ]
            })
            .filter(|range| range.start < range.end)
            .collect();
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msix_pages_are_cut_out_of_the_mappable_parts() {
        let table = whole_pages(&(0x8000..0x8040));
        let pba = whole_pages(&(0x9000..0x9008));
        assert_eq!(table, 0x8000..0x9000);
        assert_eq!(
            subtract(0..0x10000, &[table, pba]),
            vec![0..0x8000, 0xa000..0x10000]
        );
    }

    #[test]
    fn only_whole_pages_are_mapped() {
        assert_eq!(pages_within(&(0x10..0x3000)), Some(0x1000..0x3000));
        assert_eq!(pages_within(&(0x10..0xff0)), None);
    }

    #[test]
    fn what_is_not_mapped_is_trapped() {
        let direct = vec![0..0x8000, 0xa000..0x10000];
        assert_eq!(subtract(0..0x10000, &direct), vec![0x8000..0xa000]);
        assert_eq!(subtract(0..0x4000, &[]), vec![0..0x4000]);
    }
}
