//! Guest-physical addresses for BARs, handed out as firmware would.

use std::ops::Range;

use crate::{memory::MMIO_GAP_END, pci::BarKind, VmmError};

/// 32-bit BARs: above the virtio-mmio slots at the start of the MMIO gap
/// (0xd000_0000, 4 KiB each) and below the IOAPIC.
const WINDOW_32: Range<u64> = 0xe000_0000..0xfec0_0000;
/// 64-bit BARs: a window this large, aligned to its size, above RAM.
const WINDOW_64_SIZE: u64 = 64 << 30;
/// Where the 64-bit window must end: CPUs (and KVM's guests) may have no
/// more physical address bits than this.
const PHYSICAL_ADDRESS_LIMIT: u64 = 1 << 40;
/// The smallest BAR the guest sees: a page, so that a device's mmap-ed BAR
/// can be mapped into the guest in a KVM memory slot.
const MIN_BAR_SIZE: u64 = 0x1000;

/// Hands out naturally aligned BAR addresses: 32-bit BARs in the MMIO gap
/// above the virtio-mmio slots and below the IOAPIC, 64-bit BARs in a
/// window above guest RAM. Nothing is freed: BARs live as long as the VM.
pub struct BarAllocator {
    window_32: Window,
    window_64: Window,
}

/// A bump allocator over one window.
struct Window {
    range: Range<u64>,
    next: u64,
}

impl BarAllocator {
    /// An allocator for a VM whose RAM ends (highest address + 1) at
    /// `ram_end`.
    pub fn new(ram_end: u64) -> BarAllocator {
        let start_64 = ram_end
            .max(MMIO_GAP_END)
            .checked_next_multiple_of(WINDOW_64_SIZE)
            .unwrap_or(PHYSICAL_ADDRESS_LIMIT)
            .min(PHYSICAL_ADDRESS_LIMIT);
        let end_64 = (start_64 + WINDOW_64_SIZE).min(PHYSICAL_ADDRESS_LIMIT);
        BarAllocator {
            window_32: Window::new(WINDOW_32),
            window_64: Window::new(start_64..end_64),
        }
    }

    /// How large a BAR of `size` bytes is in the guest: at least a page.
    pub fn guest_size(size: u64) -> u64 {
        size.max(MIN_BAR_SIZE)
    }

    /// A free, naturally aligned range of [`BarAllocator::guest_size`]
    /// bytes for a BAR of `size` bytes (a power of two) and of `kind`. I/O
    /// BARs are refused: passed-through functions get memory BARs only.
    pub fn allocate(&mut self, size: u64, kind: BarKind) -> Result<u64, VmmError> {
        if !size.is_power_of_two() {
            return Err(VmmError::Device(format!(
                "BAR size {size:#x} is not a power of two"
            )));
        }
        let window = match kind {
            BarKind::Memory32 => &mut self.window_32,
            BarKind::Memory64 => &mut self.window_64,
            BarKind::Io => {
                return Err(VmmError::Device(format!(
                    "I/O BAR of {size:#x} bytes: runv passes through memory BARs only"
                )))
            }
        };
        window.allocate(Self::guest_size(size)).ok_or_else(|| {
            VmmError::Device(format!(
                "no room for a {kind:?} BAR of {size:#x} bytes in {:#x}..{:#x}",
                window.range.start, window.range.end
            ))
        })
    }
}

impl Window {
    fn new(range: Range<u64>) -> Window {
        Window {
            next: range.start,
            range,
        }
    }

    fn allocate(&mut self, size: u64) -> Option<u64> {
        let start = self.next.checked_next_multiple_of(size)?;
        let end = start
            .checked_add(size)
            .filter(|&end| end <= self.range.end)?;
        self.next = end;
        Some(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_naturally_aligned_in_their_window() {
        let mut allocator = BarAllocator::new(512 << 20);
        assert_eq!(
            allocator.allocate(0x1000, BarKind::Memory32).unwrap(),
            0xe000_0000
        );
        // Aligned past the first one, which leaves a hole.
        assert_eq!(
            allocator.allocate(0x10_0000, BarKind::Memory32).unwrap(),
            0xe010_0000
        );
        assert_eq!(
            allocator.allocate(0x4000, BarKind::Memory32).unwrap(),
            0xe020_0000
        );
        assert_eq!(
            allocator.allocate(0x4000, BarKind::Memory64).unwrap(),
            64 << 30
        );
        assert_eq!(
            allocator.allocate(1 << 30, BarKind::Memory64).unwrap(),
            65 << 30
        );
    }

    #[test]
    fn small_bars_take_a_page() {
        let mut allocator = BarAllocator::new(512 << 20);
        assert_eq!(BarAllocator::guest_size(0x10), 0x1000);
        assert_eq!(BarAllocator::guest_size(0x2000), 0x2000);
        assert_eq!(
            allocator.allocate(0x10, BarKind::Memory32).unwrap(),
            0xe000_0000
        );
        assert_eq!(
            allocator.allocate(0x10, BarKind::Memory32).unwrap(),
            0xe000_1000
        );
    }

    #[test]
    fn the_64_bit_window_starts_above_ram() {
        let mut allocator = BarAllocator::new(MMIO_GAP_END + (70 << 30));
        assert_eq!(
            allocator.allocate(0x1000, BarKind::Memory64).unwrap(),
            128 << 30
        );
        // Its end stays below 2^40: RAM up to there leaves no room.
        let mut allocator = BarAllocator::new(PHYSICAL_ADDRESS_LIMIT - 0x1000);
        assert!(allocator.allocate(0x1000, BarKind::Memory64).is_err());
    }

    #[test]
    fn a_full_window_is_an_error_naming_it() {
        let mut allocator = BarAllocator::new(512 << 20);
        let err = allocator
            .allocate(1 << 30, BarKind::Memory32)
            .unwrap_err()
            .to_string();
        assert!(err.contains("0xe0000000..0xfec00000"), "{err}");
        allocator.allocate(256 << 20, BarKind::Memory32).unwrap();
        allocator.allocate(128 << 20, BarKind::Memory32).unwrap();
        assert!(allocator.allocate(256 << 20, BarKind::Memory32).is_err());
        // Smaller BARs still fit after a refusal.
        allocator.allocate(64 << 20, BarKind::Memory32).unwrap();
        allocator.allocate(64 << 30, BarKind::Memory64).unwrap();
        assert!(allocator.allocate(0x1000, BarKind::Memory64).is_err());
    }

    #[test]
    fn odd_sizes_and_io_bars_are_refused() {
        let mut allocator = BarAllocator::new(512 << 20);
        for size in [0, 0x3000] {
            let err = allocator.allocate(size, BarKind::Memory32).unwrap_err();
            assert!(err.to_string().contains("power of two"), "{err}");
        }
        let err = allocator.allocate(0x100, BarKind::Io).unwrap_err();
        assert!(err.to_string().contains("I/O BAR"), "{err}");
    }
}
