//! Containers on a busybox root file system appended to the agent's
//! initramfs: what tests need to run commands in a pod VM, where the agent
//! has no "exec on the VM" of its own.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use oci_spec::runtime::{Mount, Process, Spec};
use runv_agent_client::{stdio::open_stream, AgentClient};
use runv_protocol::{agent, stdio::StdioStream};
use tokio::{io::AsyncReadExt, net::UnixStream};

/// Where the busybox root file system lies in the guest.
pub const ROOTFS: &str = "/srv/busybox";
pub const PATH_ENV: &str = "PATH=/bin";

/// A root file system at `root`: Debian's static busybox with its applet
/// links, and a root user.
pub fn build_busybox_rootfs(root: &Path) {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.is_file(),
        "/bin/busybox not found: install Debian's busybox-static (scripts/install.sh does)"
    );
    for sub in ["bin", "proc", "sys", "dev", "tmp", "etc", "root"] {
        fs::create_dir_all(root.join(sub)).unwrap();
    }
    fs::copy(busybox, root.join("bin/busybox")).unwrap();
    let applets = Command::new(busybox).arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
    }
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
}

/// The agent's initramfs followed by a second archive holding a busybox
/// root file system at [`ROOTFS`]: the kernel unpacks both. Written to
/// `dir/initramfs.cpio.gz`.
pub fn initramfs_with_busybox_rootfs(dir: &Path, agent_initramfs: &Path) -> PathBuf {
    let stage = tempfile::tempdir_in(dir).unwrap();
    let rootfs = stage.path().join(ROOTFS.trim_start_matches('/'));
    build_busybox_rootfs(&rootfs);
    fs::create_dir(rootfs.join("host")).unwrap();
    let image = dir.join("initramfs.cpio.gz");
    fs::copy(agent_initramfs, &image).unwrap();
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . | cpio --quiet -o -H newc -R 0:0 | gzip -1 >> \"$0\"")
        .arg(&image)
        .current_dir(stage.path())
        .status()
        .expect("running cpio");
    assert!(status.success(), "building the busybox archive failed");
    image
}

/// A process running `args` with busybox's PATH.
pub fn process(args: &[&str], terminal: bool) -> Process {
    let mut process = Process::default();
    process.set_args(Some(args.iter().map(|arg| arg.to_string()).collect()));
    process.set_env(Some(vec![PATH_ENV.into()]));
    process.set_terminal(Some(terminal));
    process
}

/// runc's default spec on the busybox root, writable, running `args`, with
/// `extra_mounts` after the default ones.
pub fn container_spec(args: &[&str], extra_mounts: Vec<Mount>) -> Vec<u8> {
    let mut spec = Spec::default();
    let mut root = spec.root().clone().unwrap();
    root.set_path(PathBuf::from(ROOTFS));
    root.set_readonly(Some(false));
    spec.set_root(Some(root));
    spec.set_process(Some(process(args, false)));
    let mut mounts = spec.mounts().clone().unwrap();
    mounts.extend(extra_mounts);
    spec.set_mounts(Some(mounts));
    serde_json::to_vec(&spec).unwrap()
}

/// A recursive bind mount of the guest's `source` at `destination`.
pub fn bind_mount(source: &str, destination: &str, read_only: bool) -> Mount {
    let mut mount = Mount::default();
    mount.set_destination(PathBuf::from(destination));
    mount.set_typ(Some("bind".into()));
    mount.set_source(Some(PathBuf::from(source)));
    let access = if read_only { "ro" } else { "rw" };
    mount.set_options(Some(vec!["rbind".into(), access.into()]));
    mount
}

/// Everything `stream` carries until its end (at most a minute).
pub async fn read_all(stream: &mut UnixStream) -> Vec<u8> {
    let mut data = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut data))
        .await
        .expect("the stream ends")
        .unwrap();
    data
}

/// What a container printed and how it ended.
#[derive(Debug)]
pub struct Output {
    pub exit_status: u32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs container `id` on the busybox root with `args` and `extra_mounts`
/// to its end, collects its output, and removes it.
pub async fn run_container(
    agent: &AgentClient,
    socket: &Path,
    id: &str,
    args: &[&str],
    extra_mounts: Vec<Mount>,
) -> Output {
    let stdio = agent::Stdio {
        stdout: true,
        stderr: true,
        ..Default::default()
    };
    agent
        .create_container(id, container_spec(args, extra_mounts), stdio)
        .await
        .unwrap_or_else(|e| panic!("creating container {id}: {e}"));
    let mut stdout = open_stream(socket, id, "", StdioStream::Stdout)
        .await
        .unwrap();
    let mut stderr = open_stream(socket, id, "", StdioStream::Stderr)
        .await
        .unwrap();
    agent.start_process(id, "").await.unwrap();
    let (stdout, stderr) = tokio::join!(read_all(&mut stdout), read_all(&mut stderr));
    let exit_status = tokio::time::timeout(Duration::from_secs(60), agent.wait_process(id, ""))
        .await
        .expect("the container ends")
        .unwrap()
        .exit_status;
    agent.remove_container(id).await.unwrap();
    Output {
        exit_status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}
