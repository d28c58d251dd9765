//! A vCPU, its run loop and its thread: every exit to user space is
//! routed to the VM's buses until the guest resets (which ends every
//! vCPU's run), the vCPU fails, or its owner kicks it.

use std::{
    os::unix::thread::JoinHandleExt,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::{
    kick,
    seccomp::{self, ThreadKind},
    vm::Vm,
    VmmError,
};

/// Why a vCPU stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest reset itself (a triple fault, or the i8042 reset line):
    /// how a runv guest powers off.
    Reset,
    /// The guest halted with no in-kernel irqchip to wake it.
    Halted,
    /// Its owner stopped it with [`VcpuHandle::kick`].
    Kicked,
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
    #[error("vCPU {id}: {why}")]
    Kick { id: u64, why: String },
}

/// Shown with an emulation failure on a PVM host, where only PVM-enabled
/// guest kernels run.
const PVM_HINT: &str = "; on a host whose KVM is the PVM backend (kvm_pvm) only PVM-enabled guest \
                        kernels run: give runv one, or use hypervisor = \"qemu\"";

pub struct Vcpu {
    id: u64,
    fd: VcpuFd,
    /// Set by [`VcpuHandle::kick`].
    kicked: Arc<AtomicBool>,
}

impl Vcpu {
    pub(crate) fn new(id: u64, fd: VcpuFd) -> Vcpu {
        Vcpu {
            id,
            fd,
            kicked: Arc::default(),
        }
    }

    /// The vCPU's index, which is also its APIC ID.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The KVM vCPU, for register and CPUID setup.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Runs the guest until it resets, the vCPU fails or is kicked,
    /// routing I/O to `vm`'s buses. A reset seen here (a triple fault) ends
    /// the other vCPUs' runs too. A vCPU that fails leaves the others
    /// running: its owner decides, and usually kicks them all.
    pub fn run(&mut self, vm: &Vm) -> Result<VcpuStop, VcpuError> {
        let run: *mut kvm_bindings::kvm_run = self.fd.get_kvm_run();
        let _running = vm
            .control()
            .vcpu_threads()
            .enter(run)
            .map_err(|why| VcpuError::Kick { id: self.id, why })?;
        let stop = self.run_until_stopped(vm);
        if matches!(stop, Ok(VcpuStop::Reset)) {
            vm.control().request_reset();
        }
        stop
    }

    fn run_until_stopped(&mut self, vm: &Vm) -> Result<VcpuStop, VcpuError> {
        let id = self.id;
        loop {
            // Checked before every entry: a kick that lands between these
            // checks and KVM_RUN makes KVM_RUN return at once.
            if vm.control().reset_requested() {
                return Ok(VcpuStop::Reset);
            }
            if self.kicked.load(Ordering::SeqCst) {
                return Ok(VcpuStop::Kicked);
            }
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
                // A kick: the loop's checks say whether to stop.
                Err(e) if e.errno() == libc::EINTR => self.fd.set_kvm_immediate_exit(0),
                Err(e) if e.errno() == libc::EAGAIN => {}
                Err(source) => return Err(VcpuError::Run { id, source }),
            }
        }
    }
}

/// A vCPU on its own thread.
pub struct VcpuHandle {
    thread: JoinHandle<()>,
    kicked: Arc<AtomicBool>,
}

impl VcpuHandle {
    /// Starts a thread named `name` that hands `vcpu` to `body`, which
    /// runs it (and reports how the run ended).
    pub fn spawn(
        name: String,
        mut vcpu: Vcpu,
        body: impl FnOnce(&mut Vcpu) + Send + 'static,
    ) -> Result<VcpuHandle, VmmError> {
        // Before the thread exists: a kick must never meet the signal's
        // default action, which ends the process.
        kick::install_handler().map_err(VmmError::Device)?;
        let kicked = vcpu.kicked.clone();
        // Confined before the first KVM_RUN.
        let thread =
            seccomp::spawn_confined(&name, ThreadKind::Vcpu, || Ok(()), move || body(&mut vcpu))?;
        Ok(VcpuHandle { thread, kicked })
    }

    /// Ends the vCPU's run with [`VcpuStop::Kicked`], wherever the vCPU
    /// is: in guest code, halted, or waiting for the guest to start it.
    pub fn kick(&self) {
        self.kicked.store(true, Ordering::SeqCst);
        // The thread's ID stays valid until it is joined, which takes self.
        kick::signal(self.thread.as_pthread_t());
    }

    /// Waits for the thread to end.
    pub fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}
