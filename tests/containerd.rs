//! The shim against a real containerd: `ctr` runs busybox with runc (to
//! prove the harness), then with runv, and nothing is left afterwards.

use std::{
    io::{Read, Write},
    process::Stdio,
    time::{Duration, Instant},
};

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
    containerd.ctr(&containerd.runv_run_args("--rm", &[], id, args))
}

#[test]
fn runv_runs_busybox() {
    let Some(containerd) = started() else { return };
    // With no hostname in the spec, runc's container has the node's.
    let hello = runv_run(
        &containerd,
        "runv-hello",
        &["sh", "-c", "echo hello; hostname"],
    );
    let node = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(
        String::from_utf8_lossy(&hello.stdout),
        format!("hello\n{}\n", node.trim())
    );
    assert!(hello.status.success());
    let exit = runv_run(&containerd, "runv-exit", &["sh", "-c", "exit 3"]);
    assert_eq!(exit.status.code(), Some(3));
    containerd.stop();
}

#[test]
fn runv_task_lifecycle() {
    let Some(containerd) = started() else { return };
    let id = "runv-life";
    containerd.ctr_ok(&containerd.runv_run_args(
        "-d",
        &[],
        id,
        // As PID 1 of its namespace the shell ignores SIGTERM unless it traps it.
        &["sh", "-c", "trap 'exit 0' TERM; sleep 600 & wait"],
    ));
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
    containerd.wait_stopped(id);
    containerd.ctr_ok(&["task", "delete", id]);
    containerd.ctr_ok(&["container", "delete", id]);

    // SIGKILL, for a process that ignores SIGTERM.
    let id = "runv-kill";
    containerd.ctr_ok(&containerd.runv_run_args(
        "-d",
        &[],
        id,
        &["sh", "-c", "trap '' TERM; sleep 600"],
    ));
    containerd.ctr_ok(&["task", "kill", "--signal", "SIGKILL", id]);
    containerd.wait_stopped(id);
    containerd.ctr_ok(&["task", "delete", id]);
    containerd.ctr_ok(&["container", "delete", id]);
    containerd.stop();
}

/// 100 MiB of random bytes on stdout reach `ctr` byte-exact through
/// containerd's FIFOs: the digest computed inside matches the one of what
/// arrived. The throughput is measured from the first byte to the last.
#[test]
fn runv_streams_100_mib_byte_exact() {
    const SIZE: usize = 100 << 20;
    let Some(containerd) = started() else { return };
    let script = format!(
        "exec 3>&1; head -c {SIZE} /dev/urandom | tee /dev/fd/3 | sha256sum | cut -d' ' -f1 >&2"
    );
    let args = containerd.runv_run_args("--rm", &[], "runv-100mib", &["sh", "-c", &script]);
    let mut ctr = containerd
        .ctr_command(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running ctr");
    let mut digest = std::process::Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running sha256sum");
    let (mut stdout, mut to_digest) = (ctr.stdout.take().unwrap(), digest.stdin.take().unwrap());
    let mut buffer = vec![0; 1 << 20];
    let (mut received, mut first_byte) = (0, None);
    loop {
        let read = stdout.read(&mut buffer).unwrap();
        if read == 0 {
            break;
        }
        first_byte.get_or_insert_with(Instant::now);
        received += read;
        to_digest.write_all(&buffer[..read]).unwrap();
    }
    let transfer = first_byte.map_or(Duration::ZERO, |first| first.elapsed());
    drop(to_digest);
    let ctr = ctr.wait_with_output().unwrap();
    let digest = digest.wait_with_output().unwrap();
    let inside = String::from_utf8_lossy(&ctr.stderr);
    eprintln!("ctr run: {}, stderr: {inside}", ctr.status);
    assert!(ctr.status.success());
    assert_eq!(received, SIZE);
    let arrived = String::from_utf8_lossy(&digest.stdout);
    assert_eq!(arrived.split_whitespace().next(), Some(inside.trim()));
    println!(
        "100 MiB stdout, guest to ctr byte-exact: {:.1} MiB/s over {transfer:.2?} ({})",
        SIZE as f64 / (1 << 20) as f64 / transfer.as_secs_f64(),
        runv_tests::test_hypervisor()
    );
    containerd.stop();
}

/// `--log-uri`: a `file://` URI gets both streams of the container, and a
/// `binary://` logger (a script following containerd's contract: stdout
/// on fd 3, stderr on fd 4, ready once fd 5 is closed) receives them.
#[test]
fn runv_log_uris() {
    let Some(containerd) = started() else { return };
    let dir = containerd.dir().to_owned();
    let script = ["sh", "-c", "echo to-stdout; echo to-stderr >&2"];

    let log = dir.join("logs/container.log");
    let uri = format!("file://{}", log.display());
    let file = containerd.runv_run_args("--rm", &["--log-uri", &uri], "runv-log-file", &script);
    let out = containerd.ctr(&file);
    assert!(out.status.success());
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("to-stdout\n") && logged.contains("to-stderr\n"),
        "{logged:?}"
    );

    let logger = dir.join("logger.sh");
    std::fs::write(
        &logger,
        // Ready once fd 5 is closed everywhere: before the copies inherit it.
        "#!/bin/sh\nexec 5>&-\ncat <&3 > \"$2.out\" & cat <&4 > \"$2.err\" &\nwait\n",
    )
    .unwrap();
    std::fs::set_permissions(&logger, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let prefix = dir.join("binary-log");
    let uri = format!("binary://{}?prefix={}", logger.display(), prefix.display());
    let binary = containerd.runv_run_args("--rm", &["--log-uri", &uri], "runv-log-bin", &script);
    let out = containerd.ctr(&binary);
    assert!(out.status.success());
    // The logger writes on after ctr returned: it sees end-of-file then.
    let read = |stream: &str| {
        let path = prefix.with_extension(stream);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if !text.is_empty() || Instant::now() > deadline {
                return text;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert_eq!(read("out"), "to-stdout\n");
    assert_eq!(read("err"), "to-stderr\n");
    containerd.stop();
}

/// Tasks.Update changes the container's cgroup limits in the guest; the
/// lowered memory limit then OOM-kills the container's allocation: exit
/// 137, and `ctr events` shows /tasks/oom for it.
#[test]
fn runv_update_then_oom() {
    let Some(containerd) = started() else { return };
    let id = "runv-oom";
    let events_file = containerd.dir().join("events.log");
    let mut events = containerd
        .ctr_command(&["events"])
        .stdout(std::fs::File::create(&events_file).unwrap())
        .spawn()
        .expect("running ctr events");
    // ctr's spec has no /sys/fs/cgroup: mount the container's cgroup there.
    let cgroup = "type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=ro";
    let run = containerd.runv_run_args("-d", &["--mount", cgroup],
        id,
        &[
            "sh",
            "-c",
            "while [ ! -e /tmp/allocate ]; do sleep 0.1; done; x=$(head -c 314572800 /dev/zero | tr '\\000' a)",
        ],
    );
    containerd.ctr_ok(&run);
    // Without a cgroup namespace the mount shows the guest's hierarchy:
    // the container's own cgroup is the one /proc/self/cgroup names.
    let own_limits =
        "cd /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup) && cat memory.max cpu.max pids.max";
    let cat = [
        "task",
        "exec",
        "--exec-id",
        "limits",
        id,
        "sh",
        "-c",
        own_limits,
    ];
    let before = containerd.ctr_ok(&cat);
    assert_eq!(before, "max\nmax 100000\nmax\n");
    containerd.update_task(
        id,
        r#"{"memory":{"limit":67108864},"cpu":{"quota":50000,"period":100000},"pids":{"limit":100}}"#,
    );
    let after = containerd.ctr_ok(&cat);
    assert_eq!(after, "67108864\n50000 100000\n100\n");

    containerd.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "go",
        id,
        "touch",
        "/tmp/allocate",
    ]);
    containerd.wait_stopped(id);
    let deleted = containerd.ctr(&["task", "delete", id]);
    // ctr 1.6 reports the exit status of a deleted task as a warning.
    let warning = String::from_utf8_lossy(&deleted.stderr);
    assert!(warning.contains("exit code 137"), "{warning}");
    containerd.ctr_ok(&["container", "delete", id]);
    let oom = wait_for_line(&events_file, |line| {
        line.contains("/tasks/oom") && line.contains(id)
    });
    assert!(oom.is_some(), "no /tasks/oom event for {id}");
    let exit = wait_for_line(&events_file, |line| {
        line.contains("/tasks/exit") && line.contains(&format!("\"id\":\"{id}\""))
    });
    let exit = exit.expect("a /tasks/exit event");
    assert!(exit.contains("\"exit_status\":137"), "{exit}");
    eprintln!("{}\n{exit}", oom.unwrap());
    let _ = events.kill();
    let _ = events.wait();
    containerd.stop();
}

/// A guest that ends its own VM under a running task (its kernel panics on
/// the container's OOM, which the container asked for): `ctr run` returns
/// with exit status 255 instead of waiting on a dead guest, and the task
/// goes with nothing left behind.
#[test]
fn runv_guest_panic_ends_its_tasks() {
    let Some(containerd) = started() else { return };
    let id = "runv-guest-panic";
    // A procfs of its own is writable where ctr's /proc/sys is not. Exit
    // 3: the set-up failed; 137: only the container was OOM-killed; 255:
    // the task was lost with its VM.
    let panic = "mkdir /tmp/proc && mount -t proc proc /tmp/proc && \
                 echo 2 > /tmp/proc/sys/vm/panic_on_oom || exit 3; echo armed; \
                 x=$(head -c 314572800 /dev/zero | tr '\\000' a)";
    let options = ["--cap-add", "CAP_SYS_ADMIN", "--memory-limit", "67108864"];
    let run = containerd.runv_run_args("--rm", &options, id, &["sh", "-c", panic]);
    let mut ctr = containerd
        .ctr_command(&run)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running ctr");
    let deadline = Instant::now() + Duration::from_secs(600);
    while ctr.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = ctr.kill();
            panic!("ctr run still waits on a task whose guest panicked");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = ctr.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!(
        "ctr run: {:?}, stdout: {stdout}, stderr: {stderr}",
        out.status
    );
    assert_eq!(stdout, "armed\n");
    assert_eq!(out.status.code(), Some(255), "{stderr}");
    containerd.assert_nothing_running();
    assert!(containerd.shim_sockets().is_empty());
    containerd.stop();
}

/// The first line of `file` that `matches`, waiting up to 10 s for it.
fn wait_for_line(file: &std::path::Path, matches: impl Fn(&str) -> bool) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if let Some(line) = text.lines().find(|line| matches(line)) {
            return Some(line.to_owned());
        }
        if Instant::now() > deadline {
            eprintln!("{}:\n{text}", file.display());
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Faults, each with a clear error on ctr's stderr and nothing left: a
/// bad runv config, a malformed OCI spec, an entrypoint that does not
/// exist, and a shim killed while its container runs.
#[test]
fn runv_faults_leave_nothing() {
    let Some(containerd) = started() else { return };
    let dir = containerd.dir().to_owned();
    let stderr = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();

    // A runv config with a key runv does not know.
    let bad_config = dir.join("bad-runv.toml");
    let config = std::fs::read_to_string(containerd.runv_config()).unwrap();
    std::fs::write(&bad_config, format!("no_such_key = 1\n{config}")).unwrap();
    let mut run = containerd.runv_run_args("--rm", &[], "runv-bad-config", &["true"]);
    let config_arg = run
        .iter()
        .position(|&a| a == "--runtime-config-path")
        .unwrap()
        + 1;
    run[config_arg] = bad_config.to_str().unwrap();
    let out = containerd.ctr(&run);
    assert!(!out.status.success());
    let error = stderr(&out);
    for expected in ["no_such_key", "bad-runv.toml", "--runtime-config-path"] {
        assert!(error.contains(expected), "{expected:?} not in {error}");
    }

    // A spec the guest cannot run: a working directory that is not absolute.
    let out = containerd.ctr(&containerd.runv_run_args(
        "--rm",
        &["--cwd", "relative/dir"],
        "runv-bad-spec",
        &["true"],
    ));
    assert!(!out.status.success());
    let error = stderr(&out);
    for expected in ["relative/dir", "absolute"] {
        assert!(error.contains(expected), "{expected:?} not in {error}");
    }

    // The node's network namespace, which a VM cannot share: refused
    // before anything boots.
    let out = containerd.ctr(&containerd.runv_run_args(
        "--rm",
        &["--net-host"],
        "runv-net-host",
        &["true"],
    ));
    assert!(!out.status.success());
    let error = stderr(&out);
    for expected in ["hostNetwork: true", "--net-host", "runc"] {
        assert!(error.contains(expected), "{expected:?} not in {error}");
    }

    // An entrypoint the image does not have.
    let out = runv_run(&containerd, "runv-no-program", &["/no/such/program"]);
    assert!(!out.status.success());
    let error = stderr(&out);
    for expected in ["/no/such/program", "does not exist", "entrypoint"] {
        assert!(error.contains(expected), "{expected:?} not in {error}");
    }
    containerd.assert_nothing_running();

    // kill -9 of the shim while its container runs.
    let id = "runv-shim-killed";
    containerd.ctr_ok(&containerd.runv_run_args("-d", &[], id, &["sleep", "600"]));
    let sockets = containerd.shim_sockets();
    assert_eq!(sockets.len(), 1, "{sockets:?}");
    let running = runv_tests::processes_mentioning(&dir);
    let pid_of = |line: &String| line.split(':').next().unwrap().parse::<i32>().unwrap();
    let shim = running
        .iter()
        .find(|line| line.contains("containerd-shim-runv-v2"))
        .map(pid_of)
        .expect("the shim runs");
    let vm: Vec<u32> = running
        .iter()
        .filter(|line| {
            !line.contains("containerd-shim-runv-v2") && !line.contains("containerd --config")
        })
        .map(|line| pid_of(line) as u32)
        .collect();
    // The builtin VM is in the shim's process; qemu's are processes beside it.
    assert!(
        vm.len() >= runv_tests::vm_helper_programs(false).len(),
        "no hypervisor and helpers found: {running:?}"
    );
    // SAFETY: kill only signals the shim this test found.
    unsafe { libc::kill(shim, libc::SIGKILL) };
    // containerd notices: the task is no longer running.
    let deadline = Instant::now() + Duration::from_secs(30);
    while containerd.ctr_ok(&["task", "ls"]).contains("RUNNING") {
        assert!(
            Instant::now() < deadline,
            "containerd did not notice the dead shim"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = containerd.ctr(&["task", "delete", id]);
    containerd.ctr_ok(&["container", "delete", id]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while vm.iter().any(|&pid| runv_tests::is_running(pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let alive: Vec<_> = vm
        .iter()
        .filter(|&&pid| runv_tests::is_running(pid))
        .collect();
    assert!(
        alive.is_empty(),
        "the VM's processes outlived the shim: {alive:?}"
    );
    // containerd cleans up after the dead shim (its `delete`) on its own.
    let deadline = Instant::now() + Duration::from_secs(10);
    let left = || -> Vec<_> { sockets.iter().filter(|socket| socket.exists()).collect() };
    while !left().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(left().is_empty(), "shim sockets left behind: {:?}", left());
    containerd.assert_nothing_running();
    containerd.stop();
}
