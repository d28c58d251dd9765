//! BAR registers as the guest reads and writes them, sizing included.
//!
//! The VMM has placed every BAR (`set`), as firmware would, and the guest
//! only sizes them: it writes all ones, reads the size mask back, and
//! writes the address it read before. Any other address write is ignored:
//! the BAR stays where its memory is mapped.

/// Configuration register of BAR 0 (byte offset 0x10).
pub const FIRST_BAR_REGISTER: usize = 4;
/// BARs of a type-0 header.
pub const BAR_COUNT: usize = 6;

/// Bit 0 of a BAR register: an I/O BAR.
const IO_SPACE: u32 = 0x1;
/// Bits 2:1 of a memory BAR register: a 64-bit BAR.
const MEMORY_64: u32 = 0x4;
/// Bit 3 of a memory BAR register.
const PREFETCHABLE: u32 = 0x8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Memory32,
    /// Takes two registers: this BAR's and the next one's (the high half).
    Memory64,
}

/// One BAR, placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    pub address: u64,
    /// A power of two.
    pub size: u64,
    pub kind: BarKind,
    pub prefetchable: bool,
}

impl Bar {
    /// The read-only low bits of its register: the type.
    fn type_bits(&self) -> u32 {
        match self.kind {
            BarKind::Io => IO_SPACE,
            BarKind::Memory32 if self.prefetchable => PREFETCHABLE,
            BarKind::Memory32 => 0,
            BarKind::Memory64 if self.prefetchable => MEMORY_64 | PREFETCHABLE,
            BarKind::Memory64 => MEMORY_64,
        }
    }

    /// How many low bits of its register hold the type, not the address.
    fn type_mask(&self) -> u32 {
        match self.kind {
            BarKind::Io => 0x3,
            BarKind::Memory32 | BarKind::Memory64 => 0xf,
        }
    }
}

/// What one register holds.
#[derive(Debug, Clone, Copy, Default)]
enum Register {
    /// Not implemented: reads zero, which tells the guest so.
    #[default]
    Unused,
    /// The (low half of the) BAR.
    Low(Bar),
    /// The high half of the 64-bit BAR in the register before.
    High(Bar),
}

/// The six BAR registers of one function.
#[derive(Debug, Default)]
pub struct BarRegisters {
    registers: [Register; BAR_COUNT],
    /// Per register: the guest wrote all ones and reads the size mask
    /// until its next write.
    sizing: [bool; BAR_COUNT],
}

impl BarRegisters {
    /// Puts `bar` in BAR `index` (and `index + 1` for a 64-bit BAR).
    ///
    /// # Panics
    /// When `index` (or `index + 1` for a 64-bit BAR) is not below
    /// [`BAR_COUNT`].
    pub fn set(&mut self, index: usize, bar: Bar) {
        self.registers[index] = Register::Low(bar);
        self.sizing[index] = false;
        if bar.kind == BarKind::Memory64 {
            self.registers[index + 1] = Register::High(bar);
            self.sizing[index + 1] = false;
        }
    }

    /// The BAR in register `index`, if one starts there.
    pub fn get(&self, index: usize) -> Option<Bar> {
        match self.registers.get(index)? {
            Register::Low(bar) => Some(*bar),
            Register::Unused | Register::High(_) => None,
        }
    }

    /// What the guest reads from BAR register `index` (0..6): the address
    /// with the type bits, or the size mask after the guest wrote all ones.
    pub fn read(&self, index: usize) -> u32 {
        let Some(register) = self.registers.get(index) else {
            return 0;
        };
        let sizing = self.sizing[index];
        match *register {
            Register::Unused => 0,
            Register::Low(bar) => {
                let value = if sizing { !(bar.size - 1) } else { bar.address };
                (value as u32 & !bar.type_mask()) | bar.type_bits()
            }
            Register::High(bar) => {
                let value = if sizing { !(bar.size - 1) } else { bar.address };
                (value >> 32) as u32
            }
        }
    }

    /// A guest write of `data` at byte `offset` of BAR register `index`.
    pub fn write(&mut self, index: usize, offset: u64, data: &[u8]) {
        let Some(register) = self.registers.get(index) else {
            return;
        };
        let read_only = match register {
            Register::Unused => return,
            Register::Low(bar) => bar.type_mask(),
            Register::High(_) => 0,
        };
        // What the register would hold with the write merged in; a
        // partial write keeps the other bytes as the guest last read them.
        let mut value = self.read(index).to_le_bytes();
        let Some(written) = value.get_mut(offset as usize..offset as usize + data.len()) else {
            return;
        };
        written.copy_from_slice(data);
        // All address bits set starts sizing; anything else (the old
        // address written back, or a move the VMM does not do) ends it.
        self.sizing[index] = u32::from_le_bytes(value) | read_only == u32::MAX;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write32(registers: &mut BarRegisters, index: usize, value: u32) {
        registers.write(index, 0, &value.to_le_bytes());
    }

    /// The guest's sizing dance on one register: returns the size mask.
    fn size(registers: &mut BarRegisters, index: usize) -> u32 {
        let original = registers.read(index);
        write32(registers, index, u32::MAX);
        let mask = registers.read(index);
        write32(registers, index, original);
        assert_eq!(registers.read(index), original, "register {index} restored");
        mask
    }

    #[test]
    fn a_32_bit_bar_reads_its_address_and_sizes() {
        let mut registers = BarRegisters::default();
        let bar = Bar {
            address: 0xe010_0000,
            size: 0x4000,
            kind: BarKind::Memory32,
            prefetchable: false,
        };
        registers.set(1, bar);
        assert_eq!(registers.get(1), Some(bar));
        assert_eq!(registers.read(1), 0xe010_0000);
        assert_eq!(size(&mut registers, 1), 0xffff_c000);
    }

    #[test]
    fn a_prefetchable_64_bit_bar_takes_two_registers() {
        let mut registers = BarRegisters::default();
        let bar = Bar {
            address: 0x10_0002_0000,
            size: 0x2_0000,
            kind: BarKind::Memory64,
            prefetchable: true,
        };
        registers.set(0, bar);
        assert_eq!(registers.get(0), Some(bar));
        assert_eq!(registers.get(1), None, "the high half is no BAR");
        assert_eq!(registers.read(0), 0x0002_0000 | 0xc);
        assert_eq!(registers.read(1), 0x10);
        assert_eq!(size(&mut registers, 0), 0xfffe_0000 | 0xc);
        assert_eq!(size(&mut registers, 1), u32::MAX);
    }

    #[test]
    fn a_64_bit_bar_above_4_gib_in_size_masks_the_high_half() {
        let mut registers = BarRegisters::default();
        registers.set(
            2,
            Bar {
                address: 0x20_0000_0000,
                size: 0x8_0000_0000,
                kind: BarKind::Memory64,
                prefetchable: false,
            },
        );
        assert_eq!(size(&mut registers, 2), 0x4);
        assert_eq!(size(&mut registers, 3), 0xffff_fff8);
    }

    #[test]
    fn an_io_bar_keeps_its_type_bit() {
        let mut registers = BarRegisters::default();
        registers.set(
            5,
            Bar {
                address: 0xc000,
                size: 0x20,
                kind: BarKind::Io,
                prefetchable: false,
            },
        );
        assert_eq!(registers.read(5), 0xc001);
        assert_eq!(size(&mut registers, 5), 0xffff_ffe1);
    }

    #[test]
    fn other_address_writes_are_ignored() {
        let mut registers = BarRegisters::default();
        registers.set(
            0,
            Bar {
                address: 0xe000_0000,
                size: 0x1000,
                kind: BarKind::Memory32,
                prefetchable: false,
            },
        );
        write32(&mut registers, 0, 0xd000_0000);
        assert_eq!(registers.read(0), 0xe000_0000);
        // Byte writes neither move it nor start sizing.
        registers.write(0, 3, &[0xff]);
        assert_eq!(registers.read(0), 0xe000_0000);
        // Sizing with the type bits left clear counts too.
        write32(&mut registers, 0, 0xffff_fff0);
        assert_eq!(registers.read(0), 0xffff_f000);
        // Out-of-range accesses do nothing.
        registers.write(0, 2, &[0; 4]);
        registers.write(BAR_COUNT, 0, &[0xff; 4]);
        assert_eq!(registers.read(0), 0xffff_f000);
    }

    #[test]
    fn unused_registers_read_zero_even_when_sized() {
        let mut registers = BarRegisters::default();
        assert_eq!(size(&mut registers, 4), 0);
        assert_eq!(registers.get(4), None);
        assert_eq!(registers.read(BAR_COUNT), 0);
    }
}
