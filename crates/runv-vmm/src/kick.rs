//! Getting vCPU threads out of KVM_RUN when the VM must stop: a real-time
//! signal sent to each vCPU thread, whose handler sets that thread's
//! `immediate_exit`. KVM_RUN returns EINTR when the signal lands while the
//! vCPU runs or sleeps in the kernel (a halted vCPU, an AP waiting for its
//! SIPI) and, through `immediate_exit`, also when it lands just before the
//! thread enters KVM_RUN, so no kick is lost.

use std::{
    cell::Cell,
    sync::{Mutex, OnceLock},
};

use kvm_bindings::kvm_run;
use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    /// The `kvm_run` of the vCPU this thread is running, while it runs one.
    static RUNNING: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

pub(crate) fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_signal: c_int, _info: *mut siginfo_t, _context: *mut c_void) {
    // A const-initialized thread local without destructor: reading it
    // allocates nothing and takes no lock, so it is signal safe.
    let run = RUNNING.with(Cell::get);
    if !run.is_null() {
        // SAFETY: RUNNING holds the kvm_run mapping of the vCPU this very
        // thread is running; `Running` clears it before the vCPU can be
        // dropped, and a byte store cannot tear.
        unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
    }
}

/// Installs the kick handler for the whole process, once. Until it is
/// installed, the kick signal would end the process.
pub(crate) fn install_handler() -> Result<(), String> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            register_signal_handler(kick_signal(), on_kick)
                .map_err(|e| format!("installing the vCPU kick signal handler: {e}"))
        })
        .clone()
}

/// The threads running one VM's vCPUs.
#[derive(Debug, Default)]
pub(crate) struct VcpuThreads {
    threads: Mutex<Vec<libc::pthread_t>>,
}

impl VcpuThreads {
    /// Records the calling thread as running the vCPU whose `kvm_run` is
    /// `run`, until the returned guard drops.
    pub(crate) fn enter(&self, run: *mut kvm_run) -> Result<Running<'_>, String> {
        install_handler()?;
        RUNNING.with(|running| running.set(run));
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        self.threads.lock().expect("vCPU threads lock").push(thread);
        Ok(Running {
            threads: self,
            thread,
        })
    }

    /// Sends every running vCPU thread out of KVM_RUN.
    pub(crate) fn kick_all(&self) {
        // The lock keeps each thread from leaving (and ending) while it
        // is signalled: it removes itself under this lock.
        for &thread in self.threads.lock().expect("vCPU threads lock").iter() {
            signal(thread);
        }
    }
}

/// Sends `thread` out of KVM_RUN, if it is in it or about to enter it.
/// `thread` must not have been joined; the kick handler must be installed.
pub(crate) fn signal(thread: libc::pthread_t) {
    // SAFETY: callers pass the ID of a thread that was not joined, so the
    // ID is valid, and the handler is installed, so the signal cannot end
    // the process.
    let error = unsafe { libc::pthread_kill(thread, kick_signal()) };
    if error != 0 {
        tracing::warn!(error, "cannot kick a vCPU thread");
    }
}

/// A thread running a vCPU; dropping it ends that.
pub(crate) struct Running<'a> {
    threads: &'a VcpuThreads,
    thread: libc::pthread_t,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut threads = self.threads.threads.lock().expect("vCPU threads lock");
        // SAFETY: pthread_equal only compares the two identifiers.
        threads.retain(|&other| unsafe { libc::pthread_equal(other, self.thread) } == 0);
        RUNNING.with(|running| running.set(std::ptr::null_mut()));
    }
}
