//! Guest images for tests: a minimal ELF "kernel" with a PVH entry note
//! around a few bytes of 32-bit code. Such a guest runs wherever KVM runs
//! protected-mode code, PVM hosts included, so the whole VMM (boot path,
//! vCPU threads, devices, shutdown) can be tested where a Linux guest cannot
//! boot. Also a tap of a network namespace of its own, for the network
//! devices. Enabled by the `testing` feature.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Where the payload is loaded and entered: the lowest address a kernel may
/// take (the boot path puts its tables below).
pub const PAYLOAD_ADDRESS: u32 = 0x10_0000;

const ELF_HEADER_LEN: usize = 64;
const PROGRAM_HEADER_LEN: usize = 56;
const NOTE_OFFSET: usize = ELF_HEADER_LEN + 2 * PROGRAM_HEADER_LEN;
/// Note header (3 words), "Xen\0", and the 32-bit entry address.
const NOTE_LEN: usize = 12 + 4 + 4;
const CODE_OFFSET: usize = 0x1000;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Whether /dev/kvm can be used; says why not, as a test's skip reason,
/// when it cannot.
pub fn kvm_usable() -> bool {
    match std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            println!("SKIPPED: no usable /dev/kvm on this host: {e}");
            false
        }
    }
}

/// Writes `text` to COM1, one `out` per byte.
pub fn print(text: &[u8]) -> Vec<u8> {
    // mov dx, 0x3f8
    let mut code = vec![0x66, 0xba, 0xf8, 0x03];
    for &byte in text {
        // mov al, byte; out dx, al
        code.extend_from_slice(&[0xb0, byte, 0xee]);
    }
    code
}

/// Pulls the i8042 reset line: how a guest ends the VM.
pub const RESET: [u8; 4] = [0xb0, 0xfe, 0xe6, 0x64];

/// Spins forever: a guest that only its owner can end.
pub const SPIN: [u8; 2] = [0xeb, 0xfe];

/// Halts for good with interrupts off: an idle guest that only its owner
/// can end, and that costs no host CPU meanwhile.
pub const HALT: [u8; 4] = [0xfa, 0xf4, 0xeb, 0xfd];

/// A tap (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) named `name` in a network
/// namespace of its own, gone with its last descriptor; or why not.
pub fn namespaced_tap(name: &'static str) -> Result<OwnedFd, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root".into());
    }
    std::thread::spawn(move || {
        // SAFETY: unshare moves this thread only.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: a plain open of a C string.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(format!("/dev/net/tun: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: a new descriptor of our own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero ifreq is valid.
        let mut ifreq: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, &src) in ifreq.ifr_name.iter_mut().zip(name.as_bytes()) {
            *dst = src as libc::c_char;
        }
        ifreq.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and updates the ifreq.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifreq) } < 0 {
            return Err(format!("TUNSETIFF: {}", std::io::Error::last_os_error()));
        }
        Ok(fd)
    })
    .join()
    .expect("the namespace thread")
}

/// An ELF64 image whose one loadable segment is `code` at
/// [`PAYLOAD_ADDRESS`], entered there through the PVH entry note.
pub fn pvh_image(code: &[u8]) -> Vec<u8> {
    let mut image = vec![0u8; CODE_OFFSET];
    let entry = u64::from(PAYLOAD_ADDRESS);
    // ELF header: 64-bit, little-endian, executable, x86-64.
    let header = &mut image[..ELF_HEADER_LEN];
    header[..8].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    put(header, 16, &2u16.to_le_bytes());
    put(header, 18, &0x3eu16.to_le_bytes());
    put(header, 20, &1u32.to_le_bytes());
    put(header, 24, &entry.to_le_bytes());
    put(header, 32, &(ELF_HEADER_LEN as u64).to_le_bytes());
    put(header, 52, &(ELF_HEADER_LEN as u16).to_le_bytes());
    put(header, 54, &(PROGRAM_HEADER_LEN as u16).to_le_bytes());
    put(header, 56, &2u16.to_le_bytes());
    let code_len = code.len() as u64;
    program_header(
        &mut image[ELF_HEADER_LEN..],
        PT_LOAD,
        CODE_OFFSET as u64,
        entry,
        code_len,
    );
    program_header(
        &mut image[ELF_HEADER_LEN + PROGRAM_HEADER_LEN..],
        PT_NOTE,
        NOTE_OFFSET as u64,
        0,
        NOTE_LEN as u64,
    );
    let note = &mut image[NOTE_OFFSET..NOTE_OFFSET + NOTE_LEN];
    put(note, 0, &4u32.to_le_bytes());
    put(note, 4, &4u32.to_le_bytes());
    put(note, 8, &XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
    put(note, 12, b"Xen\0");
    put(note, 16, &PAYLOAD_ADDRESS.to_le_bytes());
    image.extend_from_slice(code);
    image
}

fn program_header(out: &mut [u8], kind: u32, offset: u64, address: u64, len: u64) {
    put(out, 0, &kind.to_le_bytes());
    // Readable and executable.
    put(out, 4, &5u32.to_le_bytes());
    put(out, 8, &offset.to_le_bytes());
    put(out, 16, &address.to_le_bytes());
    put(out, 24, &address.to_le_bytes());
    put(out, 32, &len.to_le_bytes());
    put(out, 40, &len.to_le_bytes());
    put(out, 48, &4u64.to_le_bytes());
}

fn put(out: &mut [u8], at: usize, bytes: &[u8]) {
    out[at..at + bytes.len()].copy_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn the_boot_path_loads_the_image_at_its_pvh_entry() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("payload.elf");
        let initramfs = dir.path().join("initramfs");
        let code = [print(b"hi").as_slice(), &RESET].concat();
        std::fs::write(&kernel, pvh_image(&code)).unwrap();
        std::fs::write(&initramfs, b"not read by the payload").unwrap();
        let memory = create_guest_memory(16 << 20).unwrap();
        let entry =
            crate::boot::load(&memory, &kernel, Some(&initramfs), "console=ttyS0", true).unwrap();
        assert_eq!(entry.entry, GuestAddress(u64::from(PAYLOAD_ADDRESS)));
        let mut loaded = vec![0u8; code.len()];
        memory.read_slice(&mut loaded, entry.entry).unwrap();
        assert_eq!(loaded, code);
    }
}
