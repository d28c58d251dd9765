//! A vCPU and its run loop: every exit to user space is routed to the
//! VM's buses until the guest resets or fails.

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::vm::Vm;

/// Why a vCPU stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest reset itself (a triple fault, or the i8042 reset line):
    /// how a runv guest powers off.
    Reset,
    /// The guest halted with no in-kernel irqchip to wake it.
    Halted,
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {id}: KVM_RUN failed: {source}")]
    Run { id: u64, source: kvm_ioctls::Error },
    #[error(
        "vCPU {id}: KVM could not emulate the guest instruction at {rip:#x} \
         (KVM_EXIT_INTERNAL_ERROR){hint}"
    )]
    Emulation {
        id: u64,
        rip: u64,
        hint: &'static str,
    },
    #[error("vCPU {id}: entry failed, hardware reason {reason:#x}")]
    FailEntry { id: u64, reason: u64 },
    #[error("vCPU {id}: unexpected exit {exit}")]
    Unexpected { id: u64, exit: String },
}

/// Shown with an emulation failure on a PVM host, where only PVM-enabled
/// guest kernels run.
const PVM_HINT: &str = "; on a host whose KVM is the PVM backend (kvm_pvm) only PVM-enabled guest \
                        kernels run: give runv one, or use hypervisor = \"qemu\"";

pub struct Vcpu {
    id: u64,
    fd: VcpuFd,
}

impl Vcpu {
    pub(crate) fn new(id: u64, fd: VcpuFd) -> Vcpu {
        Vcpu { id, fd }
    }

    /// The KVM vCPU, for register and CPUID setup.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Runs the guest until it resets or fails, routing I/O to `vm`'s buses.
    pub fn run(&mut self, vm: &Vm) -> Result<VcpuStop, VcpuError> {
        let id = self.id;
        loop {
            match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    if !vm.pio.write(u64::from(port), data) {
                        tracing::trace!(id, port, ?data, "write to an unclaimed port");
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    vm.pio.read(u64::from(port), data);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !vm.mmio.read(addr, data) {
                        tracing::debug!(id, addr, "read of unclaimed MMIO");
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !vm.mmio.write(addr, data) {
                        tracing::debug!(id, addr, "write to unclaimed MMIO");
                    }
                }
                Ok(VcpuExit::Shutdown) => return Ok(VcpuStop::Reset),
                Ok(VcpuExit::Hlt) => return Ok(VcpuStop::Halted),
                Ok(VcpuExit::SystemEvent(..)) => return Ok(VcpuStop::Reset),
                Ok(VcpuExit::InternalError) => {
                    let hint = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
                        PVM_HINT
                    } else {
                        ""
                    };
                    let rip = self.fd.get_regs().map_or(0, |regs| regs.rip);
                    return Err(VcpuError::Emulation { id, rip, hint });
                }
                Ok(VcpuExit::FailEntry(reason, _)) => {
                    return Err(VcpuError::FailEntry { id, reason })
                }
                Ok(exit) => {
                    return Err(VcpuError::Unexpected {
                        id,
                        exit: format!("{exit:?}"),
                    })
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(source) => return Err(VcpuError::Run { id, source }),
            }
            if vm.control().reset_requested() {
                return Ok(VcpuStop::Reset);
            }
        }
    }
}
