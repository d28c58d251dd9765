//! BAR registers as the guest reads and writes them, sizing included.

/// Configuration register of BAR 0 (byte offset 0x10).
pub const FIRST_BAR_REGISTER: usize = 4;
/// BARs of a type-0 header.
pub const BAR_COUNT: usize = 6;

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

/// The six BAR registers of one function.
#[derive(Debug, Default)]
pub struct BarRegisters {}

impl BarRegisters {
    /// Puts `bar` in BAR `index` (and `index + 1` for a 64-bit BAR).
    pub fn set(&mut self, index: usize, bar: Bar) {
        todo!("{index} {bar:?}")
    }

    /// The BAR in register `index`, if one starts there.
    pub fn get(&self, index: usize) -> Option<Bar> {
        todo!("{index}")
    }

    /// What the guest reads from BAR register `index` (0..6): the address
    /// with the type bits, or the size mask after the guest wrote all ones.
    pub fn read(&self, index: usize) -> u32 {
        todo!("{index}")
    }

    /// A guest write of `data` at byte `offset` of BAR register `index`.
    pub fn write(&mut self, index: usize, offset: u64, data: &[u8]) {
        todo!("{index} {offset} {data:?}")
    }
}
