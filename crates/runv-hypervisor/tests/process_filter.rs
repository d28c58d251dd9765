//! The shim's process-wide seccomp deny-list, installed on this test
//! process (a binary of its own, so no other test runs under it).

use std::{fs, io};

use nix::libc;

use runv_hypervisor::confine::confine_process;

/// The errno of a raw system call that is meant to fail.
fn errno_of(result: libc::c_long) -> Option<i32> {
    (result == -1).then(|| io::Error::last_os_error().raw_os_error().unwrap())
}

#[test]
fn the_host_deny_list_refuses_escapes_and_keeps_what_the_shim_needs() {
    // Started before the filter: TSYNC must reach it too.
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let older_thread = std::thread::spawn(move || {
        wait.recv().unwrap();
        fs::read_to_string("/proc/thread-self/status").unwrap()
    });
    confine_process().unwrap();
    go.send(()).unwrap();
    for status in [
        fs::read_to_string("/proc/self/status").unwrap(),
        older_thread.join().unwrap(),
    ] {
        assert!(status.lines().any(|l| l == "Seccomp:\t2"), "{status}");
        assert!(status.lines().any(|l| l == "NoNewPrivs:\t1"), "{status}");
    }
    // SAFETY: system calls with invalid or null arguments, refused before
    // the kernel looks at them.
    let refused = unsafe {
        [
            (
                "ptrace",
                libc::syscall(libc::SYS_ptrace, libc::PTRACE_ATTACH, 1, 0, 0),
            ),
            ("keyctl", libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0, 0)),
            (
                "open_by_handle_at",
                libc::syscall(libc::SYS_open_by_handle_at, -1, 0, 0),
            ),
            ("bpf MAP_CREATE", libc::syscall(libc::SYS_bpf, 0, 0, 0)),
            ("bpf PROG_LOAD", libc::syscall(libc::SYS_bpf, 5, 0, 0)),
            ("init_module", libc::syscall(libc::SYS_init_module, 0, 0, 0)),
        ]
    };
    for (name, result) in refused {
        assert_eq!(errno_of(result), Some(libc::EPERM), "{name}");
    }
    // What the shim does stays possible: port-forward's two bpf commands
    // (a map update and a link; the kernel itself refuses these empty
    // ones), children, and a mount namespace for one thread (macvtap's).
    for command in [2 /* MAP_UPDATE_ELEM */, 28 /* LINK_CREATE */] {
        // SAFETY: a null attribute of size 0, which the kernel refuses.
        let result = unsafe { libc::syscall(libc::SYS_bpf, command, 0, 0) };
        let errno = errno_of(result);
        // SAFETY: geteuid only reads the process's credentials.
        if unsafe { libc::geteuid() } == 0 {
            assert_ne!(errno, Some(libc::EPERM), "bpf command {command}");
        }
    }
    assert!(std::process::Command::new("true")
        .status()
        .unwrap()
        .success());
    let unshared = std::thread::spawn(|| {
        // SAFETY: unshare affects this thread only (CLONE_FS comes with it).
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNS) };
        (rc, io::Error::last_os_error())
    })
    .join()
    .unwrap();
    // SAFETY: geteuid only reads the process's credentials.
    if unsafe { libc::geteuid() } == 0 {
        assert_eq!(unshared.0, 0, "unshare: {}", unshared.1);
    }
}
