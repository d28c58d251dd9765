//! Each kind of VMM thread's seccomp filter, tried for real: a thread
//! installs it and makes a call outside its allow-list, which must kill
//! the process. That runs in a child (this test binary run again, on the
//! `child` test) so that the kill ends the child, not the tests.

use std::{os::unix::process::ExitStatusExt, process::Command};

use runv_vmm::seccomp::{install, ThreadKind};

/// Set in the child: which kind to confine, and what to do then.
const SCENARIO: &str = "RUNV_SECCOMP_SCENARIO";

const KINDS: [ThreadKind; 4] = [
    ThreadKind::Vcpu,
    ThreadKind::EventLoop,
    ThreadKind::FsWorker,
    ThreadKind::Supervisor,
];

/// Runs the child on `kind` and `action`; returns its exit status.
fn run_child(kind: ThreadKind, action: &str) -> std::process::ExitStatus {
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["child", "--exact", "--nocapture", "--test-threads=1"])
        .env(SCENARIO, format!("{kind:?}:{action}"))
        .output()
        .unwrap();
    println!(
        "{kind:?} {action}: {:?}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output.status
}

/// The scenario the parent asked for; nothing when run as a plain test.
#[test]
fn child() {
    let Ok(scenario) = std::env::var(SCENARIO) else {
        return;
    };
    let (kind, action) = scenario.split_once(':').unwrap();
    let kind = *KINDS.iter().find(|k| format!("{k:?}") == kind).unwrap();
    let action = action.to_owned();
    std::thread::spawn(move || {
        install(kind).unwrap();
        act(&action);
    })
    .join()
    .unwrap();
}

/// What the confined thread does.
fn act(action: &str) {
    match action {
        // Allowed to every kind.
        "getpid" => {
            // SAFETY: no arguments.
            assert!(unsafe { libc::getpid() } > 0);
        }
        // Allowed to none: an Internet socket.
        "socket" => {
            // SAFETY: plain arguments; the call is expected to kill us.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        }
        // Allowed to none: executable memory.
        "exec-memory" => {
            // SAFETY: an anonymous mapping; the call is expected to kill us.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
        }
        // The fs worker may make fifos but no device node and no
        // set-user-ID file: those fail with EPERM, and the process goes on.
        "mknod" => {
            let dir = std::env::temp_dir().join(format!("runv-seccomp-{}", std::process::id()));
            let mknod = |name: &str, mode: libc::mode_t, dev: libc::dev_t| {
                let path = c_path(&dir.join(name));
                // SAFETY: a C string path; no memory of ours is written.
                match unsafe { libc::mknodat(libc::AT_FDCWD, path.as_ptr(), mode, dev) } {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error().raw_os_error()),
                }
            };
            // The *at calls are the fs worker's (the passthrough's), not
            // plain mkdir.
            // SAFETY: a C string path.
            let made = unsafe { libc::mkdirat(libc::AT_FDCWD, c_path(&dir).as_ptr(), 0o700) };
            assert_eq!(made, 0, "{}", std::io::Error::last_os_error());
            assert_eq!(mknod("fifo", libc::S_IFIFO | 0o600, 0), Ok(()));
            let refused = Err(Some(libc::EPERM));
            let sda = libc::makedev(8, 0);
            assert_eq!(mknod("disk", libc::S_IFBLK | 0o600, sda), refused);
            let tty = libc::makedev(5, 0);
            assert_eq!(mknod("tty", libc::S_IFCHR | 0o600, tty), refused);
            let suid = libc::S_IFREG | libc::S_ISUID | 0o755;
            assert_eq!(mknod("suid", suid, 0), refused);
            std::fs::remove_dir_all(&dir).unwrap();
        }
        other => panic!("unknown action {other}"),
    }
}

fn c_path(path: &std::path::Path) -> std::ffi::CString {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap()
}

#[test]
fn every_kind_allows_its_calls_and_kills_the_process_on_any_other() {
    for kind in KINDS {
        assert!(
            run_child(kind, "getpid").success(),
            "{kind:?} allows getpid"
        );
        for action in ["socket", "exec-memory"] {
            let status = run_child(kind, action);
            assert_eq!(
                status.signal(),
                Some(libc::SIGSYS),
                "{kind:?} {action}: killed by SIGSYS, not {status:?}"
            );
        }
    }
}

#[test]
fn the_fs_worker_makes_no_device_node_and_no_set_id_file() {
    assert!(run_child(ThreadKind::FsWorker, "mknod").success());
}
