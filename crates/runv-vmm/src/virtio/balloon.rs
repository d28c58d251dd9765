//! virtio-balloon for free page reporting only (VIRTIO_BALLOON_F_REPORTING):
//! the guest kernel hands back runs of pages it freed, and the device
//! returns their host memory at once, so that memory the guest touched
//! once (the unpacked initramfs, boot-time allocations, a container's
//! exited processes) stops costing the host.
//!
//! The host never asks for memory: the balloon's target stays 0, so a
//! driver that follows the spec never uses the inflate and deflate queues;
//! their buffers are returned untouched all the same.
//!
//! A reported range is the guest's own RAM (checked against its memory
//! map); dropping it can only cost the guest the contents of pages it
//! said are free. Shared memfd pages are punched out (MADV_REMOVE); pages
//! of a boot file mapped privately over RAM (boot.rs) go back to the
//! file's (MADV_DONTNEED): free pages' contents are undefined either way.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::{
    memory::GuestMemory,
    virtio::{
        notify_used,
        queue_device::{QueueDevice, QueueHandler},
        Interrupt,
    },
    VmmError,
};

/// What the guest kernel needs told: report free blocks of 128 KiB and
/// up. At its default order (2 MiB) Linux reports only while a zone has
/// 64 MiB free above its low watermark (32 blocks of the order), which a
/// pod VM of a few hundred MiB seldom has: it would never report.
pub const KERNEL_PARAMS: &str = "page_reporting.page_reporting_order=5";

/// The virtio device ID of a memory balloon.
pub const DEVICE_TYPE: u32 = 5;
/// The device returns free pages the driver reports on the reporting queue.
const VIRTIO_BALLOON_F_REPORTING: u64 = 5;
/// inflate, deflate, reporting: the reporting queue follows the two
/// others when neither stats nor free page hinting is offered. Linux
/// reports at most 32 ranges at a time and wants a queue that holds them.
const QUEUE_SIZES: &[u16] = &[32, 32, 32];
const REPORTING_QUEUE: usize = 2;
/// num_pages (the target, 0) and actual, little endian.
const CONFIG: [u8; 8] = [0; 8];
const PAGE_SIZE: u64 = 4096;

/// The driver's queues while the device runs.
struct Active {
    memory: GuestMemory,
    queues: Vec<Queue>,
    interrupt: Interrupt,
}

/// A balloon that only takes free page reports.
#[derive(Default)]
pub struct Balloon {
    active: Option<Active>,
    /// Bytes of guest RAM given back to the host so far.
    returned: u64,
}

impl Balloon {
    pub fn new() -> Result<Arc<Mutex<QueueDevice<Balloon>>>, VmmError> {
        QueueDevice::shared(Balloon::default())
    }
}

impl QueueHandler for Balloon {
    const DEVICE_TYPE: u32 = DEVICE_TYPE;
    const QUEUE_MAX_SIZES: &'static [u16] = QUEUE_SIZES;

    fn features(&self) -> u64 {
        1 << VIRTIO_BALLOON_F_REPORTING
    }

    fn config_space(&self) -> &[u8] {
        &CONFIG
    }

    fn activate(
        &mut self,
        memory: GuestMemory,
        queues: Vec<Queue>,
        _features: u64,
        interrupt: Interrupt,
    ) -> Result<(), String> {
        if self.active.is_some() {
            return Err("virtio-balloon is already active".into());
        }
        self.active = Some(Active {
            memory,
            queues,
            interrupt,
        });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(queue) = active.queues.get_mut(index) else {
            return;
        };
        let mut returned_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(&active.memory) {
            let head = chain.head_index();
            if index == REPORTING_QUEUE {
                for descriptor in chain {
                    let (addr, len) = (descriptor.addr(), u64::from(descriptor.len()));
                    match discard(&active.memory, addr, len) {
                        Ok(()) => self.returned += len,
                        Err(why) => {
                            tracing::debug!(addr = addr.0, len, why, "free page report not taken")
                        }
                    }
                }
            }
            if let Err(e) = queue.add_used(&active.memory, head, 0) {
                tracing::warn!(error = %e, "cannot return a balloon buffer");
            }
            returned_any = true;
        }
        if returned_any {
            tracing::trace!(returned = self.returned, "free pages returned to the host");
            notify_used(queue, &active.memory, &active.interrupt);
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

/// Gives the host memory behind the whole pages of guest RAM
/// `[addr, addr + len)` back.
fn discard(memory: &GuestMemory, addr: GuestAddress, len: u64) -> Result<(), String> {
    let start = addr.0.next_multiple_of(PAGE_SIZE);
    let end = addr.0.checked_add(len).ok_or("the range wraps")? & !(PAGE_SIZE - 1);
    if end <= start {
        return Ok(());
    }
    let len = usize::try_from(end - start).map_err(|e| e.to_string())?;
    // One region holds the whole range, or it is not all RAM.
    let slice = memory
        .get_slice(GuestAddress(start), len)
        .map_err(|e| format!("not guest RAM: {e}"))?;
    let host = slice.ptr_guard_mut().as_ptr().cast::<libc::c_void>();
    // SAFETY: [host, host + len) is page-aligned guest RAM this process
    // maps; the guest said it holds nothing, and the next access reads
    // zeros (memfd) or the boot file's bytes (a private file mapping).
    let removed = unsafe { libc::madvise(host, len, libc::MADV_REMOVE) };
    if removed == 0 {
        return Ok(());
    }
    // SAFETY: as above.
    match unsafe { libc::madvise(host, len, libc::MADV_DONTNEED) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;
    use crate::memory::create_guest_memory;

    /// Resident pages of the mapping that holds `addr`, from /proc/self/smaps.
    fn resident_kib(memory: &GuestMemory, addr: GuestAddress) -> u64 {
        let host = memory.get_host_address(addr).unwrap() as u64;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((start, end)) = range.split_once('-') {
                    if let (Ok(start), Ok(end)) =
                        (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
                    {
                        inside = (start..end).contains(&host);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(rss) = line.strip_prefix("Rss:") {
                    return rss.trim().trim_end_matches(" kB").parse().unwrap();
                }
            }
        }
        panic!("no mapping holds guest address {addr:?}");
    }

    #[test]
    fn reported_pages_leave_the_host_and_read_as_zero() {
        let memory = create_guest_memory(16 << 20).unwrap();
        let at = GuestAddress(4 << 20);
        memory.write_slice(&[0xaa; 2 << 20], at).unwrap();
        let before = resident_kib(&memory, at);
        assert!(before >= 2048, "{before} KiB resident after writing 2 MiB");
        // A range that starts and ends inside pages: only whole pages go.
        discard(&memory, GuestAddress(at.0 - 100), (2 << 20) + 200).unwrap();
        let after = resident_kib(&memory, at);
        assert!(before - after >= 2044, "{before} KiB -> {after} KiB");
        let mut back = [0xffu8; 4096];
        memory.read_slice(&mut back, at).unwrap();
        assert_eq!(back, [0; 4096]);
    }

    #[test]
    fn ranges_outside_guest_ram_are_refused() {
        let memory = create_guest_memory(16 << 20).unwrap();
        assert!(discard(&memory, GuestAddress(15 << 20), 2 << 20).is_err());
        assert!(discard(&memory, GuestAddress(u64::MAX - 4095), 8192).is_err());
        // Less than a page: nothing to do.
        assert!(discard(&memory, GuestAddress(100), 200).is_ok());
    }
}
