//! runv's in-process VMM: a KVM microVM held inside the shim process, on
//! rust-vmm crates. It knows about memory, vCPUs, buses and devices, and
//! nothing about containers.

pub mod boot;
pub mod bus;
pub mod cpuid;
pub mod device_manager;
pub mod devices;
pub mod event_loop;
pub mod irq_routing;
mod kick;
mod machine;
pub mod memory;
pub mod mptable;
pub mod pci;
pub mod seccomp;
#[cfg(feature = "testing")]
pub mod testing;
pub mod vcpu;
pub mod vfio;
pub mod virtio;
pub mod vm;

pub use bus::{Bus, BusDevice};
pub use machine::{
    GuestRoot, MicroVm, MicroVmConfig, OnEnd, VmEnd, VsockConfig, THREAD_NAME_PREFIX,
};
pub use vcpu::{Vcpu, VcpuStop};
pub use vfio::VfioConfig;
pub use virtio::{block::BlockConfig, fs::FsConfig, net::NetConfig};
pub use vm::{Vm, VmControl};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot open /dev/kvm: {0}; the builtin hypervisor needs KVM (use hypervisor = \"qemu\" on hosts without it)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM {what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("{0}")]
    Device(String),
    #[error("device {name} at {base:#x}+{len:#x} overlaps another device")]
    BusOverlap {
        name: &'static str,
        base: u64,
        len: u64,
    },
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("all {slots} virtio-mmio slots declared at boot are in use: unplug a device first")]
    NoFreeSlot { slots: usize },
    #[error("virtio-mmio slot {0} holds no device")]
    SlotNotInUse(device_manager::SlotIndex),
}

/// Wraps a KVM error with what was being done.
pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}
