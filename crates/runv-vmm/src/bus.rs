//! Address buses: port I/O and MMIO exits are routed to the device that
//! owns the address, with the offset into its range.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use crate::VmmError;

/// A device on a bus. Accesses come with the offset into the device's range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct Range {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// One address space (port I/O or MMIO).
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl Bus {
    /// Places `device` at `[base, base + len)`; ranges may not overlap.
    pub fn insert(
        &mut self,
        name: &'static str,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), VmmError> {
        let overlap = VmmError::BusOverlap { name, base, len };
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(overlap)?;
        let before_overlaps = self
            .ranges
            .range(..end)
            .next_back()
            .is_some_and(|(start, range)| start + range.len > base);
        if before_overlaps {
            return Err(VmmError::BusOverlap { name, base, len });
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    /// The device owning `addr`, and the offset of `addr` in it.
    /// The device whose range holds all `len` bytes at `addr`, and the
    /// offset into it. An access that runs past the end of a range
    /// (a guest's unaligned access at its last bytes) reaches no device:
    /// devices may rely on every access lying within their range.
    fn find(&self, addr: u64, len: usize) -> Option<(&Range, u64)> {
        let (start, range) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - start;
        let end = offset.checked_add(len as u64)?;
        (end <= range.len).then_some((range, offset))
    }

    /// Routes a read; returns false when no device owns the bytes at
    /// `addr` (the data is then left as all ones, like an unclaimed bus).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((range, offset)) => {
                range.device.lock().expect("device lock").read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Routes a write; returns false when no device owns the bytes at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((range, offset)) => {
                range
                    .device
                    .lock()
                    .expect("device lock")
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last write and answers reads with its offset.
    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_owner_with_offsets() {
        let mut bus = Bus::default();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert("rec", 0x100, 0x10, dev.clone()).unwrap();
        assert!(bus.write(0x104, &[1, 2]));
        assert_eq!(dev.lock().unwrap().last_write, Some((4, vec![1, 2])));
        let mut data = [0u8; 2];
        assert!(bus.read(0x10e, &mut data));
        assert_eq!(data, [0xe, 0xe]);
    }

    /// Found by the vfio_pci fuzz target: 16 bytes at the last byte of a
    /// passed-through BAR reached the function past the BAR's end.
    #[test]
    fn an_access_past_the_end_of_a_range_reaches_no_device() {
        let mut bus = Bus::default();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert("rec", 0x100, 0x10, dev.clone()).unwrap();
        let mut data = [0u8; 16];
        assert!(!bus.read(0x10f, &mut data));
        assert_eq!(data, [0xff; 16]);
        assert!(!bus.write(0x10f, &[1, 2]));
        assert!(!bus.write(0x10c, &[0; 8]));
        assert_eq!(dev.lock().unwrap().last_write, None);
        // The last byte alone is the device's.
        assert!(bus.write(0x10f, &[3]));
        assert_eq!(dev.lock().unwrap().last_write, Some((0xf, vec![3])));
    }

    #[test]
    fn unclaimed_addresses_read_all_ones() {
        let mut bus = Bus::default();
        bus.insert(
            "rec",
            0x100,
            0x10,
            Arc::new(Mutex::new(Recorder::default())),
        )
        .unwrap();
        let mut data = [0u8; 4];
        assert!(!bus.read(0x110, &mut data));
        assert_eq!(data, [0xff; 4]);
        assert!(!bus.write(0xff, &[0]));
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let mut bus = Bus::default();
        let dev = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert("a", 0x100, 0x10, dev()).unwrap();
        assert!(bus.insert("b", 0x10f, 0x10, dev()).is_err());
        assert!(bus.insert("c", 0xf8, 0x10, dev()).is_err());
        assert!(bus.insert("d", 0x200, 0, dev()).is_err());
        assert!(bus.insert("e", u64::MAX, 2, dev()).is_err());
        bus.insert("f", 0x110, 0x10, dev()).unwrap();
    }
}
