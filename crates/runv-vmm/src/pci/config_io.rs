//! The legacy configuration mechanism #1: an address latch at 0xcf8 and a
//! data window at 0xcfc..0xd00.

use std::sync::{Arc, Mutex};

use crate::{bus::BusDevice, pci::PciRoot};

pub const CONFIG_IO_PORT: u64 = 0xcf8;
pub const CONFIG_IO_PORT_LEN: u64 = 8;

/// The port pair, on the VM's port I/O bus at [`CONFIG_IO_PORT`].
pub struct PciConfigIo {}

impl PciConfigIo {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> PciConfigIo {
        todo!("{}", Arc::strong_count(&root))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        todo!("{offset} {data:?}")
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        todo!("{offset} {data:?}")
    }
}
