//! Helper processes of a VM: finding them, starting them so that they die
//! with the shim, and reading their logs for error messages.

use std::{
    fs,
    os::{
        fd::{BorrowedFd, RawFd},
        unix::fs::PermissionsExt,
    },
    path::{Path, PathBuf},
    process::Stdio,
};

use nix::{
    fcntl::{fcntl, FcntlArg, FdFlag},
    sys::{prctl, signal::Signal},
    unistd::{getpid, getppid, Pid},
};

use crate::confine::Confinement;

/// Lines of a helper's log quoted in an error.
pub const LOG_TAIL_LINES: usize = 20;

/// Finds `program` as given when it names a path, else in `PATH`.
pub fn find_executable(program: &Path) -> Option<PathBuf> {
    let is_executable = |path: &Path| {
        fs::metadata(path)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.components().count() > 1 {
        return is_executable(program).then(|| program.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

/// A command whose process is killed when the thread that spawned it dies,
/// so that no helper outlives a crashed shim. Spawn it from a thread that
/// lives as long as the VM (a runtime worker, not a blocking-pool thread).
pub fn command_dying_with_parent(program: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(program);
    let parent = getpid();
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (see die_with_parent).
    unsafe {
        command.pre_exec(move || die_with_parent(parent));
    }
    command.kill_on_drop(true);
    command
}

/// In a forked child: SIGKILL when the spawning thread dies, or exit at
/// once if `parent` is already gone. Only prctl, getppid and _exit:
/// async-signal-safe.
pub fn die_with_parent(parent: Pid) -> std::io::Result<()> {
    prctl::set_pdeathsig(Signal::SIGKILL)?;
    // The parent may have died between fork and prctl.
    if getppid() != parent {
        libc_exit();
    }
    Ok(())
}

/// How to start a helper: its log, the open fds it inherits under their own
/// numbers, its working directory, and whether it runs unprivileged.
pub struct Spawn<'a> {
    pub log: &'a Path,
    pub what: &'static str,
    /// Only the child clears their close-on-exec flag, so no other process
    /// spawned meanwhile inherits them; the caller keeps them open until
    /// the spawn returns.
    pub inherit: Vec<RawFd>,
    pub cwd: Option<&'a Path>,
    pub confinement: Option<&'a Confinement>,
}

impl<'a> Spawn<'a> {
    /// A privileged helper that inherits nothing, logging to `log`.
    pub fn logged(log: &'a Path, what: &'static str) -> Spawn<'a> {
        Spawn {
            log,
            what,
            inherit: Vec::new(),
            cwd: None,
            confinement: None,
        }
    }
}

/// Spawns `program` dying with its parent (see
/// [`command_dying_with_parent`]), with stdout and stderr going to the log,
/// as `how` says.
pub fn spawn_logged(
    program: &Path,
    args: impl IntoIterator<Item = String>,
    how: Spawn<'_>,
) -> Result<tokio::process::Child, crate::HypervisorError> {
    let io_error = |source| crate::HypervisorError::Io {
        context: format!("cannot start {}", how.what),
        source,
    };
    let log_file = fs::File::create(how.log).map_err(io_error)?;
    let log_copy = log_file.try_clone().map_err(io_error)?;
    let mut command = command_dying_with_parent(program);
    // In the VM's directory at least, where its log is: an operator (or
    // a leak check) finds every process of a VM by its working directory,
    // whatever its command line names (QEMU's names only fds).
    if let Some(cwd) = how.cwd.or(how.log.parent()) {
        command.current_dir(cwd);
    }
    let inherit = how.inherit;
    if !inherit.is_empty() {
        // SAFETY: the closure runs in the forked child before exec and
        // only calls fcntl, which is async-signal-safe, on fds the caller
        // keeps open.
        unsafe {
            command.pre_exec(move || {
                for &fd in &inherit {
                    let fd = BorrowedFd::borrow_raw(fd);
                    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
                }
                Ok(())
            });
        }
    }
    if let Some(confinement) = how.confinement {
        let confinement = confinement.clone();
        let parent = getpid();
        // SAFETY: apply_in_child makes only async-signal-safe calls; it
        // runs last, after the steps above that need root.
        unsafe {
            command.pre_exec(move || confinement.apply_in_child(parent));
        }
    }
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_copy)
        .spawn()
        .map_err(io_error)
}

/// `path` as a command-line argument.
pub fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn libc_exit() -> ! {
    // SAFETY: _exit is async-signal-safe and never returns.
    unsafe { nix::libc::_exit(1) }
}

/// The last `lines` lines of a log file, or a note that it could not be read.
pub fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_programs_in_path_and_by_path() {
        let sh = find_executable(Path::new("sh")).expect("sh is in PATH");
        assert!(sh.is_absolute());
        assert_eq!(find_executable(&sh), Some(sh.clone()));
        assert_eq!(find_executable(Path::new("runv-no-such-program")), None);
        assert_eq!(find_executable(Path::new("/nonexistent/qemu")), None);
    }

    #[test]
    fn non_executable_file_is_not_a_program() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data");
        fs::write(&file, "x").unwrap();
        assert_eq!(find_executable(&file), None);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        fs::write(&log, "a\nb\nc\nd\n").unwrap();
        assert_eq!(tail(&log, 2), "c\nd");
        assert_eq!(tail(&log, 10), "a\nb\nc\nd");
        assert!(tail(&dir.path().join("none"), 2).contains("cannot read"));
    }

    #[tokio::test]
    async fn helper_is_killed_with_its_parent_thread() {
        // A child spawned from a short-lived thread dies when that thread
        // ends: that is the parent-death signal at work.
        let pid = std::thread::spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let child = command_dying_with_parent(Path::new("sleep"))
                    .arg("30")
                    .kill_on_drop(false)
                    .spawn()
                    .unwrap();
                child.id().unwrap()
            })
        })
        .join()
        .unwrap();
        let alive = || {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|stat| !stat.contains(") Z "))
                .unwrap_or(false)
        };
        for _ in 0..200 {
            if !alive() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("child {pid} outlived the thread that spawned it");
    }
}
