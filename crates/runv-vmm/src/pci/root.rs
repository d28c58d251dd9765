//! Bus 0: a host bridge at 00.0 and the passed-through functions after it.

use std::sync::{Arc, Mutex};

use crate::{pci::PciDevice, VmmError};

/// Device numbers on a bus.
const DEVICES: usize = 32;
/// Intel, which Linux's sanity check of mechanism #1 also accepts.
const HOST_BRIDGE_VENDOR: u16 = 0x8086;
/// A device ID no Linux quirk matches.
const HOST_BRIDGE_DEVICE: u16 = 0x0d57;
/// Class 0x06 (bridge), subclass 0x00 (host bridge): what Linux's
/// pci_sanity_check looks for on bus 0 (register 2 is class, subclass,
/// programming interface, revision).
const HOST_BRIDGE_CLASS: u32 = 0x0600_0000;

/// The root bus. Functions are single-function devices 1..32 of bus 0.
pub struct PciRoot {
    /// By device number; 0 is the host bridge, answered here.
    devices: [Option<Arc<Mutex<dyn PciDevice>>>; DEVICES],
}

impl PciRoot {
    /// A bus holding only the host bridge (which Linux's probe of
    /// mechanism #1 looks for).
    pub fn new() -> PciRoot {
        PciRoot {
            devices: Default::default(),
        }
    }

    /// Puts `device` in the next free device number, which it returns.
    pub fn add_device(&mut self, device: Arc<Mutex<dyn PciDevice>>) -> Result<u8, VmmError> {
        let (number, free) = self
            .devices
            .iter_mut()
            .enumerate()
            .skip(1)
            .find(|(_, slot)| slot.is_none())
            .ok_or_else(|| {
                VmmError::Device(format!(
                    "the PCI root bus is full: all {} device numbers are taken",
                    DEVICES - 1
                ))
            })?;
        *free = Some(device);
        Ok(number as u8)
    }

    /// Configuration read of register `register` of `bus:device.function`;
    /// all ones where nothing answers.
    pub fn read_config(&self, bus: u8, device: u8, function: u8, register: usize) -> u32 {
        if bus != 0 || function != 0 {
            return u32::MAX;
        }
        if device == 0 {
            return host_bridge_register(register);
        }
        match self.devices.get(usize::from(device)) {
            Some(Some(device)) => device
                .lock()
                .expect("PCI device lock")
                .read_config(register),
            _ => u32::MAX,
        }
    }

    pub fn write_config(
        &self,
        bus: u8,
        device: u8,
        function: u8,
        register: usize,
        offset: u64,
        data: &[u8],
    ) {
        // The host bridge has nothing to program.
        if bus != 0 || function != 0 || device == 0 {
            return;
        }
        if let Some(Some(device)) = self.devices.get(usize::from(device)) {
            device
                .lock()
                .expect("PCI device lock")
                .write_config(register, offset, data);
        }
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

/// The host bridge's type-0 header: IDs and class, everything else zero.
fn host_bridge_register(register: usize) -> u32 {
    match register {
        0 => u32::from(HOST_BRIDGE_DEVICE) << 16 | u32::from(HOST_BRIDGE_VENDOR),
        2 => HOST_BRIDGE_CLASS,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers reads with its register number and records writes.
    #[derive(Default)]
    struct Function {
        writes: Vec<(usize, u64, Vec<u8>)>,
    }

    impl PciDevice for Function {
        fn read_config(&mut self, register: usize) -> u32 {
            0x1000 + register as u32
        }
        fn write_config(&mut self, register: usize, offset: u64, data: &[u8]) {
            self.writes.push((register, offset, data.to_vec()));
        }
    }

    #[test]
    fn the_host_bridge_is_an_intel_host_bridge() {
        let root = PciRoot::new();
        assert_eq!(root.read_config(0, 0, 0, 0), 0x0d57_8086);
        assert_eq!(root.read_config(0, 0, 0, 2) >> 16, 0x0600);
        // Header type 0, single function.
        assert_eq!(root.read_config(0, 0, 0, 3), 0);
        root.write_config(0, 0, 0, 1, 0, &[0xff, 0xff]);
        assert_eq!(root.read_config(0, 0, 0, 1), 0);
    }

    #[test]
    fn absent_devices_functions_and_buses_read_all_ones() {
        let root = PciRoot::default();
        assert_eq!(root.read_config(0, 1, 0, 0), u32::MAX);
        assert_eq!(root.read_config(0, 31, 0, 0), u32::MAX);
        assert_eq!(root.read_config(0, 0, 1, 0), u32::MAX);
        assert_eq!(root.read_config(1, 0, 0, 0), u32::MAX);
        assert_eq!(root.read_config(0, 32, 0, 0), u32::MAX);
    }

    #[test]
    fn devices_take_numbers_from_1_and_get_their_accesses() {
        let mut root = PciRoot::new();
        let function = Arc::new(Mutex::new(Function::default()));
        assert_eq!(root.add_device(function.clone()).unwrap(), 1);
        assert_eq!(root.read_config(0, 1, 0, 4), 0x1004);
        assert_eq!(root.read_config(0, 1, 1, 4), u32::MAX);
        root.write_config(0, 1, 0, 4, 2, &[1, 2]);
        root.write_config(0, 1, 1, 4, 0, &[3]);
        assert_eq!(function.lock().unwrap().writes, vec![(4, 2, vec![1, 2])]);
        for number in 2..32 {
            let device = Arc::new(Mutex::new(Function::default()));
            assert_eq!(root.add_device(device).unwrap(), number);
        }
        let full = root.add_device(function).unwrap_err().to_string();
        assert!(full.contains("full"), "{full}");
    }
}
