//! Bus 0: a host bridge at 00.0 and the passed-through functions after it.

use std::sync::{Arc, Mutex};

use crate::{pci::PciDevice, VmmError};

/// The root bus. Functions are single-function devices 1..32 of bus 0.
pub struct PciRoot {}

impl PciRoot {
    /// A bus holding only the host bridge (which Linux's probe of
    /// mechanism #1 looks for).
    pub fn new() -> PciRoot {
        todo!()
    }

    /// Puts `device` in the next free device number, which it returns.
    pub fn add_device(&mut self, device: Arc<Mutex<dyn PciDevice>>) -> Result<u8, VmmError> {
        todo!("{}", Arc::strong_count(&device))
    }

    /// Configuration read of register `register` of `bus:device.function`;
    /// all ones where nothing answers.
    pub fn read_config(&self, bus: u8, device: u8, function: u8, register: usize) -> u32 {
        todo!("{bus} {device} {function} {register}")
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
        todo!("{bus} {device} {function} {register} {offset} {data:?}")
    }
}
