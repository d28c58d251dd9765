//! The input of the bus targets (mmio_pci, vfio_pci): a guest's register
//! accesses, 11 bytes each: a kind byte (bit 0 write, bit 1 the port bus,
//! bits 2-4 the size), a 16-bit address and 8 bytes of value for writes.

use runv_vmm::Bus;

/// One access's encoded length.
const ACCESS_LEN: usize = 11;

/// Access sizes, by bits 2-4 of the kind byte: the valid ones and a few
/// that no CPU makes but a bus must survive.
const SIZES: [usize; 8] = [1, 2, 4, 8, 0, 3, 5, 16];

/// Replays `input`'s accesses: each goes to `mmio` or `ports`, at the
/// address `place` makes of its own (the port bus's flag and the raw
/// address), so that most accesses reach a device.
pub fn replay(input: &[u8], mmio: &Bus, ports: &Bus, place: impl Fn(bool, u64) -> u64) {
    for access in input.chunks(ACCESS_LEN) {
        let mut bytes = [0u8; ACCESS_LEN];
        bytes[..access.len()].copy_from_slice(access);
        let kind = bytes[0];
        let on_ports = kind & 2 != 0;
        let address = place(
            on_ports,
            u64::from(u16::from_le_bytes([bytes[1], bytes[2]])),
        );
        let mut value = [0u8; 16];
        value[..8].copy_from_slice(&bytes[3..]);
        let data = &mut value[..SIZES[usize::from(kind >> 2 & 7)]];
        let bus = if on_ports { ports } else { mmio };
        if kind & 1 == 0 {
            bus.read(address, data);
        } else {
            bus.write(address, data);
        }
    }
}
