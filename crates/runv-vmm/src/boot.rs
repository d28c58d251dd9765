//! Direct boot of an uncompressed ELF `vmlinux` through its PVH entry
//! point: the kernel, the initramfs and the command line go into guest RAM,
//! a PVH `start_info` describes them with the memory map, and vCPU 0
//! starts at the entry in flat 32-bit protected mode, as the PVH protocol
//! specifies. The other vCPUs, listed by the MP table (`mptable::write`,
//! in an area this memory map keeps out of RAM), wait for the guest to
//! start them through their local APICs (INIT, then SIPI).

use std::{
    fs::File,
    io::{self, Read, Seek, SeekFrom},
    os::fd::AsRawFd,
    path::Path,
};

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment};
use linux_loader::{
    cmdline::Cmdline,
    configurator::{pvh::PvhBootConfigurator, BootConfigurator, BootParams},
    loader::{
        elf::{
            start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info},
            Elf, PvhBootCapability,
        },
        load_cmdline, KernelLoader,
    },
};
use vm_memory::{
    bitmap::BitmapSlice, Address, Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion,
    ReadVolatile, VolatileMemoryError, VolatileSlice,
};

use crate::{memory::GuestMemory, mptable, vcpu::Vcpu};

/// Where the boot GDT and the (empty) IDT go.
const GDT_ADDRESS: u64 = 0x500;
const IDT_ADDRESS: u64 = 0x520;
/// PVH start_info, then the module list, then the memory map.
const START_INFO_ADDRESS: u64 = 0x6000;
const MODLIST_ADDRESS: u64 = 0x6040;
const MEMMAP_ADDRESS: u64 = 0x7000;
/// The kernel command line and its size limit on x86 (COMMAND_LINE_SIZE).
const CMDLINE_ADDRESS: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Usable low memory ends where the BIOS area would start...
const EBDA_START: u64 = 0x9fc00;
/// ...and the kernel is loaded from 1 MiB on.
const HIGH_MEMORY_START: u64 = 0x10_0000;
// The MP table lies in the EBDA and the BIOS area after it, which the
// memory map leaves out of RAM: the guest never allocates over it.
const _: () = assert!(
    mptable::ADDRESS >= EBDA_START
        && mptable::ADDRESS + mptable::size(mptable::MAX_VCPUS) as u64 <= HIGH_MEMORY_START,
    "the largest MP table lies between the EBDA and 1 MiB"
);
const PAGE_SIZE: u64 = 4096;

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;

/// Selectors of the boot GDT.
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;
/// Flat 4 GiB segments: 32-bit code, data, and a 32-bit TSS.
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0xfffff),
];
const X86_CR0_PE: u64 = 0x1;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open guest kernel {path}: {source}")]
    OpenKernel {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot load guest kernel {path}: {source} (runv boots an uncompressed ELF vmlinux built by scripts/build-kernel.sh)")]
    LoadKernel {
        path: String,
        source: linux_loader::loader::Error,
    },
    #[error("guest kernel {path} has no PVH entry point: build it with CONFIG_PVH=y (scripts/build-kernel.sh does)")]
    NoPvhEntry { path: String },
    #[error("cannot read initramfs {path}: {source}")]
    ReadInitramfs {
        path: String,
        source: std::io::Error,
    },
    #[error("initramfs of {size} bytes does not fit between the kernel's end ({kernel_end:#x}) and the end of low RAM ({ram_end:#x}): give the VM more memory")]
    InitramfsTooLarge {
        size: u64,
        kernel_end: u64,
        ram_end: u64,
    },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("writing boot parameters into guest memory: {0}")]
    Memory(String),
}

/// Where vCPU 0 starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    /// The kernel's PVH entry point.
    pub entry: GuestAddress,
    /// The PVH start_info the entry expects in EBX.
    pub start_info: GuestAddress,
}

/// Loads `kernel` and `initramfs` into `memory` with `cmdline`, and writes
/// the PVH boot parameters. With `share_files`, their pages are mapped
/// from the files rather than copied (see [`BootFile`]): only for guest
/// RAM that nothing else maps (no device DMA through pinned pages).
pub fn load(
    memory: &GuestMemory,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
    share_files: bool,
) -> Result<BootEntry, BootError> {
    let path = kernel.display().to_string();
    let mut image =
        BootFile::open(kernel, share_files).map_err(|source| BootError::OpenKernel {
            path: path.clone(),
            source,
        })?;
    let loaded = Elf::load(
        memory,
        None,
        &mut image,
        Some(GuestAddress(HIGH_MEMORY_START)),
    )
    .map_err(|source| BootError::LoadKernel {
        path: path.clone(),
        source,
    })?;
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        return Err(BootError::NoPvhEntry { path });
    };
    let initramfs = initramfs
        .map(|path| load_initramfs(memory, path, loaded.kernel_end, share_files))
        .transpose()?;
    write_cmdline(memory, cmdline)?;
    write_start_info(memory, initramfs)?;
    Ok(BootEntry {
        entry,
        start_info: GuestAddress(START_INFO_ADDRESS),
    })
}

/// End of the RAM region that starts at 0 (the kernel and initramfs live
/// there).
fn low_ram_end(memory: &GuestMemory) -> u64 {
    memory
        .iter()
        .find(|region| region.start_addr().raw_value() == 0)
        .map_or(0, |region| region.len())
}

/// Places the initramfs at the top of low RAM, page aligned, and returns
/// its address and size.
fn load_initramfs(
    memory: &GuestMemory,
    path: &Path,
    kernel_end: u64,
    share_files: bool,
) -> Result<(GuestAddress, u64), BootError> {
    let read_error = |source| BootError::ReadInitramfs {
        path: path.display().to_string(),
        source,
    };
    let mut file = BootFile::open(path, share_files).map_err(read_error)?;
    let size = file.size;
    let ram_end = low_ram_end(memory);
    let too_large = BootError::InitramfsTooLarge {
        size,
        kernel_end,
        ram_end,
    };
    let address = ram_end.checked_sub(size).ok_or(too_large)? & !(PAGE_SIZE - 1);
    if address < kernel_end {
        return Err(BootError::InitramfsTooLarge {
            size,
            kernel_end,
            ram_end,
        });
    }
    let count = usize::try_from(size).map_err(|e| BootError::Memory(e.to_string()))?;
    memory
        .read_exact_volatile_from(GuestAddress(address), &mut file, count)
        .map_err(|e| BootError::Memory(e.to_string()))?;
    Ok((GuestAddress(address), size))
}

/// The kernel command line for a kernel shared copy on write: each text
/// page the guest patches becomes the VM's own copy. A guest with one CPU
/// would rewrite every LOCK prefix of its kernel for uniprocessor code
/// (2.1 MiB of runv's kernel, measured in the nested bed); it keeps them,
/// which costs an uncontended LOCK prefix nothing worth the memory.
pub const SHARED_KERNEL_PARAMS: &str = "noreplace-smp";

/// A boot file on its way into guest RAM. Where `share` allows it, its
/// whole pages at page-aligned file offsets are mapped privately (copy on
/// write) over guest RAM instead of copied: the guests of every VM read
/// the same page-cache pages of the kernel and initramfs until they write
/// one, and loading costs no copy. Other pages are read in, after one
/// madvise has faulted in the pages they land on (page by page, a fresh
/// memfd page costs a fault each: several times more, most under nested
/// virtualization).
struct BootFile {
    file: File,
    size: u64,
    share: bool,
}

impl BootFile {
    fn open(path: &Path, share: bool) -> io::Result<BootFile> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        Ok(BootFile { file, size, share })
    }

    /// Maps the whole pages of `len` bytes from the file's position at
    /// `dest`; returns how many bytes it mapped (0: none, copy instead).
    fn map_pages(&mut self, dest: usize, len: usize) -> io::Result<usize> {
        let page = PAGE_SIZE as usize;
        let position = self.file.stream_position()?;
        if !self.share || position % PAGE_SIZE != 0 || dest % page != 0 {
            return Ok(0);
        }
        let in_file = usize::try_from(self.size.saturating_sub(position)).unwrap_or(usize::MAX);
        let whole = len.min(in_file) & !(page - 1);
        if whole == 0 {
            return Ok(0);
        }
        let offset = libc::off_t::try_from(position).map_err(io::Error::other)?;
        // SAFETY: [dest, dest + whole) is guest RAM this process maps, not
        // yet seen by a vCPU or a device; the new mapping replaces those
        // pages with the file's, privately, and goes with the region's
        // own munmap. The file covers the whole range (no SIGBUS).
        let mapped = unsafe {
            libc::mmap(
                dest as *mut libc::c_void,
                whole,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                self.file.as_raw_fd(),
                offset,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.file.seek(SeekFrom::Current(whole as i64))?;
        Ok(whole)
    }
}

impl Read for BootFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Seek for BootFile {
    fn seek(&mut self, position: SeekFrom) -> io::Result<u64> {
        self.file.seek(position)
    }
}

impl ReadVolatile for BootFile {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        // GuestMemory's callers take one call's count as final: fill the
        // whole slice, as a regular file's read does.
        let start = buf.ptr_guard_mut().as_ptr() as usize;
        let mapped = self
            .map_pages(start, buf.len())
            .map_err(VolatileMemoryError::IOError)?;
        if mapped == buf.len() {
            return Ok(mapped);
        }
        let rest = buf.offset(mapped)?;
        let page = PAGE_SIZE as usize;
        let first = start + mapped;
        let aligned = first & !(page - 1);
        let end = (first + rest.len()).next_multiple_of(page);
        // SAFETY: the range is guest memory this process maps (guest RAM
        // regions are page aligned); populating it leaves its contents as
        // they are. A kernel without MADV_POPULATE_WRITE (before 5.14)
        // refuses it, and the read faults the pages in as before.
        unsafe {
            libc::madvise(
                aligned as *mut libc::c_void,
                end - aligned,
                libc::MADV_POPULATE_WRITE,
            )
        };
        let mut read = 0;
        while read < rest.len() {
            match self.file.read_volatile(&mut rest.offset(read)?)? {
                0 => break,
                n => read += n,
            }
        }
        Ok(mapped + read)
    }
}

fn write_cmdline(memory: &GuestMemory, text: &str) -> Result<(), BootError> {
    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline.insert_str(text).map_err(|e| {
        BootError::Cmdline(format!(
            "{e} ({} bytes, at most {CMDLINE_MAX_SIZE})",
            text.len()
        ))
    })?;
    load_cmdline(memory, GuestAddress(CMDLINE_ADDRESS), &cmdline)
        .map_err(|e| BootError::Memory(e.to_string()))
}

/// The guest's RAM as the PVH memory map lists it: low memory below the
/// BIOS area, then everything from 1 MiB on, then RAM above the MMIO gap.
fn memory_map(memory: &GuestMemory) -> Vec<hvm_memmap_table_entry> {
    let ram = |addr: u64, size: u64| hvm_memmap_table_entry {
        addr,
        size,
        type_: E820_RAM,
        reserved: 0,
    };
    let mut map = Vec::new();
    for region in memory.iter() {
        let start = region.start_addr().raw_value();
        let end = start + region.len();
        if start == 0 {
            map.push(ram(0, EBDA_START.min(end)));
            if end > HIGH_MEMORY_START {
                map.push(ram(HIGH_MEMORY_START, end - HIGH_MEMORY_START));
            }
        } else {
            map.push(ram(start, region.len()));
        }
    }
    map
}

fn write_start_info(
    memory: &GuestMemory,
    initramfs: Option<(GuestAddress, u64)>,
) -> Result<(), BootError> {
    let map = memory_map(memory);
    let modules: Vec<_> = initramfs
        .into_iter()
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr: paddr.raw_value(),
            size,
            ..Default::default()
        })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        nr_modules: modules.len() as u32,
        modlist_paddr: MODLIST_ADDRESS,
        cmdline_paddr: CMDLINE_ADDRESS,
        memmap_paddr: MEMMAP_ADDRESS,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(START_INFO_ADDRESS));
    params.set_sections(&map, GuestAddress(MEMMAP_ADDRESS));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(MODLIST_ADDRESS));
    }
    PvhBootConfigurator::write_bootparams(&params, memory)
        .map_err(|e| BootError::Memory(e.to_string()))
}

/// A GDT entry from its flags (access byte and granularity nibble), base
/// and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The KVM view of GDT entry `index`.
fn segment(index: usize, selector: u16) -> kvm_segment {
    let entry = GDT[index];
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let granularity = bit(55);
    kvm_segment {
        base,
        limit: if granularity == 1 {
            ((raw_limit as u32) << 12) | 0xfff
        } else {
            raw_limit as u32
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: granularity,
        avl: bit(52),
        unusable: 0,
        padding: 0,
    }
}

/// Puts vCPU 0 at the PVH entry: flat 32-bit protected mode, paging off,
/// EBX pointing at start_info. The other vCPUs keep their reset state.
pub fn set_up_boot_vcpu(
    vcpu: &Vcpu,
    memory: &GuestMemory,
    boot: BootEntry,
) -> Result<(), crate::VmmError> {
    if vcpu.id() != 0 {
        return Err(crate::VmmError::Device(format!(
            "the PVH entry state is for vCPU 0; vCPU {} waits for the guest to start it",
            vcpu.id()
        )));
    }
    let kvm_error = |what| move |source| crate::VmmError::Kvm { what, source };
    for (index, entry) in GDT.iter().enumerate() {
        memory
            .write_obj(*entry, GuestAddress(GDT_ADDRESS + 8 * index as u64))
            .map_err(|e| crate::VmmError::Memory(e.to_string()))?;
    }
    memory
        .write_obj(0u64, GuestAddress(IDT_ADDRESS))
        .map_err(|e| crate::VmmError::Memory(e.to_string()))?;

    let mut sregs = vcpu.fd().get_sregs().map_err(kvm_error("KVM_GET_SREGS"))?;
    sregs.gdt.base = GDT_ADDRESS;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = IDT_ADDRESS;
    sregs.idt.limit = 7;
    sregs.cs = segment(1, CODE_SELECTOR);
    let data = segment(2, DATA_SELECTOR);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(3, TSS_SELECTOR);
    sregs.cr0 = X86_CR0_PE;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.fd()
        .set_sregs(&sregs)
        .map_err(kvm_error("KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rip: boot.entry.raw_value(),
        rbx: boot.start_info.raw_value(),
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.fd()
        .set_regs(&regs)
        .map_err(kvm_error("KVM_SET_REGS"))?;
    // The FPU's power-on control words.
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.fd().set_fpu(&fpu).map_err(kvm_error("KVM_SET_FPU"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn gdt_segments_are_flat() {
        let code = segment(1, CODE_SELECTOR);
        assert_eq!((code.base, code.limit), (0, 0xffff_ffff));
        assert_eq!(
            (code.type_, code.s, code.db, code.g, code.present),
            (0xb, 1, 1, 1, 1)
        );
        assert_eq!(code.l, 0, "32-bit code, not 64-bit");
        let data = segment(2, DATA_SELECTOR);
        assert_eq!((data.type_, data.s), (0x3, 1));
        let tss = segment(3, TSS_SELECTOR);
        assert_eq!((tss.type_, tss.s), (0xb, 0));
    }

    #[test]
    fn memory_map_leaves_out_the_bios_area_and_the_mmio_gap() {
        let memory = create_guest_memory(64 << 20).unwrap();
        let map = memory_map(&memory);
        let spans: Vec<_> = map.iter().map(|e| (e.addr, e.size)).collect();
        assert_eq!(
            spans,
            vec![
                (0, EBDA_START),
                (HIGH_MEMORY_START, (64 << 20) - HIGH_MEMORY_START)
            ]
        );
    }

    #[test]
    fn the_largest_mp_table_is_not_ram() {
        let memory = create_guest_memory(64 << 20).unwrap();
        let table = mptable::ADDRESS..mptable::ADDRESS + mptable::size(mptable::MAX_VCPUS) as u64;
        for entry in memory_map(&memory) {
            let ram = entry.addr..entry.addr + entry.size;
            assert!(
                table.end <= ram.start || ram.end <= table.start,
                "RAM {ram:x?} overlaps the MP table {table:x?}"
            );
        }
    }

    #[test]
    fn shared_boot_files_read_alike_and_guest_writes_stay_private() {
        let dir = tempfile::tempdir().unwrap();
        let initramfs = dir.path().join("initrd");
        // Two whole pages (mapped when shared) and a partial one (read).
        let content: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&initramfs, &content).unwrap();
        for share in [true, false] {
            let memory = create_guest_memory(64 << 20).unwrap();
            let (address, size) = load_initramfs(&memory, &initramfs, 0x40_0000, share).unwrap();
            let mut seen = vec![0; size as usize];
            memory.read_slice(&mut seen, address).unwrap();
            assert!(seen == content, "share={share}: the guest sees other bytes");
            memory.write_slice(&[0; 8192], address).unwrap();
        }
        assert_eq!(
            std::fs::read(&initramfs).unwrap(),
            content,
            "a guest write reached the file"
        );
    }

    #[test]
    fn start_info_describes_initramfs_cmdline_and_memory() {
        let memory = create_guest_memory(64 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let initramfs = dir.path().join("initrd");
        std::fs::write(&initramfs, vec![0xab; 10_000]).unwrap();
        let (address, size) = load_initramfs(&memory, &initramfs, 0x40_0000, true).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(address.raw_value() % PAGE_SIZE, 0);
        assert!(address.raw_value() + size <= 64 << 20);
        assert_eq!(memory.read_obj::<u8>(address).unwrap(), 0xab);

        write_cmdline(&memory, "console=ttyS0 reboot=t").unwrap();
        write_start_info(&memory, Some((address, size))).unwrap();
        let info: hvm_start_info = memory.read_obj(GuestAddress(START_INFO_ADDRESS)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries, 2);
        let module: hvm_modlist_entry = memory.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (address.raw_value(), size));
        let mut cmdline = [0u8; 23];
        memory
            .read_slice(&mut cmdline, GuestAddress(info.cmdline_paddr))
            .unwrap();
        assert_eq!(&cmdline[..22], b"console=ttyS0 reboot=t");
        assert_eq!(cmdline[22], 0, "NUL-terminated");
    }

    #[test]
    fn oversized_initramfs_and_cmdline_are_refused() {
        let memory = create_guest_memory(4 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let initramfs = dir.path().join("initrd");
        std::fs::write(&initramfs, vec![0; 3 << 20]).unwrap();
        let err = load_initramfs(&memory, &initramfs, 0x20_0000, false).unwrap_err();
        assert!(err.to_string().contains("give the VM more memory"), "{err}");
        let err = write_cmdline(&memory, &"x".repeat(CMDLINE_MAX_SIZE + 1)).unwrap_err();
        assert!(err.to_string().contains("at most 2048"), "{err}");
    }

    #[test]
    fn a_file_that_is_not_an_elf_kernel_is_refused() {
        let memory = create_guest_memory(4 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("bzImage");
        std::fs::write(&kernel, b"MZ not an ELF").unwrap();
        let err = load(&memory, &kernel, Some(&kernel), "", true).unwrap_err();
        assert!(
            err.to_string().contains("uncompressed ELF vmlinux"),
            "{err}"
        );
    }
}
