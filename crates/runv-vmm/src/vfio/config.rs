//! What the VMM learns from a function's configuration space when it is
//! attached: its memory BARs, its MSI-X capability, and where the
//! capability chain must skip MSI (only MSI-X is wired to the guest).

use std::ops::Range;

use crate::{
    pci::{BarKind, BAR_COUNT, MSIX_TABLE_ENTRY_SIZE},
    vfio::function::{PassthroughFunction, CONFIG_REGION},
    VmmError,
};

/// Byte offsets in a type-0 header.
const STATUS: u64 = 0x06;
const FIRST_BAR: u64 = 0x10;
const CAPABILITIES_POINTER: usize = 0x34;

const STATUS_CAPABILITIES: u16 = 1 << 4;
const CAP_MSI: u8 = 0x05;
const CAP_MSIX: u8 = 0x11;
/// More capabilities than fit in 256 bytes means a looping chain.
const MAX_CAPABILITIES: usize = 48;

/// A memory BAR of the function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarInfo {
    /// The BAR register (0..6), also the VFIO region index.
    pub index: usize,
    pub size: u64,
    pub kind: BarKind,
    pub prefetchable: bool,
}

/// A range of a BAR, in bytes from the BAR's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BarPart {
    pub bar: usize,
    pub range: Range<u64>,
}

/// The MSI-X capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsixCapability {
    /// Byte offset of the capability in configuration space.
    pub offset: usize,
    pub vectors: u16,
    pub table: BarPart,
    pub pba: BarPart,
}

/// A capability pointer that the guest reads changed, to take a
/// capability out of the chain: the byte at `at` reads `value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointerPatch {
    pub at: usize,
    pub value: u8,
}

/// The function as the VMM sees it at attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub bars: Vec<BarInfo>,
    pub msix: MsixCapability,
    /// The MSI capability, when there is one: its offset, and the patch
    /// that hides it.
    pub msi: Option<(usize, PointerPatch)>,
}

impl Layout {
    /// Reads the function's BARs and capabilities. A function without
    /// MSI-X is refused: it could only interrupt through INTx or MSI,
    /// which runv does not wire.
    pub fn probe(function: &dyn PassthroughFunction) -> Result<Layout, VmmError> {
        let name = function.name();
        let bars = probe_bars(function);
        let mut msix = None;
        let mut msi = None;
        let has_capabilities = read_u16(function, STATUS) & STATUS_CAPABILITIES != 0;
        let mut pointer_at = CAPABILITIES_POINTER;
        let mut next = if has_capabilities {
            read_u8(function, CAPABILITIES_POINTER)
        } else {
            0
        };
        for _ in 0..MAX_CAPABILITIES {
            // The low two bits of a pointer are reserved.
            let offset = usize::from(next & !3);
            if offset == 0 {
                break;
            }
            let id = read_u8(function, offset);
            next = read_u8(function, offset + 1);
            match id {
                CAP_MSI => {
                    msi = Some((
                        offset,
                        PointerPatch {
                            at: pointer_at,
                            value: next,
                        },
                    ));
                    // The capability is skipped: the one after it is
                    // linked from the same pointer.
                    continue;
                }
                CAP_MSIX => msix = Some(msix_capability(function, offset)),
                _ => {}
            }
            pointer_at = offset + 1;
        }
        let msix = msix.ok_or_else(|| {
            VmmError::Device(format!(
                "VFIO function {name} has no MSI-X capability: runv passes through only \
                 functions with MSI-X (an SR-IOV VF has it; INTx and MSI are not wired)"
            ))
        })?;
        for part in [&msix.table, &msix.pba] {
            if !bars.iter().any(|bar| bar.index == part.bar) {
                return Err(VmmError::Device(format!(
                    "VFIO function {name}: its MSI-X table or PBA is in BAR {}, which is not \
                     a memory BAR of the function",
                    part.bar
                )));
            }
        }
        Ok(Layout { bars, msix, msi })
    }
}

/// The memory BARs with a size; I/O BARs are left out (an SR-IOV VF has
/// none, and the guest's driver of a NIC does not need them).
fn probe_bars(function: &dyn PassthroughFunction) -> Vec<BarInfo> {
    let mut bars = Vec::new();
    let mut index = 0;
    while index < BAR_COUNT {
        let register = read_u32(function, FIRST_BAR + 4 * index as u64);
        let kind = match (register & 1, (register >> 1) & 3) {
            (1, _) => BarKind::Io,
            (_, 2) => BarKind::Memory64,
            _ => BarKind::Memory32,
        };
        let size = function.region(index as u32).size;
        if size > 0 && kind != BarKind::Io {
            bars.push(BarInfo {
                index,
                size,
                kind,
                prefetchable: register & (1 << 3) != 0,
            });
        } else if size > 0 {
            tracing::warn!(function = function.name(), index, "I/O BAR left out");
        }
        index += if kind == BarKind::Memory64 { 2 } else { 1 };
    }
    bars
}

fn msix_capability(function: &dyn PassthroughFunction, offset: usize) -> MsixCapability {
    let control = read_u16(function, offset as u64 + 2);
    let vectors = (control & 0x7ff) + 1;
    // Each location is a BAR index (low three bits) and an offset in it.
    let part = |location: u32, len: u64| {
        let start = u64::from(location & !7);
        BarPart {
            bar: (location & 7) as usize,
            range: start..start + len,
        }
    };
    let table_len = u64::from(vectors) * MSIX_TABLE_ENTRY_SIZE;
    // One pending bit per vector, in whole quadwords.
    let pba_len = u64::from(vectors).div_ceil(64) * 8;
    MsixCapability {
        offset,
        vectors,
        table: part(read_u32(function, offset as u64 + 4), table_len),
        pba: part(read_u32(function, offset as u64 + 8), pba_len),
    }
}

fn read_u8(function: &dyn PassthroughFunction, offset: usize) -> u8 {
    let mut data = [0u8; 1];
    function.read_region(CONFIG_REGION, offset as u64, &mut data);
    data[0]
}

fn read_u16(function: &dyn PassthroughFunction, offset: u64) -> u16 {
    let mut data = [0u8; 2];
    function.read_region(CONFIG_REGION, offset, &mut data);
    u16::from_le_bytes(data)
}

pub(super) fn read_u32(function: &dyn PassthroughFunction, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    function.read_region(CONFIG_REGION, offset, &mut data);
    u32::from_le_bytes(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfio::fake::{FakeFunction, MSIX_VECTORS};

    #[test]
    fn a_vf_has_one_64_bit_bar_with_msix_in_it() {
        let layout = Layout::probe(&FakeFunction::vf()).unwrap();
        assert_eq!(
            layout.bars,
            vec![BarInfo {
                index: 0,
                size: FakeFunction::BAR0_SIZE,
                kind: BarKind::Memory64,
                prefetchable: true,
            }]
        );
        assert_eq!(layout.msix.vectors, MSIX_VECTORS);
        assert_eq!(layout.msix.table.bar, 0);
        assert_eq!(
            layout.msix.table.range,
            FakeFunction::TABLE..FakeFunction::TABLE + 16 * u64::from(MSIX_VECTORS)
        );
        assert_eq!(
            layout.msix.pba.range,
            FakeFunction::PBA..FakeFunction::PBA + 8
        );
    }

    #[test]
    fn msi_is_skipped_by_the_pointer_before_it() {
        let layout = Layout::probe(&FakeFunction::vf()).unwrap();
        let (offset, patch) = layout.msi.unwrap();
        assert_eq!(offset, FakeFunction::MSI_CAP);
        // The PCIe capability comes first and linked to MSI; it now links
        // to MSI-X.
        assert_eq!(
            patch,
            PointerPatch {
                at: FakeFunction::PCIE_CAP + 1,
                value: FakeFunction::MSIX_CAP as u8,
            }
        );
    }

    #[test]
    fn a_function_without_msix_is_refused_by_name() {
        let error = Layout::probe(&FakeFunction::without_msix())
            .unwrap_err()
            .to_string();
        assert!(error.contains(FakeFunction::NAME), "{error}");
        assert!(error.contains("no MSI-X"), "{error}");
    }
}
