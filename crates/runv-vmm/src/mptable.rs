//! The Intel MultiProcessor Specification (1.4) table that tells a guest
//! without ACPI how many CPUs it has and how interrupts are wired: one
//! processor entry per vCPU, an ISA bus, the IOAPIC, every IOAPIC pin
//! assigned, and ExtINT/NMI on each local APIC's LINT0/LINT1.
//!
//! Linux looks for the floating pointer in the first KiB of the EBDA (among
//! other places) and follows it to the configuration table.

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

/// Where the floating pointer goes, the configuration table right after
/// it: the start of the EBDA's first KiB, which Linux scans. The boot
/// memory map keeps this area out of RAM.
pub const ADDRESS: u64 = 0x9fc00;
/// Where the in-kernel local APICs and IOAPIC answer.
pub const LAPIC_ADDRESS: u32 = 0xfee0_0000;
pub const IOAPIC_ADDRESS: u32 = 0xfec0_0000;
/// Input pins of the in-kernel IOAPIC; GSI `n` is pin `n`.
pub const IOAPIC_PINS: u8 = 24;
/// APIC IDs are 8 bits in xAPIC mode, 0xff is the broadcast ID and the
/// IOAPIC takes the ID after the last vCPU.
pub const MAX_VCPUS: u8 = 254;

/// Sizes fixed by the specification.
const FLOATING_POINTER_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;
const PROCESSOR_ENTRY_SIZE: usize = 20;
const ENTRY_SIZE: usize = 8;
/// Entries other than processors: bus, IOAPIC, one per IOAPIC pin, and
/// the two local interrupts.
const FIXED_ENTRIES: usize = 2 + IOAPIC_PINS as usize + 2;

const SPEC_REVISION: u8 = 4;
/// What KVM's in-kernel devices report in their version registers.
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

/// Entry types.
const PROCESSOR: u8 = 0;
const BUS: u8 = 1;
const IOAPIC: u8 = 2;
const IO_INTERRUPT: u8 = 3;
const LOCAL_INTERRUPT: u8 = 4;

/// Processor entry flags.
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
/// The CPU signature (family 6) and CPUID.1:EDX features (FPU, APIC)
/// processor entries carry; Linux reads the real ones from CPUID.
const CPU_SIGNATURE: u32 = 6 << 8;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const IOAPIC_ENABLED: u8 = 1;

/// Interrupt types of I/O and local interrupt entries.
const INT: u8 = 0;
const NMI: u8 = 1;
const EXT_INT: u8 = 3;
/// Polarity and trigger "conform to the bus": edge, active high on ISA.
const CONFORMING: u16 = 0;
const ISA_BUS_ID: u8 = 0;
/// A local interrupt entry for every local APIC.
const ALL_LOCAL_APICS: u8 = 0xff;

const OEM_ID: &[u8; 8] = b"RUNV    ";
const PRODUCT_ID: &[u8; 12] = b"MICROVM     ";

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("a VM needs 1 to {MAX_VCPUS} vCPUs, not {0}")]
    VcpuCount(u8),
    #[error("writing the MP table into guest memory: {0}")]
    Memory(String),
}

/// Bytes the floating pointer and the configuration table take for `vcpus`.
pub const fn size(vcpus: u8) -> usize {
    FLOATING_POINTER_SIZE + table_size(vcpus)
}

const fn table_size(vcpus: u8) -> usize {
    HEADER_SIZE + PROCESSOR_ENTRY_SIZE * vcpus as usize + ENTRY_SIZE * FIXED_ENTRIES
}

/// Writes the MP table at [`ADDRESS`] for `vcpus` vCPUs: vCPU 0 boots,
/// each vCPU's APIC ID is its index, the IOAPIC's is `vcpus`.
pub fn write(memory: &GuestMemory, vcpus: u8) -> Result<(), MpTableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MpTableError::VcpuCount(vcpus));
    }
    let mut bytes = floating_pointer(ADDRESS as u32 + FLOATING_POINTER_SIZE as u32).to_vec();
    bytes.extend(config_table(vcpus));
    memory
        .write_slice(&bytes, GuestAddress(ADDRESS))
        .map_err(|e| MpTableError::Memory(e.to_string()))
}

/// The structure the guest scans for: it points at the configuration
/// table and says there is one (no default configuration).
fn floating_pointer(table_address: u32) -> [u8; FLOATING_POINTER_SIZE] {
    let mut bytes = [0u8; FLOATING_POINTER_SIZE];
    bytes[0..4].copy_from_slice(b"_MP_");
    bytes[4..8].copy_from_slice(&table_address.to_le_bytes());
    bytes[8] = 1; // length in 16-byte paragraphs
    bytes[9] = SPEC_REVISION;
    // bytes[10] is the checksum; features 1..5 stay 0: a configuration
    // table is present and the interrupts run in virtual-wire mode.
    bytes[10] = checksum(&bytes);
    bytes
}

/// The configuration table: header, then entries sorted by type.
fn config_table(vcpus: u8) -> Vec<u8> {
    let mut table = Vec::with_capacity(table_size(vcpus));
    let ioapic_id = vcpus;
    let entries = u16::from(vcpus) + FIXED_ENTRIES as u16;

    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_size(vcpus) as u16).to_le_bytes());
    table.push(SPEC_REVISION);
    table.push(0); // checksum, set below
    table.extend_from_slice(OEM_ID);
    table.extend_from_slice(PRODUCT_ID);
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes()); // ...of no size
    table.extend_from_slice(&entries.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDRESS.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // no extended table; reserved

    for id in 0..vcpus {
        let bootstrap = if id == 0 { CPU_BOOTSTRAP } else { 0 };
        table.extend_from_slice(&[PROCESSOR, id, LAPIC_VERSION, CPU_ENABLED | bootstrap]);
        table.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        table.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        table.extend_from_slice(&[0; 8]);
    }
    table.extend_from_slice(&[BUS, ISA_BUS_ID]);
    table.extend_from_slice(b"ISA   ");
    table.extend_from_slice(&[IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED]);
    table.extend_from_slice(&IOAPIC_ADDRESS.to_le_bytes());
    // Identity wiring, as KVM's default GSI routing has it: bus IRQ n is
    // pin n. The pins past the 16 ISA IRQs get entries too (named by pin
    // number on the same bus): Linux maps only the pins the table lists
    // and takes the others for not connected, so devices wired there
    // could not get their interrupt.
    for pin in 0..IOAPIC_PINS {
        table.extend_from_slice(&interrupt_entry(IO_INTERRUPT, INT, pin, ioapic_id, pin));
    }
    table.extend_from_slice(&interrupt_entry(
        LOCAL_INTERRUPT,
        EXT_INT,
        0,
        ALL_LOCAL_APICS,
        0,
    ));
    table.extend_from_slice(&interrupt_entry(
        LOCAL_INTERRUPT,
        NMI,
        0,
        ALL_LOCAL_APICS,
        1,
    ));

    table[7] = checksum(&table);
    table
}

/// An I/O or local interrupt entry from the ISA bus's `source_irq` to
/// input `pin` of `destination` (an IOAPIC ID, or local APIC IDs).
fn interrupt_entry(
    entry_type: u8,
    interrupt_type: u8,
    source_irq: u8,
    destination: u8,
    pin: u8,
) -> [u8; ENTRY_SIZE] {
    let [flags_low, flags_high] = CONFORMING.to_le_bytes();
    [
        entry_type,
        interrupt_type,
        flags_low,
        flags_high,
        ISA_BUS_ID,
        source_irq,
        destination,
        pin,
    ]
}

/// The byte that makes `bytes` (with it included) sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, byte| sum.wrapping_add(*byte))
        .wrapping_neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    /// A table read back from guest memory, as a guest would parse it.
    struct Parsed {
        pointer: Vec<u8>,
        table: Vec<u8>,
        /// (type, bytes) of each entry after the header.
        entries: Vec<(u8, Vec<u8>)>,
    }

    fn read(vcpus: u8) -> Parsed {
        let memory = create_guest_memory(1 << 20).unwrap();
        write(&memory, vcpus).unwrap();
        let mut pointer = vec![0u8; FLOATING_POINTER_SIZE];
        memory
            .read_slice(&mut pointer, GuestAddress(ADDRESS))
            .unwrap();
        let table_address = u32::from_le_bytes(pointer[4..8].try_into().unwrap());
        let mut header = [0u8; HEADER_SIZE];
        memory
            .read_slice(&mut header, GuestAddress(u64::from(table_address)))
            .unwrap();
        let length = u16::from_le_bytes([header[4], header[5]]);
        let mut table = vec![0u8; usize::from(length)];
        memory
            .read_slice(&mut table, GuestAddress(u64::from(table_address)))
            .unwrap();
        let count = u16::from_le_bytes([table[34], table[35]]);
        let mut entries = Vec::new();
        let mut at = HEADER_SIZE;
        for _ in 0..count {
            let size = if table[at] == PROCESSOR {
                PROCESSOR_ENTRY_SIZE
            } else {
                ENTRY_SIZE
            };
            entries.push((table[at], table[at..at + size].to_vec()));
            at += size;
        }
        assert_eq!(at, table.len(), "the entries fill the table exactly");
        Parsed {
            pointer,
            table,
            entries,
        }
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |sum, byte| sum.wrapping_add(*byte))
    }

    #[test]
    fn floating_pointer_leads_to_a_valid_table() {
        let parsed = read(4);
        let pointer = &parsed.pointer;
        assert_eq!(&pointer[0..4], b"_MP_");
        assert_eq!(
            u32::from_le_bytes(pointer[4..8].try_into().unwrap()),
            ADDRESS as u32 + 16
        );
        assert_eq!((pointer[8], pointer[9]), (1, 4), "16 bytes, spec 1.4");
        assert_eq!(sum(pointer), 0, "floating pointer checksum");
        assert_eq!(&pointer[11..16], &[0; 5], "no default configuration");

        let table = &parsed.table;
        assert_eq!(&table[0..4], b"PCMP");
        assert_eq!(table.len(), table_size(4));
        assert_eq!(size(4), 16 + table.len());
        assert_eq!(table[6], 4);
        assert_eq!(sum(table), 0, "configuration table checksum");
        assert_eq!(
            u32::from_le_bytes(table[36..40].try_into().unwrap()),
            LAPIC_ADDRESS
        );
    }

    #[test]
    fn one_processor_per_vcpu_and_only_vcpu_0_boots() {
        let parsed = read(3);
        let processors: Vec<_> = parsed
            .entries
            .iter()
            .filter(|(kind, _)| *kind == PROCESSOR)
            .map(|(_, bytes)| (bytes[1], bytes[2], bytes[3]))
            .collect();
        assert_eq!(
            processors,
            vec![
                (0, LAPIC_VERSION, CPU_ENABLED | CPU_BOOTSTRAP),
                (1, LAPIC_VERSION, CPU_ENABLED),
                (2, LAPIC_VERSION, CPU_ENABLED),
            ]
        );
        let kinds: Vec<u8> = parsed.entries.iter().map(|(kind, _)| *kind).collect();
        let mut sorted = kinds.clone();
        sorted.sort();
        assert_eq!(kinds, sorted, "entries come sorted by type");
    }

    #[test]
    fn ioapic_and_interrupts_are_wired_one_to_one() {
        let vcpus = 2;
        let parsed = read(vcpus);
        let of_type = |kind: u8| -> Vec<&Vec<u8>> {
            parsed
                .entries
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, bytes)| bytes)
                .collect()
        };
        let buses = of_type(BUS);
        assert_eq!(buses.len(), 1);
        assert_eq!(&buses[0][2..8], b"ISA   ");

        let ioapics = of_type(IOAPIC);
        assert_eq!(ioapics.len(), 1);
        assert_eq!(ioapics[0][1], vcpus, "IOAPIC ID follows the last vCPU");
        assert_eq!(ioapics[0][3], IOAPIC_ENABLED);
        assert_eq!(
            u32::from_le_bytes(ioapics[0][4..8].try_into().unwrap()),
            IOAPIC_ADDRESS
        );

        let pins: Vec<_> = of_type(IO_INTERRUPT)
            .iter()
            .map(|e| (e[1], e[4], e[5], e[6], e[7]))
            .collect();
        let expected: Vec<_> = (0..IOAPIC_PINS)
            .map(|pin| (INT, ISA_BUS_ID, pin, vcpus, pin))
            .collect();
        assert_eq!(pins, expected, "all 24 pins, bus IRQ n on pin n");

        let locals: Vec<_> = of_type(LOCAL_INTERRUPT)
            .iter()
            .map(|e| (e[1], e[6], e[7]))
            .collect();
        assert_eq!(
            locals,
            vec![(EXT_INT, ALL_LOCAL_APICS, 0), (NMI, ALL_LOCAL_APICS, 1)]
        );
    }

    #[test]
    fn vcpu_counts_outside_the_apic_id_space_are_refused() {
        let memory = create_guest_memory(1 << 20).unwrap();
        for vcpus in [0, MAX_VCPUS + 1] {
            let err = write(&memory, vcpus).unwrap_err();
            assert!(err.to_string().contains("1 to 254"), "{err}");
        }
        let parsed = read(MAX_VCPUS);
        assert_eq!(sum(&parsed.table), 0);
        assert_eq!(parsed.entries.len(), usize::from(MAX_VCPUS) + FIXED_ENTRIES);
    }
}
