//! The shim against a real containerd: `ctr` runs busybox with runc (to
//! prove the harness), then with runv, and nothing is left afterwards.

use runv_tests::containerd::{Containerd, BUSYBOX_IMAGE};

fn started() -> Option<Containerd> {
    let containerd = Containerd::start()?;
    containerd.import_busybox();
    Some(containerd)
}

#[test]
fn runc_runs_busybox() {
    let Some(containerd) = started() else { return };
    let out = containerd.ctr_ok(&["run", "--rm", BUSYBOX_IMAGE, "runc-hello", "echo", "hello"]);
    assert_eq!(out, "hello\n");
    containerd.stop();
}

/// `ctr run` on runv with the test's runv config.
fn runv_run(containerd: &Containerd, id: &str, args: &[&str]) -> std::process::Output {
    let config = containerd.runv_config();
    let mut full = vec![
        "run",
        "--rm",
        "--runtime",
        "io.containerd.runv.v2",
        "--runtime-config-path",
        config.to_str().unwrap(),
        BUSYBOX_IMAGE,
        id,
    ];
    full.extend_from_slice(args);
    containerd.ctr(&full)
}

#[test]
fn runv_runs_busybox() {
    let Some(containerd) = started() else { return };
    let hello = runv_run(&containerd, "runv-hello", &["echo", "hello"]);
    assert_eq!(String::from_utf8_lossy(&hello.stdout), "hello\n");
    assert!(hello.status.success());
    let exit = runv_run(&containerd, "runv-exit", &["sh", "-c", "exit 3"]);
    assert_eq!(exit.status.code(), Some(3));
    containerd.stop();
}

#[test]
fn runv_task_lifecycle() {
    let Some(containerd) = started() else { return };
    let config = containerd.runv_config();
    let id = "runv-life";
    containerd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        "io.containerd.runv.v2",
        "--runtime-config-path",
        config.to_str().unwrap(),
        BUSYBOX_IMAGE,
        id,
        "sh",
        "-c",
        // As PID 1 of its namespace the shell ignores SIGTERM unless it traps it.
        "trap 'exit 0' TERM; sleep 600 & wait",
    ]);
    let ps = containerd.ctr_ok(&["task", "ps", id]);
    assert!(ps.lines().count() >= 2, "{ps}");
    let exec = containerd.ctr_ok(&["task", "exec", "--exec-id", "e1", id, "echo", "from-exec"]);
    assert_eq!(exec, "from-exec\n");
    let tty = containerd.ctr_on_tty(&["task", "exec", "--tty", "--exec-id", "e2", id, "tty"]);
    assert!(tty.contains("/dev/pts/"), "{tty:?}");
    containerd.ctr_ok(&["task", "pause", id]);
    assert!(containerd.ctr_ok(&["task", "ls"]).contains("PAUSED"));
    containerd.ctr_ok(&["task", "resume", id]);
    assert!(containerd.ctr_ok(&["task", "ls"]).contains("RUNNING"));
    let metrics = containerd.ctr_ok(&["task", "metrics", id]);
    assert!(metrics.contains("memory.usage_in_bytes"), "{metrics}");
    containerd.ctr_ok(&["task", "kill", "--signal", "SIGTERM", id]);
    wait_stopped(&containerd, id);
    containerd.ctr_ok(&["task", "delete", id]);
    containerd.ctr_ok(&["container", "delete", id]);

    // SIGKILL, for a process that ignores SIGTERM.
    let id = "runv-kill";
    containerd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        "io.containerd.runv.v2",
        "--runtime-config-path",
        config.to_str().unwrap(),
        BUSYBOX_IMAGE,
        id,
        "sh",
        "-c",
        "trap '' TERM; sleep 600",
    ]);
    containerd.ctr_ok(&["task", "kill", "--signal", "SIGKILL", id]);
    wait_stopped(&containerd, id);
    containerd.ctr_ok(&["task", "delete", id]);
    containerd.ctr_ok(&["container", "delete", id]);
    containerd.stop();
}

fn wait_stopped(containerd: &Containerd, id: &str) {
    for _ in 0..300 {
        let tasks = containerd.ctr_ok(&["task", "ls"]);
        if tasks
            .lines()
            .any(|l| l.starts_with(id) && l.contains("STOPPED"))
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("task {id} did not stop");
}
