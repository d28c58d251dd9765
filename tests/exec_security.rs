//! Processes exec'd into a runv container are confined as runc confines
//! them (issue 12, docs/security.md): the container's seccomp filter, and
//! the user, capabilities, no_new_privs and rlimits of the exec's own
//! process spec, in the container's cgroup. Checked from inside, through
//! containerd and the runv shim: `ctr task exec` (the container's process
//! spec) and Tasks.Exec with specs of their own (fewer capabilities than
//! the container; a non-root user without no_new_privs, whose filter must
//! go in before its capabilities are dropped).

use std::{fs, path::Path, time::Duration};

use runv_tests::containerd::Containerd;

/// The container's seccomp profile: everything but mkdir, which fails
/// with EPERM ("Operation not permitted"; a uid the directory's mode
/// refuses would get EACCES, "Permission denied", instead).
const PROFILE: &str = r#"{
  "defaultAction": "SCMP_ACT_ALLOW",
  "architectures": ["SCMP_ARCH_X86_64"],
  "syscalls": [
    {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}
  ]
}"#;

/// What a process reports about itself (grep is the shell's child, so it
/// shows what the exec'd process passed on), ending with "end".
const REPORT: &str = "grep -E '^(Uid|NoNewPrivs|Seccomp|CapEff|CapBnd):' /proc/self/status; \
     echo \"nofile $(ulimit -n)\"; \
     [ \"$(cat /proc/self/cgroup)\" = \"$(cat /proc/1/cgroup)\" ] && echo 'cgroup: the container'; \
     mkdir /tmp/made-$$ 2>&1; echo end";

/// Reads `path` until the exec's output has arrived in full ("end").
fn exec_output(path: &Path) -> String {
    for _ in 0..100 {
        let output = fs::read_to_string(path).unwrap_or_default();
        if output.lines().any(|line| line == "end") {
            return output;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "{} never got the exec's whole report: {:?}",
        path.display(),
        fs::read_to_string(path)
    );
}

/// `output` has every one of `expected` as a whole line, whitespace
/// collapsed ("CapEff: 0000000000000021").
fn assert_reports(what: &str, output: &str, expected: &[&str]) {
    let lines: Vec<String> = output
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    for line in expected {
        assert!(
            lines.iter().any(|l| l == line),
            "{what}: expected {line:?} in its report:\n{output}"
        );
    }
}

/// mkdir, denied by the container's filter.
const MKDIR_DENIED: &str = "Operation not permitted";

#[test]
fn exec_gets_the_containers_seccomp_and_its_own_credentials() {
    let Some(containerd) = Containerd::start() else {
        return;
    };
    containerd.import_busybox();
    let profile = containerd.dir().join("deny-mkdir.json");
    fs::write(&profile, PROFILE).unwrap();
    let id = "exec-security";
    containerd.ctr_ok(&containerd.runv_run_args(
        "-d",
        &["--seccomp", "--seccomp-profile", profile.to_str().unwrap()],
        id,
        &["sleep", "600"],
    ));

    // `ctr task exec`: the container's own process spec.
    let plain = containerd.ctr_ok(&["task", "exec", "--exec-id", "plain", id, "sh", "-c", REPORT]);
    println!("ctr task exec:\n{plain}");
    assert_reports(
        "ctr task exec",
        &plain,
        &["Uid: 0 0 0 0", "Seccomp: 2", "cgroup: the container"],
    );
    assert!(
        plain.contains(MKDIR_DENIED),
        "mkdir was not denied:\n{plain}"
    );

    // Fewer capabilities than the container, no_new_privs, an rlimit.
    let root_spec = serde_json::json!({
        "user": {"uid": 0, "gid": 0},
        "args": ["sh", "-c", REPORT],
        "env": ["PATH=/bin"],
        "cwd": "/",
        "capabilities": {
            "bounding": ["CAP_CHOWN", "CAP_KILL"],
            "effective": ["CAP_CHOWN", "CAP_KILL"],
            "permitted": ["CAP_CHOWN", "CAP_KILL"]
        },
        "noNewPrivileges": true,
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 321, "soft": 321}]
    });
    let root_out = containerd.dir().join("exec-root.out");
    containerd.exec_with_spec(id, "few-caps", &root_spec.to_string(), &root_out);
    let root = exec_output(&root_out);
    println!("Tasks.Exec as root with CAP_CHOWN and CAP_KILL:\n{root}");
    assert_reports(
        "the exec with fewer capabilities",
        &root,
        &[
            "Uid: 0 0 0 0",
            "Seccomp: 2",
            "NoNewPrivs: 1",
            // CAP_CHOWN (0) and CAP_KILL (5).
            "CapEff: 0000000000000021",
            "CapBnd: 0000000000000021",
            "nofile 321",
            "cgroup: the container",
        ],
    );
    assert!(root.contains(MKDIR_DENIED), "mkdir was not denied:\n{root}");

    // A non-root user without no_new_privs: the filter is installed while
    // the process still has the capability to, then the capabilities go.
    let user_spec = serde_json::json!({
        "user": {"uid": 1000, "gid": 1000},
        "args": ["sh", "-c", REPORT],
        "env": ["PATH=/bin"],
        "cwd": "/",
        "capabilities": {
            "bounding": ["CAP_CHOWN"],
            "effective": ["CAP_CHOWN"],
            "permitted": ["CAP_CHOWN"]
        }
    });
    let user_out = containerd.dir().join("exec-user.out");
    containerd.exec_with_spec(id, "uid-1000", &user_spec.to_string(), &user_out);
    let user = exec_output(&user_out);
    println!("Tasks.Exec as uid 1000:\n{user}");
    assert_reports(
        "the exec as uid 1000",
        &user,
        &[
            "Uid: 1000 1000 1000 1000",
            "Seccomp: 2",
            "NoNewPrivs: 0",
            // Not root, no ambient capabilities: none survive its execve.
            "CapEff: 0000000000000000",
            "CapBnd: 0000000000000001",
            "cgroup: the container",
        ],
    );
    assert!(user.contains(MKDIR_DENIED), "mkdir was not denied:\n{user}");

    containerd.ctr_ok(&["task", "kill", "--signal", "SIGKILL", id]);
    containerd.wait_stopped(id);
    containerd.ctr_ok(&["task", "delete", id]);
    containerd.ctr_ok(&["container", "delete", id]);
    containerd.stop();
}
