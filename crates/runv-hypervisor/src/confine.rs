//! Confinement of the qemu backend's unprivileged helpers (QEMU and
//! vhost-device-vsock): a uid and gid of their own per VM, no
//! supplementary groups but the ones named, no capability in any set, no
//! new privileges, and a seccomp deny-list, all set in the child between
//! fork and exec.
//!
//! The uid is unmapped (no passwd entry, owns no file outside the VM's
//! helper directory) and differs between VMs, so that a helper taken over
//! by its guest can neither signal, ptrace nor read another pod's helpers
//! or sockets. It is `HELPER_UID_BASE + (shim pid << 8) + n`, n counting
//! the VMs this process started: unique among live VMs, since helpers die
//! with the shim that started them.
//!
//! The shim itself runs under the shorter host deny-list, which every
//! helper inherits ([`confine_process`]).

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::Path,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
};

use nix::libc;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::process::die_with_parent;

/// The first uid of VM helpers; far above login users and the subordinate
/// id ranges that useradd hands out for user namespaces.
pub const HELPER_UID_BASE: u32 = 2_000_000_000;

/// System calls no runv process needs, the shim included (it mounts,
/// enters network namespaces and starts helpers, so those stay), that a
/// process taken over through its guest could use against the host:
/// tracing other processes, kernel modules, keys, perf, kexec, file
/// handles (the classic container escape), clocks, swap and port I/O.
/// Each fails with EPERM. BPF is denied too, but for [`SHIM_BPF_COMMANDS`]
/// in the shim.
const HOST_DENIED_SYSCALLS: &[i64] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kcmp,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_iopl,
    libc::SYS_ioperm,
];

/// What a VM's unprivileged helpers are refused on top: mounts and
/// namespaces, and any change of credentials. (execve stays allowed: the
/// filter is installed before the helper itself is executed; QEMU's own
/// sandbox denies it to QEMU.)
const HELPER_DENIED_SYSCALLS: &[i64] = &[
    libc::SYS_bpf,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_setgroups,
    libc::SYS_capset,
];

/// How a VM's unprivileged helpers run. Cheap to clone: the filter is
/// compiled once per VM.
#[derive(Clone)]
pub struct Confinement {
    uid: u32,
    /// Supplementary groups the helper keeps (the group of /dev/kvm).
    groups: Vec<libc::gid_t>,
    filter: Arc<BpfProgram>,
    /// The highest capability number of the running kernel.
    last_cap: u32,
}

impl Confinement {
    /// A fresh uid for a new VM's helpers, and the deny-list filter.
    pub fn for_new_vm() -> Result<Confinement, crate::HypervisorError> {
        static VMS: AtomicU32 = AtomicU32::new(0);
        let n = VMS.fetch_add(1, Ordering::Relaxed) & 0xff;
        let uid = HELPER_UID_BASE + (std::process::id() << 8) + n;
        let error = |context: &str, detail: String| crate::HypervisorError::StartFailed {
            what: "the helper sandbox",
            detail: format!("{context}: {detail}"),
        };
        let filter = deny_filter(&[HOST_DENIED_SYSCALLS, HELPER_DENIED_SYSCALLS])
            .map_err(|e| error("cannot build the seccomp filter", e))?;
        let last_cap = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .map_err(|e| e.to_string())
            .and_then(|text| text.trim().parse().map_err(|e| format!("{e}")))
            .map_err(|e| error("cannot read /proc/sys/kernel/cap_last_cap", e))?;
        Ok(Confinement {
            uid,
            groups: Vec::new(),
            filter: Arc::new(filter),
            last_cap,
        })
    }

    /// The helpers' uid, which is also their gid.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Keeps `gid` as a supplementary group (to open a device it owns).
    pub fn with_group(mut self, gid: libc::gid_t) -> Confinement {
        self.groups.push(gid);
        self
    }

    /// Creates `path`, mode 0700, owned by the helpers: the one directory
    /// they can write (their vhost-user and hybrid vsock sockets).
    pub fn create_dir(&self, path: &Path) -> io::Result<()> {
        fs::DirBuilder::new().mode(0o700).create(path)?;
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.uid))?;
        // Not from the umask.
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))
    }

    /// Drops to the helpers' uid and gid with no capabilities and installs
    /// the filter. Runs in the forked child before exec: only
    /// async-signal-safe system calls, no allocation. `parent` is the pid
    /// of the spawning process: a change of uid clears the parent-death
    /// signal, which is set again.
    pub fn apply_in_child(&self, parent: nix::unistd::Pid) -> io::Result<()> {
        let check = |rc: libc::c_long| match rc {
            -1 => Err(io::Error::last_os_error()),
            _ => Ok(()),
        };
        // SAFETY: plain system calls on valid arguments (the groups slice
        // and the capability structs live through the calls).
        unsafe {
            // The bounding set needs CAP_SETPCAP: drop it while still root.
            for cap in 0..=self.last_cap {
                check(libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0).into())?;
            }
            check(
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL,
                    0,
                    0,
                    0,
                )
                .into(),
            )?;
            check(libc::setgroups(self.groups.len(), self.groups.as_ptr()).into())?;
            check(libc::setresgid(self.uid, self.uid, self.uid).into())?;
            // Leaving uid 0 empties the permitted and effective sets.
            check(libc::setresuid(self.uid, self.uid, self.uid).into())?;
            // The inheritable set survives setuid: empty it too.
            let mut header = CapHeader {
                version: LINUX_CAPABILITY_VERSION_3,
                pid: 0,
            };
            let data = [CapData::default(); 2];
            check(libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()))?;
        }
        die_with_parent(parent)?;
        // Also sets no_new_privs.
        seccompiler::apply_filter(&self.filter).map_err(|_| io::Error::last_os_error())
    }
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Installs [`HOST_DENIED_SYSCALLS`], and bpf(2) but for
/// [`SHIM_BPF_COMMANDS`], on every thread of the calling process (and so
/// on every child it starts): the shim calls it before it serves
/// containerd. Sets no_new_privs, which costs a root process
/// nothing.
pub fn confine_process() -> Result<(), String> {
    let filter = deny_filter_with(&[HOST_DENIED_SYSCALLS], Some(shim_bpf_rule()?))?;
    seccompiler::apply_filter_all_threads(&filter)
        .map_err(|e| format!("cannot install the process's seccomp filter: {e}"))
}

/// The bpf(2) commands the shim keeps: it steers a pod namespace's
/// loopback to its port-forward listener (runv_network::loopback) with a
/// program and a map it made before this filter, by putting the listener
/// in the map and attaching the program to the namespace. Loading
/// programs and making maps stay denied.
const SHIM_BPF_COMMANDS: [u64; 2] = [
    2,  /* BPF_MAP_UPDATE_ELEM */
    28, /* BPF_LINK_CREATE */
];

/// bpf(2) with any command but [`SHIM_BPF_COMMANDS`].
fn shim_bpf_rule() -> Result<(i64, Vec<SeccompRule>), String> {
    let conditions = SHIM_BPF_COMMANDS
        .iter()
        .map(|&command| {
            SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, command)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let rule = SeccompRule::new(conditions).map_err(|e| e.to_string())?;
    Ok((libc::SYS_bpf, vec![rule]))
}

/// A deny-list: the calls of `lists` fail with EPERM, all else is allowed.
fn deny_filter(lists: &[&[i64]]) -> Result<BpfProgram, String> {
    deny_filter_with(lists, None)
}

/// [`deny_filter`], and `conditional`'s call fails with EPERM when one of
/// its rules matches.
fn deny_filter_with(
    lists: &[&[i64]],
    conditional: Option<(i64, Vec<SeccompRule>)>,
) -> Result<BpfProgram, String> {
    let arch: TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| format!("{e:?}"))?;
    let rules = lists
        .iter()
        .flat_map(|list| list.iter())
        .map(|&nr| (nr, Vec::new()))
        .chain(conditional)
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| e.to_string())?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A confined child runs with the VM's uid, no capabilities, no new
    /// privileges and the filter; each VM gets a uid of its own.
    #[tokio::test]
    async fn confined_child_has_no_privilege() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIPPED: confining a helper needs root");
            return;
        }
        let confinement = Confinement::for_new_vm().unwrap();
        let uid = confinement.uid();
        assert_ne!(
            uid,
            Confinement::for_new_vm().unwrap().uid(),
            "one uid per VM"
        );
        assert!(uid >= HELPER_UID_BASE);
        let parent = nix::unistd::getpid();
        let mut command = tokio::process::Command::new("sleep");
        command.arg("30").kill_on_drop(true);
        // SAFETY: apply_in_child makes only async-signal-safe calls.
        unsafe {
            command.pre_exec(move || confinement.apply_in_child(parent));
        }
        let child = command.spawn().unwrap();
        let status = fs::read_to_string(format!("/proc/{}/status", child.id().unwrap())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(&format!("{name}:")))
                .unwrap_or_else(|| panic!("{name} in {status}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(field("Uid"), format!("{uid} {uid} {uid} {uid}"));
        assert_eq!(field("Gid"), format!("{uid} {uid} {uid} {uid}"));
        assert_eq!(field("Groups"), "");
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(field(set), "0000000000000000", "{set}");
        }
        assert_eq!(field("NoNewPrivs"), "1");
        assert_eq!(field("Seccomp"), "2");
    }
}
