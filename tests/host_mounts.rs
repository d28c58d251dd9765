//! The host side of a pod's shares, attacked from inside its container
//! (issue 12, docs/security.md): read-only volumes and root file systems
//! are read-only on the host and hold against root in the VM remounting
//! them; every runv bind is nosuid,nodev; the exported view cannot be
//! written; nothing is mounted outside runv's tree by a create, a failed
//! create or a delete; and an unprivileged host user reads no pod file and
//! connects to no runv socket.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::{
        fs::{FileTypeExt, PermissionsExt},
        net::UnixStream,
    },
    path::{Path, PathBuf},
};

use runv_tests::containerd::Containerd;

/// `nobody`: what another local user of the node is.
const NOBODY: libc::uid_t = 65534;

/// Every mount point with its options (mountinfo's 5th and 6th fields).
fn mounts() -> BTreeSet<(String, String)> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            (fields[4].to_owned(), fields[5].to_owned())
        })
        .collect()
}

/// Mounts in `after` and not in `before` that lie outside `allowed`.
fn new_mounts_outside(
    before: &BTreeSet<(String, String)>,
    after: &BTreeSet<(String, String)>,
    allowed: &Path,
) -> Vec<String> {
    after
        .difference(before)
        .map(|(point, _)| point.clone())
        .filter(|point| !Path::new(point).starts_with(allowed))
        .collect()
}

/// The options of the mount at `point` (the top one where mounts stack).
fn options_of(point: &Path) -> String {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo
        .lines()
        .rfind(|line| line.split(' ').nth(4) == Some(&*point.to_string_lossy()))
        .and_then(|line| line.split(' ').nth(5))
        .unwrap_or_else(|| panic!("{} is not a mount point", point.display()))
        .to_owned()
}

/// Runs `probe` on a thread of its own whose credentials are `nobody`'s
/// (raw setres[ug]id change only the calling thread, and drop root's
/// capabilities with uid 0).
fn as_nobody<T: Send + 'static>(probe: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: raw syscalls on this thread's own credentials.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
                0
            );
            assert_eq!(
                libc::syscall(libc::SYS_setresgid, NOBODY, NOBODY, NOBODY),
                0
            );
            assert_eq!(
                libc::syscall(libc::SYS_setresuid, NOBODY, NOBODY, NOBODY),
                0
            );
        }
        probe()
    })
    .join()
    .unwrap()
}

/// Every file, directory and socket below `dir` (not following symlinks
/// or entering other file systems' mounts of the container's data).
fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        found.push(path.clone());
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&path, found);
        }
    }
}

#[test]
fn shares_are_confined_on_the_host() {
    let Some(containerd) = Containerd::start() else {
        return;
    };
    containerd.import_busybox();
    // Only runv's own modes may stand between another user and its files.
    fs::set_permissions(containerd.dir(), fs::Permissions::from_mode(0o755)).unwrap();
    let run_dir = containerd.dir().join("run");
    let scratch = tempfile::tempdir().unwrap();
    fs::set_permissions(scratch.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let (ro_dir, rw_dir) = (scratch.path().join("ro"), scratch.path().join("rw"));
    fs::create_dir(&ro_dir).unwrap();
    fs::create_dir(&rw_dir).unwrap();
    fs::write(ro_dir.join("given"), "from the host\n").unwrap();
    // A secret the pod is given read-only, private to root on the host.
    fs::write(rw_dir.join("token"), "secret\n").unwrap();
    fs::set_permissions(rw_dir.join("token"), fs::Permissions::from_mode(0o644)).unwrap();
    let before = mounts();

    // A failed create (a bind source that does not exist) mounts nothing.
    let missing = format!(
        "type=bind,src={},dst=/gone,options=rbind:ro",
        scratch.path().join("missing").display()
    );
    let failed = containerd.ctr(&containerd.runv_run_args(
        "--rm",
        &["--mount", &missing],
        "failed-create",
        &["true"],
    ));
    assert!(
        !failed.status.success(),
        "a create with a missing bind source fails"
    );
    let leaked = new_mounts_outside(&before, &mounts(), Path::new("/nonexistent"));
    assert!(leaked.is_empty(), "a failed create left mounts: {leaked:?}");

    let ro = format!(
        "type=bind,src={},dst=/ro,options=rbind:ro",
        ro_dir.display()
    );
    let rw = format!(
        "type=bind,src={},dst=/rw,options=rbind:rw",
        rw_dir.display()
    );
    let id = "confined";
    containerd.ctr_ok(&containerd.runv_run_args(
        "-d",
        &[
            "--cap-add",
            "CAP_SYS_ADMIN",
            "--read-only",
            "--mount",
            &ro,
            "--mount",
            &rw,
        ],
        id,
        &["sleep", "600"],
    ));

    // The shim (containerd's task pid) runs under its seccomp deny-list.
    let tasks = containerd.ctr_ok(&["task", "ls"]);
    let shim_pid = tasks
        .lines()
        .find_map(|line| line.strip_prefix(id)?.split_whitespace().next())
        .expect("the task's pid");
    let status = fs::read_to_string(format!("/proc/{shim_pid}/status")).unwrap();
    assert!(status.starts_with("Name:\tcontainerd-shim"), "{status}");
    assert!(status.lines().any(|l| l == "Seccomp:\t2"), "{status}");

    // Everything the create mounted is in runv's or containerd's tree.
    let outside = new_mounts_outside(&before, &mounts(), containerd.dir());
    assert!(outside.is_empty(), "mounts outside the trees: {outside:?}");
    let view = fs::read_dir(run_dir.join("pods"))
        .unwrap()
        .flatten()
        .next()
        .expect("a pod directory")
        .path()
        .join("shared");
    let binds: Vec<(String, String)> = mounts()
        .into_iter()
        .filter(|(point, _)| Path::new(point).starts_with(&run_dir))
        .collect();
    println!("runv's binds: {binds:#?}");
    assert!(binds.len() >= 4, "the view, the rootfs and two volumes");
    for (point, options) in &binds {
        assert!(
            options.contains("nosuid") && options.contains("nodev"),
            "{point} is {options}"
        );
    }
    let ro_share = fs::read_dir(view.join(id).join("mounts"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with("-ro"))
        .expect("the ro volume's share");
    for read_only in [view.clone(), view.join(id).join("rootfs"), ro_share] {
        let options = options_of(&read_only);
        assert!(
            options.starts_with("ro,"),
            "{} is {options}",
            read_only.display()
        );
    }

    // Root in the VM, with CAP_SYS_ADMIN, remounts and writes.
    let attack = "mount -o remount,rw /ro; echo x > /ro/given; echo x > /ro/new; \
                  mount -o remount,rw /; echo x > /planted; \
                  cat /ro/given; ls /planted 2>&1; true";
    let out = containerd.ctr_ok(&["task", "exec", "--exec-id", "a1", id, "sh", "-c", attack]);
    println!("attack from the container:\n{out}");
    assert_eq!(
        fs::read_to_string(ro_dir.join("given")).unwrap(),
        "from the host\n"
    );
    assert!(!ro_dir.join("new").exists(), "the ro volume was written");
    assert!(
        !view.join(id).join("rootfs/planted").exists(),
        "the ro rootfs was written"
    );

    // Another user of the host: no pod file readable, no socket reachable.
    let mut paths = Vec::new();
    walk(&run_dir, &mut paths);
    paths.extend(containerd.shim_sockets());
    println!("probing {} paths as nobody", paths.len());
    let kinds: Vec<(PathBuf, fs::FileType)> = paths
        .into_iter()
        .filter_map(|path| Some((path.clone(), fs::symlink_metadata(&path).ok()?.file_type())))
        .collect();
    let reached = as_nobody(move || {
        kinds
            .into_iter()
            .filter(|(path, kind)| {
                if kind.is_dir() {
                    fs::read_dir(path).is_ok()
                } else if kind.is_socket() {
                    UnixStream::connect(path).is_ok()
                } else {
                    fs::read(path).is_ok()
                }
            })
            .map(|(path, _)| path)
            .collect::<Vec<_>>()
    });
    assert!(reached.is_empty(), "nobody reached {reached:?}");

    containerd.ctr_ok(&["task", "kill", "--signal", "SIGKILL", id]);
    containerd.wait_stopped(id);
    containerd.ctr_ok(&["task", "delete", id]);
    containerd.ctr_ok(&["container", "delete", id]);
    let left = new_mounts_outside(&before, &mounts(), Path::new("/nonexistent"));
    assert!(left.is_empty(), "a delete left mounts: {left:?}");
    containerd.assert_nothing_running();
    containerd.stop();
}
