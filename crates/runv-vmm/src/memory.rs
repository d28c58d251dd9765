//! Guest RAM: one memfd, mapped below and above the 32-bit MMIO gap.
//!
//! memfd rather than anonymous memory so that the same pages can later be
//! shared with device back-ends and snapshots without copying.

use std::{ffi::CString, fs::File, os::fd::FromRawFd};

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::VmmError;

/// Guest RAM as the VMM maps it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Where the 32-bit MMIO gap starts: devices (virtio-mmio, the IOAPIC and
/// LAPIC, the PVH firmware area) live between here and 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// Where the gap ends and RAM resumes.
pub const MMIO_GAP_END: u64 = 1 << 32;

/// The guest-physical ranges of `size` bytes of RAM, with their offsets in
/// the backing file.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64, u64)> {
    let below = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), below, 0)];
    if size > below {
        ranges.push((GuestAddress(MMIO_GAP_END), size - below, below));
    }
    ranges
}

/// The name of the guest RAM's memfd, as /proc/<pid>/maps shows it
/// (`/memfd:<name>`): how tools find a VM's RAM in the VMM's mappings.
pub const GUEST_RAM_MEMFD_NAME: &str = "runv-guest-ram";

/// Allocates `size` bytes of guest RAM in a memfd. Pages are only touched
/// (and only cost host memory) when the guest uses them.
pub fn create_guest_memory(size: u64) -> Result<GuestMemory, VmmError> {
    let name = CString::new(GUEST_RAM_MEMFD_NAME).expect("no NUL in the name");
    // SAFETY: name is a valid C string; the returned descriptor is checked
    // and then owned by the File.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(VmmError::Memory(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| VmmError::Memory(format!("sizing guest RAM to {size} bytes: {e}")))?;
    let ranges: Vec<_> = ram_ranges(size)
        .into_iter()
        .map(|(addr, len, offset)| {
            let file = file
                .try_clone()
                .map_err(|e| VmmError::Memory(format!("duplicating the RAM memfd: {e}")))?;
            Ok((addr, len as usize, Some(FileOffset::new(file, offset))))
        })
        .collect::<Result<_, VmmError>>()?;
    GuestMemoryMmap::from_ranges_with_files(ranges).map_err(|e| VmmError::Memory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend as _};

    #[test]
    fn small_ram_sits_below_the_gap() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20, 0)]);
    }

    #[test]
    fn large_ram_skips_the_gap() {
        let size = 4u64 << 30;
        let ranges = ram_ranges(size);
        assert_eq!(ranges[0], (GuestAddress(0), MMIO_GAP_START, 0));
        assert_eq!(
            ranges[1],
            (
                GuestAddress(MMIO_GAP_END),
                size - MMIO_GAP_START,
                MMIO_GAP_START
            )
        );
    }

    #[test]
    fn memory_is_readable_and_writable() {
        let memory = create_guest_memory(2 << 20).unwrap();
        assert_eq!(memory.num_regions(), 1);
        memory
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            memory.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert!(memory.read_obj::<u32>(GuestAddress(2 << 20)).is_err());
    }
}
