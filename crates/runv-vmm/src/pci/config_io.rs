//! The legacy configuration mechanism #1: an address latch at 0xcf8 and a
//! data window at 0xcfc..0xd00.

use std::sync::{Arc, Mutex};

use crate::{bus::BusDevice, pci::PciRoot};

pub const CONFIG_IO_PORT: u64 = 0xcf8;
pub const CONFIG_IO_PORT_LEN: u64 = 8;

/// Offset of the data window (0xcfc) from [`CONFIG_IO_PORT`].
const DATA_OFFSET: u64 = 4;
/// Bit 31 of the latch: data accesses reach configuration space.
const ENABLE: u32 = 1 << 31;
/// Bits 1:0 of the latch are not part of the address and read zero.
const LATCH_MASK: u32 = !0x3;
/// Bits 30:24: reserved, or (AMD) bits 11:8 of an extended register,
/// which this bus does not have.
const RESERVED: u32 = 0x7f00_0000;

/// The port pair, on the VM's port I/O bus at [`CONFIG_IO_PORT`].
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    /// The address the guest last wrote to 0xcf8.
    latch: u32,
}

/// Where the latch points.
#[derive(Debug, PartialEq, Eq)]
struct ConfigAddress {
    bus: u8,
    device: u8,
    function: u8,
    register: usize,
}

impl PciConfigIo {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> PciConfigIo {
        PciConfigIo { root, latch: 0 }
    }

    /// The latched address, or None while the enable bit is clear or the
    /// address is past configuration space's 256 bytes.
    fn address(&self) -> Option<ConfigAddress> {
        (self.latch & (ENABLE | RESERVED) == ENABLE).then_some(ConfigAddress {
            bus: (self.latch >> 16) as u8,
            device: ((self.latch >> 11) & 0x1f) as u8,
            function: ((self.latch >> 8) & 0x7) as u8,
            register: ((self.latch >> 2) & 0x3f) as usize,
        })
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Only a dword access at 0xcf8 is the latch; a narrower one is
        // ordinary I/O to a port nobody claims.
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.latch.to_le_bytes());
            return;
        }
        data.fill(0xff);
        let Some(byte) = offset.checked_sub(DATA_OFFSET) else {
            return;
        };
        let Some(address) = self.address() else {
            return;
        };
        let value = self.root.lock().expect("PCI root lock").read_config(
            address.bus,
            address.device,
            address.function,
            address.register,
        );
        if let Some(bytes) = value
            .to_le_bytes()
            .get(byte as usize..byte as usize + data.len())
        {
            data.copy_from_slice(bytes);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            if let Ok(latch) = data.try_into() {
                self.latch = u32::from_le_bytes(latch) & LATCH_MASK;
            }
            return;
        }
        let Some(byte) = offset.checked_sub(DATA_OFFSET) else {
            return;
        };
        let Some(address) = self.address() else {
            return;
        };
        // Within the register, and at least a byte: devices may take
        // `data[0]`.
        if data.is_empty() || byte + data.len() as u64 > 4 {
            return;
        }
        self.root.lock().expect("PCI root lock").write_config(
            address.bus,
            address.device,
            address.function,
            address.register,
            byte,
            data,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::PciDevice;

    /// Register `n` reads `0xnn_nn_nn_nn`; writes are recorded.
    #[derive(Default)]
    struct Function {
        writes: Vec<(usize, u64, Vec<u8>)>,
    }

    impl PciDevice for Function {
        fn read_config(&mut self, register: usize) -> u32 {
            0x0403_0201 + 0x1010_1010 * register as u32
        }
        fn write_config(&mut self, register: usize, offset: u64, data: &[u8]) {
            self.writes.push((register, offset, data.to_vec()));
        }
    }

    fn config_io() -> (PciConfigIo, Arc<Mutex<Function>>) {
        let mut root = PciRoot::new();
        let function = Arc::new(Mutex::new(Function::default()));
        assert_eq!(root.add_device(function.clone()).unwrap(), 1);
        (PciConfigIo::new(Arc::new(Mutex::new(root))), function)
    }

    fn latch(io: &mut PciConfigIo, value: u32) {
        io.write(0, &value.to_le_bytes());
    }

    fn read(io: &mut PciConfigIo, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0; len];
        io.read(offset, &mut data);
        data
    }

    #[test]
    fn the_latch_reads_back_as_written() {
        let (mut io, _) = config_io();
        // Linux's probe of mechanism #1.
        latch(&mut io, 0x8000_0000);
        assert_eq!(read(&mut io, 0, 4), 0x8000_0000u32.to_le_bytes());
        latch(&mut io, 0x8001_0a07);
        assert_eq!(read(&mut io, 0, 4), 0x8001_0a04u32.to_le_bytes());
        // Narrower accesses are not the latch.
        io.write(3, &[0x01]);
        assert_eq!(read(&mut io, 0, 4), 0x8001_0a04u32.to_le_bytes());
        assert_eq!(read(&mut io, 0, 1), [0xff]);
    }

    #[test]
    fn the_latch_selects_bus_device_function_and_register() {
        let (mut io, _) = config_io();
        let address = |bus: u32, device: u32, function: u32, register: u32| {
            ENABLE | bus << 16 | device << 11 | function << 8 | register << 2
        };
        latch(&mut io, address(0, 0, 0, 0));
        assert_eq!(read(&mut io, 4, 4), 0x0d57_8086u32.to_le_bytes());
        latch(&mut io, address(0, 1, 0, 2));
        assert_eq!(read(&mut io, 4, 4), 0x2423_2221u32.to_le_bytes());
        latch(&mut io, address(0, 1, 1, 2));
        assert_eq!(read(&mut io, 4, 4), [0xff; 4]);
        latch(&mut io, address(1, 1, 0, 2));
        assert_eq!(read(&mut io, 4, 4), [0xff; 4]);
        latch(&mut io, address(0, 2, 0, 0));
        assert_eq!(read(&mut io, 4, 4), [0xff; 4]);
    }

    #[test]
    fn byte_and_word_accesses_take_their_part_of_the_register() {
        let (mut io, function) = config_io();
        latch(&mut io, ENABLE | 1 << 11 | 3 << 2);
        assert_eq!(read(&mut io, 5, 1), [0x32]);
        assert_eq!(read(&mut io, 6, 2), [0x33, 0x34]);
        assert_eq!(read(&mut io, 7, 1), [0x34]);
        // A word at 0xcff would run past the register.
        assert_eq!(read(&mut io, 7, 2), [0xff; 2]);
        io.write(6, &[0xaa, 0xbb]);
        io.write(7, &[0xcc]);
        io.write(7, &[0xdd, 0xee]);
        assert_eq!(
            function.lock().unwrap().writes,
            vec![(3, 2, vec![0xaa, 0xbb]), (3, 3, vec![0xcc])]
        );
        // Linux's sanity check: a word at the host bridge's class.
        latch(&mut io, ENABLE | 2 << 2);
        assert_eq!(read(&mut io, 6, 2), 0x0600u16.to_le_bytes());
    }

    /// Found by the vfio_pci fuzz target: an empty write to the interrupt
    /// line register made the VFIO device index an empty slice.
    #[test]
    fn an_empty_write_reaches_no_device() {
        let (mut io, function) = config_io();
        latch(&mut io, ENABLE | 1 << 11 | 15 << 2);
        io.write(4, &[]);
        assert!(function.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn without_the_enable_bit_data_reads_all_ones_and_writes_nothing() {
        let (mut io, function) = config_io();
        latch(&mut io, 1 << 11);
        assert_eq!(read(&mut io, 4, 4), [0xff; 4]);
        io.write(4, &[0; 4]);
        assert!(function.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn extended_registers_read_all_ones_and_take_no_writes() {
        let (mut io, function) = config_io();
        // AMD's extended register 0x100 of 00:01.0: not register 0.
        latch(&mut io, ENABLE | 1 << 24 | 1 << 11);
        assert_eq!(read(&mut io, 4, 4), [0xff; 4]);
        io.write(4, &[0; 4]);
        assert!(function.lock().unwrap().writes.is_empty());
    }
}
