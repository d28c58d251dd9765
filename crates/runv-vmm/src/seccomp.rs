//! Seccomp filters for the VMM's threads, one allow-list per kind of
//! thread, as Firecracker does: each thread installs its own filter before
//! it runs guest code or serves a guest-driven event, so that a guest that
//! takes over a VMM thread can make only the system calls that thread's
//! work needs. Filters are per thread: the rest of the owner's process (the
//! shim) is not filtered.
//!
//! A call outside the list kills the whole process (SECCOMP_RET_KILL_PROCESS):
//! the kernel logs it as an audit record of type 1326 (`SECCOMP`) that
//! names the syscall number (`syscall=N`), in `dmesg` or the audit log. The
//! `seccomp-log` feature turns the kill into that log entry alone, to find
//! a missing call while debugging; never ship it.
//!
//! Every filter also refuses memory that is executable (`mmap` and
//! `mprotect` with PROT_EXEC): no VMM thread loads code.

use std::{
    collections::BTreeMap,
    sync::{mpsc, OnceLock},
    thread::JoinHandle,
};

use kvm_bindings::{kvm_irq_routing, kvm_irqfd, kvm_regs, kvm_userspace_memory_region};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr};

use crate::{
    virtio::block::{BLKDISCARD, BLKZEROOUT},
    VmmError,
};

const KVMIO: u32 = 0xae;
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);
ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
// VFIO_BASE + 10, in VFIO's ';' ioctl space.
ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, 0x3b, 110);

/// The kinds of VMM thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs one vCPU: KVM_RUN and the devices the guest reaches by MMIO
    /// and port I/O (console, virtio transports, PCI config, VFIO BARs).
    Vcpu,
    /// The VM's event loop: vsock, block and net device I/O.
    EventLoop,
    /// A virtio-fs device's own loop: the passthrough file system, in a
    /// file system root that is the share.
    FsWorker,
    /// Waits for the VM to end, then kicks and joins the other threads.
    Supervisor,
}

/// Starts a thread called `name` that runs `setup`, installs `kind`'s
/// filter and only then runs `body`. Returns once the filter is in place,
/// or with the reason it could not be (`body` is then dropped unrun).
pub(crate) fn spawn_confined(
    name: &str,
    kind: ThreadKind,
    setup: impl FnOnce() -> Result<(), String> + Send + 'static,
    body: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, VmmError> {
    let (ready, confined) = mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let result = setup().and_then(|()| install(kind));
            let go = result.is_ok();
            let _ = ready.send(result);
            if go {
                body();
            }
        })
        .map_err(|e| VmmError::Device(format!("cannot start the thread {name}: {e}")))?;
    let result = confined
        .recv()
        .unwrap_or_else(|_| Err("it ended before it was confined".into()));
    match result {
        Ok(()) => Ok(thread),
        Err(why) => {
            // The thread ends without running `body`.
            let _ = thread.join();
            Err(VmmError::Device(format!("thread {name}: {why}")))
        }
    }
}

/// Installs `kind`'s filter on the calling thread; it cannot be lifted.
pub fn install(kind: ThreadKind) -> Result<(), String> {
    let program = filters()[kind as usize]
        .as_ref()
        .map_err(|e| format!("building the {kind:?} seccomp filter: {e}"))?;
    for filter in program {
        seccompiler::apply_filter(filter)
            .map_err(|e| format!("installing the {kind:?} seccomp filter: {e}"))?;
    }
    Ok(())
}

/// Each kind's programs, built once: (for the fs worker) the calls refused
/// with EPERM among those allowed, then its allow-list.
fn filters() -> &'static [Result<Vec<BpfProgram>, String>; 4] {
    static FILTERS: OnceLock<[Result<Vec<BpfProgram>, String>; 4]> = OnceLock::new();
    FILTERS.get_or_init(|| {
        [
            ThreadKind::Vcpu,
            ThreadKind::EventLoop,
            ThreadKind::FsWorker,
            ThreadKind::Supervisor,
        ]
        .map(|kind| {
            // The allow-list last: once it is in, installing another filter
            // (prctl, seccomp) is refused. The kernel applies the strictest
            // answer of all a thread's filters, whatever their order.
            let mut programs = Vec::new();
            if kind == ThreadKind::FsWorker {
                programs.push(compile(
                    refused_fs_modes()?,
                    SeccompAction::Allow,
                    SeccompAction::Errno(libc::EPERM as u32),
                )?);
            }
            programs.push(compile(allowed(kind)?, violation(), SeccompAction::Allow)?);
            Ok(programs)
        })
    })
}

fn violation() -> SeccompAction {
    if cfg!(feature = "seccomp-log") {
        SeccompAction::Log
    } else {
        SeccompAction::KillProcess
    }
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn compile(
    rules: Rules,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, String> {
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
        .map_err(|e| e.to_string())?;
    BpfProgram::try_from(filter).map_err(|e| e.to_string())
}

/// `arg`'s low 32 bits, compared with `op` to `value`.
fn arg(index: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value).map_err(|e| e.to_string())
}

/// One rule per value: the call is allowed when argument `index` is one of
/// `values`.
fn any_of(index: u8, values: &[u64]) -> Result<Vec<SeccompRule>, String> {
    values
        .iter()
        .map(|&value| {
            SeccompRule::new(vec![arg(index, SeccompCmpOp::Eq, value)?]).map_err(|e| e.to_string())
        })
        .collect()
}

/// Allowed when argument `index` has none of the bits of `mask`.
fn without_bits(index: u8, mask: u64) -> Result<Vec<SeccompRule>, String> {
    let rule = SeccompRule::new(vec![arg(index, SeccompCmpOp::MaskedEq(mask), 0)?]);
    Ok(vec![rule.map_err(|e| e.to_string())?])
}

/// What every VMM thread does: allocate, lock, log to stderr, take a
/// signal, end.
fn common() -> Result<Rules, String> {
    let mut rules: Rules = [
        libc::SYS_brk,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_close,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_fcntl,
        libc::SYS_futex,
        libc::SYS_getpid,
        libc::SYS_getrandom,
        libc::SYS_gettid,
        libc::SYS_madvise,
        libc::SYS_mremap,
        libc::SYS_munmap,
        libc::SYS_nanosleep,
        libc::SYS_restart_syscall,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sched_yield,
        libc::SYS_sigaltstack,
        libc::SYS_write,
        libc::SYS_writev,
    ]
    .into_iter()
    .map(|call| (call, Vec::new()))
    .collect();
    let no_exec = libc::PROT_EXEC as u64;
    rules.insert(libc::SYS_mmap, without_bits(2, no_exec)?);
    rules.insert(libc::SYS_mprotect, without_bits(2, no_exec)?);
    // A panic that cannot unwind aborts.
    rules.insert(libc::SYS_tgkill, any_of(2, &[libc::SIGABRT as u64])?);
    Ok(rules)
}

fn allow(rules: &mut Rules, calls: &[i64]) {
    for &call in calls {
        rules.insert(call, Vec::new());
    }
}

/// tgkill with the kick that gets a vCPU out of KVM_RUN, or an abort.
fn kicks() -> Result<Vec<SeccompRule>, String> {
    let kick = crate::kick::kick_signal() as u64;
    any_of(2, &[kick, libc::SIGABRT as u64])
}

/// Waiting on an epoll set and reading the eventfds in it.
const LOOP: &[i64] = &[
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_wait,
    libc::SYS_read,
];

fn allowed(kind: ThreadKind) -> Result<Rules, String> {
    let mut rules = common()?;
    match kind {
        ThreadKind::Vcpu => {
            // A vCPU whose guest reset the VM kicks the others.
            rules.insert(libc::SYS_tgkill, kicks()?);
            // Guest RAM mapped again for the fs device at activation,
            // eventfds for MSI vectors, VFIO config and BAR accesses; a
            // vsock device the guest resets shuts its connections down.
            allow(
                &mut rules,
                &[
                    libc::SYS_eventfd2,
                    libc::SYS_pread64,
                    libc::SYS_pwrite64,
                    libc::SYS_shutdown,
                ],
            );
            rules.insert(
                libc::SYS_ioctl,
                any_of(
                    1,
                    &[
                        KVM_RUN(),
                        KVM_GET_REGS(),
                        // VFIO BARs moved by the guest.
                        KVM_SET_USER_MEMORY_REGION(),
                        // MSI-X vectors the guest enables on a VFIO function.
                        KVM_SET_GSI_ROUTING(),
                        KVM_IRQFD(),
                        VFIO_DEVICE_SET_IRQS(),
                        // Offloads the net driver accepts at activation.
                        libc::TUNSETOFFLOAD,
                    ],
                )?,
            );
        }
        ThreadKind::EventLoop => {
            allow(&mut rules, LOOP);
            allow(
                &mut rules,
                &[
                    // vsock: the host's Unix sockets.
                    libc::SYS_accept4,
                    libc::SYS_connect,
                    libc::SYS_getsockopt,
                    libc::SYS_recvfrom,
                    libc::SYS_recvmsg,
                    libc::SYS_sendmsg,
                    libc::SYS_sendto,
                    libc::SYS_shutdown,
                    // A vsock device's host sockets, removed as it drops.
                    libc::SYS_unlink,
                    // block: files and block devices; net: the tap.
                    libc::SYS_fallocate,
                    libc::SYS_fdatasync,
                    libc::SYS_fsync,
                    libc::SYS_lseek,
                    libc::SYS_pread64,
                    libc::SYS_preadv,
                    libc::SYS_pwrite64,
                    libc::SYS_pwritev,
                    libc::SYS_readv,
                ],
            );
            rules.insert(libc::SYS_socket, any_of(0, &[libc::AF_UNIX as u64])?);
            rules.insert(
                libc::SYS_ioctl,
                any_of(
                    1,
                    &[
                        BLKDISCARD(),
                        BLKZEROOUT(),
                        libc::TUNSETOFFLOAD,
                        libc::FIONBIO,
                    ],
                )?,
            );
        }
        ThreadKind::FsWorker => {
            allow(&mut rules, LOOP);
            // fuse-backend-rs's passthrough file system, without xattrs,
            // file handles or ioctls (none enabled); setresuid/setresgid
            // and capget/capset act on this thread alone (the raw
            // syscalls), for the guest's credentials.
            allow(
                &mut rules,
                &[
                    libc::SYS_capget,
                    libc::SYS_capset,
                    libc::SYS_copy_file_range,
                    libc::SYS_dup,
                    libc::SYS_fallocate,
                    libc::SYS_fchmod,
                    libc::SYS_fchmodat,
                    libc::SYS_fchown,
                    libc::SYS_fchownat,
                    libc::SYS_fdatasync,
                    libc::SYS_flock,
                    libc::SYS_fstat,
                    libc::SYS_fstatfs,
                    libc::SYS_fsync,
                    libc::SYS_ftruncate,
                    libc::SYS_getdents64,
                    libc::SYS_linkat,
                    libc::SYS_lseek,
                    libc::SYS_mkdirat,
                    libc::SYS_mknodat,
                    libc::SYS_newfstatat,
                    libc::SYS_openat,
                    libc::SYS_pread64,
                    libc::SYS_preadv,
                    libc::SYS_preadv2,
                    libc::SYS_pwrite64,
                    libc::SYS_pwritev,
                    libc::SYS_pwritev2,
                    libc::SYS_readlinkat,
                    libc::SYS_readv,
                    libc::SYS_renameat,
                    libc::SYS_renameat2,
                    libc::SYS_setresgid,
                    libc::SYS_setresuid,
                    libc::SYS_statx,
                    libc::SYS_symlinkat,
                    libc::SYS_umask,
                    libc::SYS_unlinkat,
                    libc::SYS_utimensat,
                ],
            );
        }
        ThreadKind::Supervisor => {
            rules.insert(libc::SYS_tgkill, kicks()?);
        }
    }
    Ok(rules)
}

/// Calls the fs worker's allow-list lets through but whose mode would put
/// a device node or a set-user/group-ID file on the host: refused with
/// EPERM (the guest sees a failed call, the VM goes on).
fn refused_fs_modes() -> Result<Rules, String> {
    // One rule per bit: a rule's conditions all hold, any rule matches.
    let bit_set = |index: u8, mask: u32, value: u32| {
        SeccompRule::new(vec![arg(
            index,
            SeccompCmpOp::MaskedEq(u64::from(mask)),
            u64::from(value),
        )?])
        .map_err(|e| e.to_string())
    };
    let set_id = |index: u8| -> Result<Vec<SeccompRule>, String> {
        Ok(vec![
            bit_set(index, libc::S_ISUID, libc::S_ISUID)?,
            bit_set(index, libc::S_ISGID, libc::S_ISGID)?,
        ])
    };
    let mut rules = Rules::new();
    // open(O_CREAT)'s mode; chmod's; mknod's, which also must not make
    // character or block devices.
    rules.insert(libc::SYS_openat, set_id(3)?);
    rules.insert(libc::SYS_fchmod, set_id(1)?);
    rules.insert(libc::SYS_fchmodat, set_id(2)?);
    let mut mknod = set_id(2)?;
    for device in [libc::S_IFCHR, libc::S_IFBLK] {
        mknod.push(bit_set(2, libc::S_IFMT, device)?);
    }
    rules.insert(libc::SYS_mknodat, mknod);
    Ok(rules)
}
