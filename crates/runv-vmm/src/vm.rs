//! The KVM VM: in-kernel irqchip and PIT, guest RAM, and the buses that
//! vCPU exits are routed through.

use std::{
    collections::BTreeSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use kvm_bindings::{
    kvm_msr_entry, kvm_pit_config, kvm_userspace_memory_region, Msrs, KVM_MEM_READONLY,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion};

use crate::{
    bus::Bus, irq_routing::IrqRouting, kick::VcpuThreads, kvm, memory::GuestMemory, vcpu::Vcpu,
    VmmError,
};

/// Three pages below the BIOS area that Intel's VMX needs for its TSS on
/// older hosts; kept out of guest RAM by the memory layout's gap.
const TSS_ADDRESS: usize = 0xfffb_d000;

/// What devices and vCPUs may ask of the whole VM.
#[derive(Debug, Default)]
pub struct VmControl {
    reset: AtomicBool,
    vcpu_threads: VcpuThreads,
}

impl VmControl {
    /// The guest asked for a reset; runv ends the VM on it: every vCPU's
    /// run ends, wherever the vCPU is.
    pub fn request_reset(&self) {
        self.reset.store(true, Ordering::SeqCst);
        self.vcpu_threads.kick_all();
    }

    pub fn reset_requested(&self) -> bool {
        self.reset.load(Ordering::SeqCst)
    }

    pub(crate) fn vcpu_threads(&self) -> &VcpuThreads {
        &self.vcpu_threads
    }
}

/// A KVM VM with its RAM and buses.
pub struct Vm {
    supported_cpuid: kvm_bindings::CpuId,
    fd: Arc<VmFd>,
    memory: GuestMemory,
    irq_routing: Arc<IrqRouting>,
    device_memory: Arc<DeviceMemory>,
    /// Port I/O devices.
    pub pio: Bus,
    /// Memory-mapped devices.
    pub mmio: Bus,
    control: Arc<VmControl>,
}

impl Vm {
    /// Creates the VM and hands it `memory` as its RAM.
    pub fn new(memory: GuestMemory) -> Result<Vm, VmmError> {
        let host = Kvm::new().map_err(VmmError::OpenKvm)?;
        let supported_cpuid = host
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let fd = host.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(kvm("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
        // The PIT's speaker port is not emulated: writes to it are dropped
        // in the kernel instead of exiting to us.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm("KVM_CREATE_PIT2"))?;
        for (slot, region) in memory.iter().enumerate() {
            let host_address = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| VmmError::Memory(e.to_string()))?;
            let kvm_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host_address as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `memory`, which
            // the VM keeps for as long as the VM fd lives.
            unsafe { fd.set_user_memory_region(kvm_region) }
                .map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }
        let fd = Arc::new(fd);
        Ok(Vm {
            supported_cpuid,
            irq_routing: Arc::new(IrqRouting::new(fd.clone())),
            device_memory: Arc::new(DeviceMemory {
                fd: fd.clone(),
                first_slot: memory.num_regions() as u32,
                used: Mutex::default(),
            }),
            fd,
            memory,
            pio: Bus::default(),
            mmio: Bus::default(),
            control: Arc::default(),
        })
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The VM's file descriptor, for devices that register irqfds.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    /// GSI routes and irqfds for MSI-X vectors.
    pub fn irq_routing(&self) -> &Arc<IrqRouting> {
        &self.irq_routing
    }

    /// Maps `len` bytes of host memory at `host_address` (a device's
    /// mmap-ed BAR, a pmem device's file) into the guest at
    /// `guest_address`, in a KVM memory slot of its own, which it returns.
    ///
    /// # Safety
    /// The mapping must stay valid until [`Vm::unmap_device_memory`] or
    /// the VM's end.
    pub unsafe fn map_device_memory(
        &self,
        guest_address: u64,
        len: u64,
        host_address: *mut u8,
        access: GuestAccess,
    ) -> Result<u32, VmmError> {
        // SAFETY: the caller's promise is the one `map` asks for.
        unsafe {
            self.device_memory
                .map(guest_address, len, host_address, access)
        }
    }

    /// Takes the slot of [`Vm::map_device_memory`] out of the guest.
    pub fn unmap_device_memory(&self, slot: u32) -> Result<(), VmmError> {
        self.device_memory.unmap(slot)
    }

    /// The device-memory slots, for a device that unmaps its memory when
    /// it is dropped (which may be after the `Vm` itself).
    pub fn device_memory(&self) -> &Arc<DeviceMemory> {
        &self.device_memory
    }

    /// Creates vCPU `id` of `count`, with its CPUID and MSRs set. With the in-kernel
    /// irqchip KVM holds every vCPU but 0 until the guest starts it
    /// through its local APIC (INIT, then SIPI), so each can be handed to
    /// its thread's `Vcpu::run` at once.
    pub fn create_vcpu(&self, id: u8, count: u8) -> Result<Vcpu, VmmError> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(kvm("KVM_CREATE_VCPU"))?;
        let mut cpuid = self.supported_cpuid.clone();
        crate::cpuid::adjust_for_vcpu(&mut cpuid, id, count);
        fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        set_boot_msrs(&fd)?;
        Ok(Vcpu::new(u64::from(id), fd))
    }
}

/// What the guest may do with device memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestAccess {
    ReadWrite,
    /// Guest writes never reach the memory: KVM turns them into MMIO exits,
    /// which no device claims.
    ReadOnly,
}

/// Device memory in the guest (a passed-through function's BARs, a pmem
/// device's file): KVM memory slots numbered after RAM's, which take
/// slots 0..n.
pub struct DeviceMemory {
    fd: Arc<VmFd>,
    first_slot: u32,
    used: Mutex<BTreeSet<u32>>,
}

impl DeviceMemory {
    /// See [`Vm::map_device_memory`].
    ///
    /// # Safety
    /// The mapping must stay valid until [`DeviceMemory::unmap`] or the
    /// VM's end.
    pub unsafe fn map(
        &self,
        guest_address: u64,
        len: u64,
        host_address: *mut u8,
        access: GuestAccess,
    ) -> Result<u32, VmmError> {
        let mut used = self.used.lock().expect("device slots lock");
        // The lowest free slot: KVM bounds the slot numbers, not their count.
        let slot = (self.first_slot..)
            .find(|slot| !used.contains(slot))
            .expect("a free slot number");
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: guest_address,
            memory_size: len,
            userspace_addr: host_address as u64,
            flags: match access {
                GuestAccess::ReadWrite => 0,
                GuestAccess::ReadOnly => KVM_MEM_READONLY,
            },
        };
        // SAFETY: the caller keeps the mapping valid while the slot lives.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(kvm("KVM_SET_USER_MEMORY_REGION (device memory)"))?;
        used.insert(slot);
        Ok(slot)
    }

    /// See [`Vm::unmap_device_memory`].
    pub fn unmap(&self, slot: u32) -> Result<(), VmmError> {
        let mut used = self.used.lock().expect("device slots lock");
        if !used.contains(&slot) {
            return Err(VmmError::Device(format!(
                "KVM memory slot {slot} holds no device memory"
            )));
        }
        // A slot of size 0 is KVM's way to delete it.
        let region = kvm_userspace_memory_region {
            slot,
            ..Default::default()
        };
        // SAFETY: deleting a slot maps nothing.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(kvm("KVM_SET_USER_MEMORY_REGION (deleting device memory)"))?;
        used.remove(&slot);
        Ok(())
    }
}

/// IA32_MISC_ENABLE, whose bit 0 enables fast string operations.
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// The MSRs firmware would have set: fast strings on, as on real hardware.
/// Without it Linux on Intel turns off its `rep movs`/`rep stos` paths
/// (REP_GOOD, ERMS), and every memcpy in the guest is slower. The rest
/// (syscall entry, TSC) the guest kernel programs itself.
fn set_boot_msrs(vcpu: &VcpuFd) -> Result<(), VmmError> {
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_MISC_ENABLE,
        data: MISC_ENABLE_FAST_STRING,
        ..Default::default()
    }])
    .map_err(|e| VmmError::Device(format!("building the MSR list: {e:?}")))?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if written != msrs.as_slice().len() {
        return Err(VmmError::Device(format!(
            "KVM set {written} of {} boot MSRs",
            msrs.as_slice().len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn every_vcpu_starts_with_fast_strings_on() {
        if !crate::testing::kvm_usable() {
            return;
        }
        let vm = Vm::new(create_guest_memory(1 << 20).unwrap()).unwrap();
        for id in 0..2 {
            let vcpu = vm.create_vcpu(id, 2).unwrap();
            let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
                index: MSR_IA32_MISC_ENABLE,
                ..Default::default()
            }])
            .unwrap();
            assert_eq!(vcpu.fd().get_msrs(&mut msrs).unwrap(), 1);
            let misc_enable = msrs.as_slice()[0].data;
            assert_eq!(
                misc_enable & MISC_ENABLE_FAST_STRING,
                MISC_ENABLE_FAST_STRING,
                "vCPU {id}: IA32_MISC_ENABLE = {misc_enable:#x}"
            );
        }
    }

    /// An anonymous mapping of `len` bytes, standing in for a BAR.
    fn anonymous(len: usize) -> *mut u8 {
        // SAFETY: a fresh anonymous mapping, checked below.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(address, libc::MAP_FAILED);
        address.cast()
    }

    #[test]
    fn device_memory_takes_slots_after_ram_and_gives_them_back() {
        if !crate::testing::kvm_usable() {
            return;
        }
        let vm = Vm::new(create_guest_memory(1 << 20).unwrap()).unwrap();
        let (a, b) = (anonymous(0x4000), anonymous(0x1000));
        // SAFETY: both mappings live until the end of the test, after the
        // slots are gone.
        let first = unsafe { vm.map_device_memory(0xe000_0000, 0x4000, a, GuestAccess::ReadWrite) }
            .unwrap();
        let second =
            unsafe { vm.map_device_memory(0xe000_4000, 0x1000, b, GuestAccess::ReadOnly) }.unwrap();
        assert_eq!(first, vm.memory().num_regions() as u32);
        assert_ne!(first, second);
        vm.unmap_device_memory(first).unwrap();
        assert!(vm.unmap_device_memory(first).is_err());
        // The freed slot is taken again.
        let again = unsafe { vm.map_device_memory(0xe000_0000, 0x4000, a, GuestAccess::ReadWrite) }
            .unwrap();
        assert_eq!(again, first);
        vm.unmap_device_memory(again).unwrap();
        vm.unmap_device_memory(second).unwrap();
        // SAFETY: the mappings are ours and no slot refers to them now.
        unsafe {
            libc::munmap(a.cast(), 0x4000);
            libc::munmap(b.cast(), 0x1000);
        }
    }
}
