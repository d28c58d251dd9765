//! What PID 1 sets up before anything else runs, and how it ends the VM.

use std::{fs, io, path::Path};

use nix::{
    mount::{mount, MsFlags},
    sys::reboot::{reboot, RebootMode},
    unistd::{dup2_stderr, dup2_stdin, dup2_stdout, sync},
};

/// The guest's pseudo and scratch file systems, in mount order.
const MOUNTS: &[(&str, &str, &str, u64)] = &[
    ("proc", "/proc", "proc", NO_EXEC),
    ("sysfs", "/sys", "sysfs", NO_EXEC),
    ("devtmpfs", "/dev", "devtmpfs", NO_SUID),
    ("devpts", "/dev/pts", "devpts", NO_EXEC),
    ("tmpfs", "/dev/shm", "tmpfs", NO_EXEC),
    ("tmpfs", "/run", "tmpfs", NO_DEV),
    ("tmpfs", "/tmp", "tmpfs", NO_DEV),
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", NO_EXEC),
];
const NO_SUID: u64 = MsFlags::MS_NOSUID.bits();
const NO_DEV: u64 = MsFlags::MS_NOSUID.bits() | MsFlags::MS_NODEV.bits();
const NO_EXEC: u64 = NO_DEV | MsFlags::MS_NOEXEC.bits();

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Mounts the pseudo file systems, gives PID 1 the console as stdio, and
/// sets PATH. Runs before any thread is started.
pub fn set_up_system() -> io::Result<()> {
    for &(source, target, fstype, flags) in MOUNTS {
        fs::create_dir_all(target)?;
        mount(
            Some(source),
            target,
            Some(fstype),
            MsFlags::from_bits_truncate(flags),
            None::<&str>,
        )
        .map_err(|e| io::Error::other(format!("mount {fstype} on {target}: {e}")))?;
    }
    attach_console()?;
    // Still single-threaded: nothing can read the environment concurrently.
    std::env::set_var("PATH", PATH);
    Ok(())
}

/// The kernel starts /init with the console as stdio only when the
/// initramfs has /dev/console; make sure of it now that devtmpfs is up.
fn attach_console() -> io::Result<()> {
    let stdio_open = (0..=2).all(|fd| Path::new(&format!("/proc/self/fd/{fd}")).exists());
    if stdio_open {
        return Ok(());
    }
    let console = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")?;
    dup2_stdin(&console)?;
    dup2_stdout(&console)?;
    dup2_stderr(&console)?;
    Ok(())
}

/// The value of `name=value` on the kernel command line.
pub fn kernel_param(name: &str) -> Option<String> {
    let cmdline = fs::read_to_string(Path::new("/proc/cmdline")).ok()?;
    parse_param(&cmdline, name)
}

fn parse_param(cmdline: &str, name: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .filter_map(|param| param.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_owned())
}

/// Flushes file systems and resets the guest. With `reboot=t` on the
/// kernel command line the reset is a triple fault, which every runv
/// hypervisor turns into the end of the VM.
pub fn end_vm() -> ! {
    sync();
    let err = reboot(RebootMode::RB_AUTOBOOT).unwrap_err();
    eprintln!("runv-agent: reboot failed: {err}");
    // Exiting as PID 1 panics the kernel, and panic=-1 resets: the VM ends.
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_kernel_params() {
        let cmdline = "console=ttyS0 reboot=t runv.log_level=debug quiet\n";
        assert_eq!(
            parse_param(cmdline, "runv.log_level").as_deref(),
            Some("debug")
        );
        assert_eq!(parse_param(cmdline, "reboot").as_deref(), Some("t"));
        assert_eq!(parse_param(cmdline, "quiet"), None);
        assert_eq!(parse_param(cmdline, "runv.log"), None);
    }
}
