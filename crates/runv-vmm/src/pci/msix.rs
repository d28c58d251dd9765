//! MSI-X emulated in front of a device whose interrupts arrive on
//! eventfds: the guest programs the table and mask bits here, and KVM
//! delivers each vector from its eventfd (irqfd) to the MSI route the guest
//! programmed, without the VMM in the path.
//!
//! A vector is *active* while MSI-X is enabled, the function is not masked
//! and the vector is not masked; only then does KVM hold its eventfd. The
//! device keeps signalling a masked vector's eventfd, whose count then
//! stands for the pending bit: the PBA reports it, and unmasking delivers
//! it.

use std::{ops::Range, sync::Arc};

use vmm_sys_util::eventfd::EventFd;

use crate::{irq_routing::IrqRouting, VmmError};

/// Bytes per MSI-X table entry: address low, address high, data, control.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// The most vectors a function may have (Table Size is 11 bits, N - 1).
const MAX_VECTORS: u16 = 2048;
/// Message Control: MSI-X Enable.
const ENABLE: u16 = 1 << 15;
/// Message Control: Function Mask.
const FUNCTION_MASK: u16 = 1 << 14;
/// Vector Control: Mask Bit.
const VECTOR_MASKED: u32 = 1;

/// The MSI-X vectors of one function: table, pending bits, one GSI and one
/// eventfd per vector.
pub struct MsixVectors {
    routing: Arc<IrqRouting>,
    vectors: Vec<Vector>,
    enabled: bool,
    function_masked: bool,
}

struct Vector {
    /// The table entry as the guest wrote it.
    entry: [u8; MSIX_TABLE_ENTRY_SIZE as usize],
    gsi: u32,
    event: EventFd,
    /// KVM holds `event` as an irqfd of `gsi`.
    registered: bool,
}

impl Vector {
    fn new(gsi: u32, event: EventFd) -> Vector {
        let mut entry = [0; MSIX_TABLE_ENTRY_SIZE as usize];
        // Every vector starts masked.
        entry[12..].copy_from_slice(&VECTOR_MASKED.to_le_bytes());
        Vector {
            entry,
            gsi,
            event,
            registered: false,
        }
    }

    fn dword(&self, index: usize) -> u32 {
        let bytes = &self.entry[index * 4..index * 4 + 4];
        u32::from_le_bytes(bytes.try_into().expect("four bytes"))
    }

    /// The message: address and data.
    fn message(&self) -> (u64, u32) {
        let address = u64::from(self.dword(1)) << 32 | u64::from(self.dword(0));
        (address, self.dword(2))
    }

    fn masked(&self) -> bool {
        self.dword(3) & VECTOR_MASKED != 0
    }

    /// Whether the device signalled the eventfd while KVM did not hold it.
    /// Reading takes the count, so it is put back.
    fn pending(&self) -> bool {
        if self.registered {
            return false;
        }
        match self.event.read() {
            Ok(count) => {
                self.signal(count);
                true
            }
            Err(_) => false,
        }
    }

    fn signal(&self, count: u64) {
        if let Err(e) = self.event.write(count) {
            tracing::warn!(gsi = self.gsi, error = %e, "cannot re-signal an MSI-X vector");
        }
    }
}

impl MsixVectors {
    /// `count` vectors, masked, with a GSI each from `routing`.
    pub fn new(routing: Arc<IrqRouting>, count: u16) -> Result<MsixVectors, VmmError> {
        if count == 0 || count > MAX_VECTORS {
            return Err(VmmError::Device(format!(
                "{count} MSI-X vectors asked for: a function has 1 to {MAX_VECTORS}"
            )));
        }
        let mut vectors = MsixVectors {
            routing,
            vectors: Vec::with_capacity(count.into()),
            enabled: false,
            function_masked: false,
        };
        // On an error, dropping `vectors` releases the GSIs taken so far.
        for _ in 0..count {
            let event = EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| VmmError::Device(format!("creating an MSI-X eventfd: {e}")))?;
            let gsi = vectors.routing.allocate_gsi()?;
            vectors.vectors.push(Vector::new(gsi, event));
        }
        Ok(vectors)
    }

    pub fn count(&self) -> u16 {
        self.vectors.len() as u16
    }

    /// Bytes of the table: one entry per vector.
    pub fn table_size(&self) -> u64 {
        u64::from(self.count()) * MSIX_TABLE_ENTRY_SIZE
    }

    /// Bytes of the pending-bit array: one bit per vector, in qwords.
    pub fn pba_size(&self) -> u64 {
        u64::from(self.count()).div_ceil(64) * 8
    }

    /// The eventfd that raises each vector, for the device's back-end
    /// (VFIO_DEVICE_SET_IRQS).
    pub fn eventfds(&self) -> Vec<&EventFd> {
        self.vectors.iter().map(|vector| &vector.event).collect()
    }

    /// A guest read at `offset` in the table; all ones outside it.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        match self.entry_range(offset, data.len()) {
            Some((index, range)) => data.copy_from_slice(&self.vectors[index].entry[range]),
            None => data.fill(0xff),
        }
    }

    /// A guest write at `offset` in the table: a vector's new route, or its
    /// mask bit, reach KVM at once.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Result<(), VmmError> {
        let Some((index, range)) = self.entry_range(offset, data.len()) else {
            return Ok(());
        };
        let vector = &mut self.vectors[index];
        let before = vector.message();
        vector.entry[range].copy_from_slice(data);
        let rerouted = vector.message() != before;
        self.update(index, rerouted)
    }

    /// A guest read at `offset` in the pending-bit array. A vector is
    /// pending when its eventfd was signalled while KVM did not hold it;
    /// an active vector is never pending, as KVM delivers it at once.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (at, byte) in data.iter_mut().enumerate() {
            // Byte n holds the bits of vectors 8n..8n + 8; past the
            // vectors, the array's padding reads zero.
            let first = usize::try_from(offset)
                .ok()
                .and_then(|offset| offset.checked_add(at)?.checked_mul(8));
            *byte = first.map_or(0, |first| {
                self.vectors
                    .iter()
                    .skip(first)
                    .take(8)
                    .enumerate()
                    .filter(|(_, vector)| vector.pending())
                    .fold(0, |byte, (bit, _)| byte | 1 << bit)
            });
        }
    }

    /// The capability's Message Control as the guest wrote it (enable, bit
    /// 15; function mask, bit 14). Returns whether MSI-X was just enabled
    /// (`Some(true)`) or disabled (`Some(false)`), for the back-end.
    pub fn set_control(&mut self, control: u16) -> Result<Option<bool>, VmmError> {
        let enabled = control & ENABLE != 0;
        let flipped = (enabled != self.enabled).then_some(enabled);
        self.enabled = enabled;
        self.function_masked = control & FUNCTION_MASK != 0;
        for index in 0..self.vectors.len() {
            self.update(index, false)?;
        }
        Ok(flipped)
    }

    /// The vector whose entry holds `len` bytes at table `offset`, with
    /// their range in the entry; None outside the table or across entries.
    fn entry_range(&self, offset: u64, len: usize) -> Option<(usize, Range<usize>)> {
        let index = usize::try_from(offset / MSIX_TABLE_ENTRY_SIZE).ok()?;
        let start = (offset % MSIX_TABLE_ENTRY_SIZE) as usize;
        let range = start..start + len;
        (index < self.vectors.len() && range.end <= MSIX_TABLE_ENTRY_SIZE as usize)
            .then_some((index, range))
    }

    /// Brings KVM in line with vector `index`: its irqfd registered while
    /// it is active, its route renewed when `rerouted` while active.
    fn update(&mut self, index: usize, rerouted: bool) -> Result<(), VmmError> {
        let active = self.enabled && !self.function_masked && !self.vectors[index].masked();
        let vector = &mut self.vectors[index];
        let (address, data) = vector.message();
        match (active, vector.registered) {
            (true, false) => {
                self.routing.set_msi_route(vector.gsi, address, data)?;
                // What the device signalled while the vector was masked
                // is taken now and signalled again once KVM listens, so
                // that it is delivered, not lost.
                let pending = vector.event.read().ok();
                let registered = self.routing.register_irqfd(&vector.event, vector.gsi);
                vector.registered = registered.is_ok();
                if let Some(count) = pending {
                    vector.signal(count);
                }
                registered
            }
            (true, true) if rerouted => self.routing.set_msi_route(vector.gsi, address, data),
            (false, true) => {
                self.routing.unregister_irqfd(&vector.event, vector.gsi)?;
                vector.registered = false;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

impl Drop for MsixVectors {
    fn drop(&mut self) {
        for vector in &self.vectors {
            if vector.registered {
                if let Err(e) = self.routing.unregister_irqfd(&vector.event, vector.gsi) {
                    tracing::warn!(gsi = vector.gsi, error = %e, "cannot unregister an MSI-X irqfd");
                }
            }
            if let Err(e) = self.routing.release_gsi(vector.gsi) {
                tracing::warn!(gsi = vector.gsi, error = %e, "cannot release an MSI-X GSI");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{memory::create_guest_memory, vm::Vm};

    /// A VM on real KVM with `count` vectors, or None after saying why not.
    fn vectors(count: u16) -> Option<(Vm, MsixVectors)> {
        if !crate::testing::kvm_usable() {
            return None;
        }
        let vm = Vm::new(create_guest_memory(1 << 20).unwrap()).unwrap();
        let vectors = MsixVectors::new(vm.irq_routing().clone(), count).unwrap();
        Some((vm, vectors))
    }

    fn read32(vectors: &MsixVectors, offset: u64) -> u32 {
        let mut data = [0; 4];
        vectors.read_table(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(vectors: &mut MsixVectors, offset: u64, value: u32) {
        vectors.write_table(offset, &value.to_le_bytes()).unwrap();
    }

    /// Programs vector `index` with a message and unmasks it.
    fn program(vectors: &mut MsixVectors, index: u64, data: u32) {
        let entry = index * MSIX_TABLE_ENTRY_SIZE;
        vectors
            .write_table(entry, &0xfee0_0000u64.to_le_bytes())
            .unwrap();
        write32(vectors, entry + 8, data);
        write32(vectors, entry + 12, 0);
    }

    fn registered(vectors: &MsixVectors) -> Vec<bool> {
        vectors.vectors.iter().map(|v| v.registered).collect()
    }

    fn pba(vectors: &MsixVectors) -> u64 {
        let mut data = [0; 8];
        vectors.read_pba(0, &mut data);
        u64::from_le_bytes(data)
    }

    #[test]
    fn the_table_reads_back_what_the_guest_wrote() {
        let Some((_vm, mut vectors)) = vectors(3) else {
            return;
        };
        assert_eq!(vectors.count(), 3);
        assert_eq!(vectors.table_size(), 48);
        assert_eq!(vectors.pba_size(), 8);
        assert_eq!(vectors.eventfds().len(), 3);
        // Vectors start masked, with no message.
        assert_eq!(read32(&vectors, 16 + 12), VECTOR_MASKED);
        assert_eq!(read32(&vectors, 16), 0);
        vectors
            .write_table(32, &0x1_fee0_1000u64.to_le_bytes())
            .unwrap();
        write32(&mut vectors, 40, 0x4041);
        assert_eq!(read32(&vectors, 32), 0xfee0_1000);
        assert_eq!(read32(&vectors, 36), 1);
        assert_eq!(read32(&vectors, 40), 0x4041);
        let mut word = [0; 2];
        vectors.read_table(42, &mut word);
        assert_eq!(word, [0, 0]);
        // Past the table, or across two entries: nothing there.
        write32(&mut vectors, 48, 7);
        assert_eq!(read32(&vectors, 48), u32::MAX);
        let mut across = [0; 8];
        vectors.read_table(12, &mut across);
        assert_eq!(across, [0xff; 8]);
        assert!(registered(&vectors).iter().all(|&r| !r), "MSI-X is off");
    }

    #[test]
    fn vectors_reach_kvm_only_while_enabled_unmasked_and_not_function_masked() {
        let Some((_vm, mut vectors)) = vectors(2) else {
            return;
        };
        program(&mut vectors, 0, 0x4030);
        assert_eq!(registered(&vectors), [false, false]);
        assert_eq!(vectors.set_control(ENABLE).unwrap(), Some(true));
        assert_eq!(registered(&vectors), [true, false]);
        // A new message while active is routed at once.
        write32(&mut vectors, 8, 0x4031);
        assert_eq!(vectors.set_control(ENABLE).unwrap(), None);
        assert_eq!(vectors.set_control(ENABLE | FUNCTION_MASK).unwrap(), None);
        assert_eq!(registered(&vectors), [false, false]);
        program(&mut vectors, 1, 0x4032);
        assert_eq!(registered(&vectors), [false, false]);
        assert_eq!(vectors.set_control(ENABLE).unwrap(), None);
        assert_eq!(registered(&vectors), [true, true]);
        write32(&mut vectors, 12, VECTOR_MASKED);
        assert_eq!(registered(&vectors), [false, true]);
        assert_eq!(vectors.set_control(0).unwrap(), Some(false));
        assert_eq!(registered(&vectors), [false, false]);
    }

    #[test]
    fn an_interrupt_while_masked_is_pending_and_delivered_on_unmask() {
        let Some((_vm, mut vectors)) = vectors(66) else {
            return;
        };
        assert_eq!(vectors.pba_size(), 16);
        program(&mut vectors, 65, 0x4030);
        write32(&mut vectors, 65 * MSIX_TABLE_ENTRY_SIZE + 12, VECTOR_MASKED);
        vectors.set_control(ENABLE).unwrap();
        assert_eq!(pba(&vectors), 0);
        vectors.eventfds()[65].write(1).unwrap();
        let mut pba_high = [0; 8];
        vectors.read_pba(8, &mut pba_high);
        assert_eq!(pba_high, [2, 0, 0, 0, 0, 0, 0, 0]);
        // Reading the PBA leaves the interrupt pending.
        vectors.read_pba(8, &mut pba_high);
        assert_eq!(pba_high[0], 2);
        write32(&mut vectors, 65 * MSIX_TABLE_ENTRY_SIZE + 12, 0);
        assert!(vectors.vectors[65].registered);
        // KVM's irqfd took the count: the interrupt went to the guest.
        let left = vectors.eventfds()[65].read();
        assert!(left.is_err(), "the eventfd still holds {left:?}");
        vectors.read_pba(8, &mut pba_high);
        assert_eq!(pba_high, [0; 8]);
    }

    #[test]
    fn dropping_the_vectors_returns_their_gsis() {
        let Some((vm, mut vectors)) = vectors(2) else {
            return;
        };
        program(&mut vectors, 0, 0x4030);
        vectors.set_control(ENABLE).unwrap();
        drop(vectors);
        assert_eq!(vm.irq_routing().allocate_gsi().unwrap(), 24);
        assert!(MsixVectors::new(vm.irq_routing().clone(), 0).is_err());
        assert!(MsixVectors::new(vm.irq_routing().clone(), 2049).is_err());
    }
}
