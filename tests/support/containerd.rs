//! A real containerd for tests: Debian's `containerd` with its own config,
//! root, state and socket in a temporary directory, the runv shim of this
//! build on its PATH, and a busybox image built and imported locally.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use tempfile::TempDir;

use crate::{
    busybox::build_busybox_rootfs,
    cni::{self, TestNetwork},
    cri, processes_mentioning, test_config,
};

/// The image every containerd test runs.
pub const BUSYBOX_IMAGE: &str = "docker.io/runv/busybox:test";

/// How long containerd may take to serve its socket.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long ctr waits to reach containerd: its default, 10 s, is too short
/// for a containerd busy with several pods in an emulated machine (the
/// nested-KVM bed).
const CONNECT_TIMEOUT: &str = "60s";

pub struct Containerd {
    dir: TempDir,
    daemon: Child,
    namespace: String,
    /// With CRI: the pods' network (deleted after the daemon is gone).
    network: Option<TestNetwork>,
    /// Where the shim under test is (on containerd's PATH).
    shim_dir: PathBuf,
}

impl Containerd {
    /// Starts containerd with the runv shim built from this checkout on its
    /// PATH and a runv config (`runv.toml` in its directory) that boots the
    /// test guest images on the test hypervisor. None when the host lacks
    /// containerd (the caller skips).
    pub fn start() -> Option<Containerd> {
        Self::launch(false)
    }

    /// Like [`Containerd::start`], with the CRI plugin serving the runtime
    /// handler `runv` and a local pause image ([`cri`]), in CRI's
    /// namespace `k8s.io`, and a CNI network of the test's own for its
    /// pods ([`Containerd::network`]): runv refuses host-network pods. None
    /// also when the host cannot give pods a CNI network.
    pub fn start_with_cri() -> Option<Containerd> {
        if let Some(why) = cni::unavailable() {
            println!("SKIPPED: CRI pods need a CNI network: {why}");
            return None;
        }
        Self::launch(true)
    }

    fn launch(with_cri: bool) -> Option<Containerd> {
        if Command::new("containerd")
            .arg("--version")
            .output()
            .is_err()
        {
            println!("SKIPPED: containerd not installed (apt-get install containerd runc)");
            return None;
        }
        let shim_dir = build_shim();
        let dir = tempfile::Builder::new()
            .prefix("runv-ctrd")
            .tempdir()
            .unwrap();
        let root = dir.path();
        let plugins = match with_cri {
            true => cri::plugin_config(root),
            false => "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n".into(),
        };
        fs::write(
            root.join("config.toml"),
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n\
                 [grpc]\n  address = \"{0}/containerd.sock\"\n\
                 [ttrpc]\n  address = \"{0}/containerd.sock.ttrpc\"\n{plugins}",
                root.display()
            ),
        )
        .unwrap();
        write_runv_config(root);
        let daemon = spawn_daemon(root, &shim_dir);
        let namespace = match with_cri {
            true => cri::NAMESPACE.to_owned(),
            false => format!("runv-test-{}", std::process::id()),
        };
        let network = with_cri.then(|| {
            let network = TestNetwork::new();
            network.install(root);
            network
        });
        let containerd = Containerd {
            namespace,
            dir,
            daemon,
            network,
            shim_dir,
        };
        containerd.wait_ready();
        Some(containerd)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's PID.
    pub fn pid(&self) -> u32 {
        self.daemon.id()
    }

    /// Kills containerd with `signal` (SIGTERM as a service manager's
    /// restart sends, SIGKILL as a crash) and starts it again on the same
    /// config, root and state; the shims of running tasks live on.
    pub fn restart(&mut self, signal: i32) {
        // SAFETY: kill only signals the daemon this harness started.
        unsafe { libc::kill(self.daemon.id() as i32, signal) };
        let _ = self.daemon.wait();
        self.daemon = spawn_daemon(self.dir.path(), &self.shim_dir);
        self.wait_ready();
    }

    /// The CNI network of a containerd started with CRI.
    pub fn network(&self) -> &TestNetwork {
        self.network
            .as_ref()
            .expect("a containerd started with CRI has a pod network")
    }

    /// The bridge of the CNI network of a containerd started with CRI.
    pub fn bridge(&self) -> Option<&str> {
        self.network.as_ref().map(|network| network.bridge.as_str())
    }

    /// The runv configuration the tests name with `--runtime-config-path`.
    pub fn runv_config(&self) -> PathBuf {
        self.dir().join("runv.toml")
    }

    /// A `ctr` command against this containerd and namespace, for callers
    /// that stream its output.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(self.dir().join("containerd.sock"))
            .args(["--connect-timeout", CONNECT_TIMEOUT])
            .args(["--namespace", &self.namespace])
            .args(args)
            .stdin(Stdio::null());
        command
    }

    /// Runs `ctr` against this containerd and namespace.
    pub fn ctr(&self, args: &[&str]) -> Output {
        let output = self.ctr_command(args).output().expect("running ctr");
        eprintln!(
            "ctr {}: {}\nstdout: {}stderr: {}",
            args.join(" "),
            output.status,
            shown(&output.stdout),
            shown(&output.stderr)
        );
        output
    }

    /// Runs `ctr` and requires success; returns its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let output = self.ctr(args);
        assert!(output.status.success(), "ctr {args:?} failed");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs `ctr` on a pseudo-terminal (`script` from util-linux), as
    /// `--tty` needs, and requires success; returns what the terminal got.
    pub fn ctr_on_tty(&self, args: &[&str]) -> String {
        let address = self.dir().join("containerd.sock");
        let command = format!(
            "ctr --address {} --connect-timeout {CONNECT_TIMEOUT} --namespace {} {}",
            address.display(),
            self.namespace,
            args.join(" ")
        );
        let output = Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .stdin(Stdio::null())
            .output()
            .expect("running script");
        let out = String::from_utf8_lossy(&output.stdout).into_owned();
        eprintln!("{command} (on a tty): {}\noutput: {out}", output.status);
        assert!(output.status.success(), "{command} failed");
        out
    }

    /// The shim sockets of the tasks that exist now, from the `address`
    /// file containerd keeps in each task's bundle.
    pub fn shim_sockets(&self) -> Vec<PathBuf> {
        let tasks = self
            .dir()
            .join("state/io.containerd.runtime.v2.task")
            .join(&self.namespace);
        fs::read_dir(tasks)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|task| fs::read_to_string(task.path().join("address")).ok())
            .map(|address| PathBuf::from(address.trim().trim_start_matches("unix://")))
            .collect()
    }

    /// Sets a task's resources through containerd's Tasks.Update (ctr 1.6
    /// has no `task update`): containerd forwards `resources_json`, the
    /// OCI LinuxResources, to the shim as ctr's Go client would pack them.
    pub fn update_task(&self, id: &str, resources_json: &str) {
        let resources = [
            protobuf_field(
                1,
                b"types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
            ),
            protobuf_field(2, resources_json.as_bytes()),
        ]
        .concat();
        let request = [
            protobuf_field(1, id.as_bytes()),
            protobuf_field(2, &resources),
        ]
        .concat();
        self.grpc_call("Tasks/Update", &request);
    }

    /// Creates the task of container `id` through containerd's
    /// Tasks.Create with `rootfs` as its root file system mounts (`type`,
    /// `source`, `options`), as a snapshotter of block devices would hand
    /// them over, its stdout and stderr going to the file `output`, and
    /// the test's runv config in its runtime options.
    pub fn create_task_with_rootfs(
        &self,
        id: &str,
        rootfs: &[(&str, &str, &[&str])],
        output: &Path,
    ) {
        let mounts = rootfs.iter().map(|(type_, source, options)| {
            let options = options.iter().map(|o| protobuf_field(4, o.as_bytes()));
            let mount = [
                protobuf_field(1, type_.as_bytes()),
                protobuf_field(2, source.as_bytes()),
            ]
            .into_iter()
            .chain(options)
            .collect::<Vec<_>>()
            .concat();
            protobuf_field(3, &mount)
        });
        let output = format!("file://{}", output.display());
        let config = self.runv_config();
        let options = [
            protobuf_field(1, b"runtimeoptions.v1.Options"),
            protobuf_field(2, &protobuf_field(2, config.as_os_str().as_encoded_bytes())),
        ]
        .concat();
        let request = std::iter::once(protobuf_field(1, id.as_bytes()))
            .chain(mounts)
            .chain([
                protobuf_field(5, output.as_bytes()),
                protobuf_field(6, output.as_bytes()),
                protobuf_field(9, &options),
            ])
            .collect::<Vec<_>>()
            .concat();
        self.grpc_call("Tasks/Create", &request);
    }

    /// Starts the init process of container `id`'s task (Tasks.Start).
    pub fn start_task(&self, id: &str) {
        self.grpc_call("Tasks/Start", &protobuf_field(1, id.as_bytes()));
    }

    /// Runs a process in task `id` through Tasks.Exec with `process_json`
    /// (an OCI process, as CRI or a Go client would give it, where `ctr
    /// task exec` can only copy the container's) as its spec, its stdout
    /// and stderr going to the file `output`; waits for it to end and
    /// deletes it.
    pub fn exec_with_spec(&self, id: &str, exec_id: &str, process_json: &str, output: &Path) {
        let output = format!("file://{}", output.display());
        let spec = [
            protobuf_field(
                1,
                b"types.containerd.io/opencontainers/runtime-spec/1/Process",
            ),
            protobuf_field(2, process_json.as_bytes()),
        ]
        .concat();
        let request = [
            protobuf_field(1, id.as_bytes()),
            protobuf_field(3, output.as_bytes()),
            protobuf_field(4, output.as_bytes()),
            protobuf_field(6, &spec),
            protobuf_field(7, exec_id.as_bytes()),
        ]
        .concat();
        self.grpc_call("Tasks/Exec", &request);
        // Start, Wait and DeleteProcess name the process the same way.
        let process = [
            protobuf_field(1, id.as_bytes()),
            protobuf_field(2, exec_id.as_bytes()),
        ]
        .concat();
        for method in ["Tasks/Start", "Tasks/Wait", "Tasks/DeleteProcess"] {
            self.grpc_call(method, &process);
        }
    }

    /// Calls `containerd.services.tasks.v1.<method>` with the protobuf
    /// `request` through curl's HTTP/2 on containerd's socket, and requires
    /// gRPC status 0.
    fn grpc_call(&self, method: &str, request: &[u8]) {
        // A gRPC message: uncompressed, then its length, then the message.
        let mut body = vec![0];
        body.extend_from_slice(&(request.len() as u32).to_be_bytes());
        body.extend_from_slice(request);
        let body_file = self.dir().join("grpc-request.bin");
        fs::write(&body_file, body).unwrap();
        let output = Command::new("curl")
            .args(["--silent", "--show-error", "--http2-prior-knowledge"])
            .arg("--unix-socket")
            .arg(self.dir().join("containerd.sock"))
            .args(["--header", "content-type: application/grpc"])
            .args(["--header", "te: trailers"])
            .args([
                "--header",
                &format!("containerd-namespace: {}", self.namespace),
            ])
            .arg("--data-binary")
            .arg(format!("@{}", body_file.display()))
            .args(["--dump-header", "-", "--output", "/dev/null"])
            .arg(format!(
                "http://containerd/containerd.services.tasks.v1.{method}"
            ))
            .output()
            .expect("running curl");
        fs::remove_file(&body_file).unwrap();
        let headers = String::from_utf8_lossy(&output.stdout);
        eprintln!("{method}: {headers}");
        assert!(
            headers.lines().any(|line| line.trim() == "grpc-status: 0"),
            "{method} failed: {headers}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The arguments of `ctr run` of the busybox image on runv with the
    /// test's runv config: `mode` is `--rm` or `-d`, `options` come before
    /// the image.
    pub fn runv_run_args<'a>(
        &self,
        mode: &'a str,
        options: &[&'a str],
        id: &'a str,
        args: &[&'a str],
    ) -> Vec<&'a str> {
        self.runv_run_image_args(mode, options, BUSYBOX_IMAGE, id, args)
    }

    /// The same for another image.
    pub fn runv_run_image_args<'a>(
        &self,
        mode: &'a str,
        options: &[&'a str],
        image: &'a str,
        id: &'a str,
        args: &[&'a str],
    ) -> Vec<&'a str> {
        let config = self.runv_config().to_string_lossy().into_owned();
        let mut full = vec![
            "run",
            mode,
            "--runtime",
            "io.containerd.runv.v2",
            "--runtime-config-path",
            // ctr's arguments live for the test; the config path with them.
            Box::leak(config.into_boxed_str()),
        ];
        full.extend_from_slice(options);
        full.extend_from_slice(&[image, id]);
        full.extend_from_slice(args);
        full
    }

    /// Waits (at most 120 s: a guest under TCG, sharing the host's CPUs
    /// with other tests' guests, can take long) until task `id` has stopped.
    pub fn wait_stopped(&self, id: &str) {
        for _ in 0..1200 {
            let tasks = self.ctr_ok(&["task", "ls"]);
            if tasks
                .lines()
                .any(|l| l.starts_with(id) && l.contains("STOPPED"))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("task {id} did not stop");
    }

    /// No shim, hypervisor or helper runs for this containerd, and nothing
    /// is mounted under its directory (containerd itself aside).
    pub fn assert_nothing_running(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let left = loop {
            let left: Vec<_> = processes_mentioning(self.dir())
                .into_iter()
                .filter(|line| !line.contains("containerd --config"))
                .collect();
            if left.is_empty() || Instant::now() > deadline {
                break left;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(left.is_empty(), "processes left behind: {left:?}");
        let mounts = mounts_under(self.dir());
        assert!(mounts.is_empty(), "mounts left behind: {mounts:?}");
    }

    /// Builds the busybox image and imports it.
    pub fn import_busybox(&self) {
        self.import_image(&build_busybox_image(self.dir()));
    }

    /// Imports an OCI image layout archive.
    pub fn import_image(&self, archive: &Path) {
        self.ctr_ok(&["images", "import", archive.to_str().unwrap()]);
    }

    fn wait_ready(&self) {
        let started = Instant::now();
        loop {
            let version = Command::new("ctr")
                .arg("--address")
                .arg(self.dir().join("containerd.sock"))
                .arg("version")
                .output()
                .unwrap();
            if version.status.success() {
                return;
            }
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "containerd did not come up: {}",
                fs::read_to_string(self.dir().join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops containerd and asserts that nothing is left: no containerd,
    /// shim, qemu or virtiofsd process referring to the directory, and no
    /// mount under it.
    pub fn stop(mut self) {
        // SAFETY: kill only signals the daemon this harness started.
        unsafe { libc::kill(self.daemon.id() as i32, libc::SIGTERM) };
        let _ = self.daemon.wait();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut left = processes_mentioning(self.dir());
        while !left.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            left = processes_mentioning(self.dir());
        }
        let mounts = mounts_under(self.dir());
        let log = fs::read_to_string(self.dir().join("containerd.log")).unwrap_or_default();
        // Clean up before asserting, so a failure leaves nothing running.
        for process in &left {
            if let Some(pid) = process
                .split(':')
                .next()
                .and_then(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill only signals processes that mention our directory.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for mount in mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(mount).status();
        }
        assert!(
            left.is_empty(),
            "processes left behind: {left:?}\ncontainerd log:\n{log}"
        );
        assert!(mounts.is_empty(), "mounts left behind: {mounts:?}");
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // A test that failed before `stop`: end the daemon, its shims and
        // their VMs, and lift the mounts, so the temp dir can go.
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        for process in processes_mentioning(self.dir.path()) {
            if let Some(pid) = process
                .split(':')
                .next()
                .and_then(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill only signals processes that mention our directory.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for mount in mounts_under(self.dir.path()).iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(mount).status();
        }
    }
}

/// Starts containerd on the config in `root`, with the shim in `shim_dir`
/// first on its PATH, appending to `root/containerd.log`.
fn spawn_daemon(root: &Path, shim_dir: &Path) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("containerd.log"))
        .unwrap();
    let path = format!(
        "{}:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        shim_dir.display()
    );
    Command::new("containerd")
        .arg("--config")
        .arg(root.join("config.toml"))
        .env("PATH", path)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting containerd")
}

/// A length-delimited protobuf field (a string, bytes or a message).
fn protobuf_field(number: u32, content: &[u8]) -> Vec<u8> {
    let mut field = Vec::new();
    for mut value in [u64::from(number << 3 | 2), content.len() as u64] {
        while value >= 0x80 {
            field.push(value as u8 | 0x80);
            value >>= 7;
        }
        field.push(value as u8);
    }
    field.extend_from_slice(content);
    field
}

/// At most the first 4 KiB of a command's output, for the test log.
fn shown(output: &[u8]) -> std::borrow::Cow<'_, str> {
    const SHOWN: usize = 4096;
    match output.len() > SHOWN {
        true => format!(
            "{}... ({} bytes)\n",
            String::from_utf8_lossy(&output[..SHOWN]),
            output.len()
        )
        .into(),
        false => String::from_utf8_lossy(output),
    }
}

/// Mount points under `dir`, outermost first.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|point| Path::new(point).starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// The directory that holds containerd-shim-runv-v2: `RUNV_TEST_SHIM_DIR`
/// when set (a shim built beforehand, as in the nested-KVM bed, which has
/// no cargo of its own to build with), else the shim built here with the
/// cargo running the tests, into the same target directory.
fn build_shim() -> PathBuf {
    if let Some(dir) = std::env::var_os("RUNV_TEST_SHIM_DIR") {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join("containerd-shim-runv-v2").is_file(),
            "RUNV_TEST_SHIM_DIR={} has no containerd-shim-runv-v2",
            dir.display()
        );
        return dir;
    }
    // The test binary is <target>/<profile>/deps/<test>.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_owned();
    let target_dir = profile_dir.parent().unwrap();
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build
        .args([
            "build",
            "--quiet",
            "-p",
            "runv-shim",
            "--bin",
            "containerd-shim-runv-v2",
        ])
        .arg("--target-dir")
        .arg(target_dir);
    if profile_dir
        .file_name()
        .is_some_and(|name| name == "release")
    {
        build.arg("--release");
    }
    let status = build.status().expect("running cargo build for the shim");
    assert!(status.success(), "building containerd-shim-runv-v2 failed");
    assert!(profile_dir.join("containerd-shim-runv-v2").is_file());
    profile_dir
}

/// The runv configuration of the test guest on the test hypervisor, with
/// its VM directories under `dir`. `[vm]` comes last, for tests that add
/// keys of it.
fn write_runv_config(dir: &Path) {
    let config = test_config(dir);
    let builtin = match &config.builtin.root_image {
        Some(image) => format!("[builtin]\nroot_image = \"{}\"\n", image.display()),
        None => String::new(),
    };
    let text = format!(
        "hypervisor = \"{}\"\nlog_level = \"info\"\nrun_dir = \"{}\"\n\
         {builtin}[qemu]\nallow_tcg = {}\n[vm]\n\
         kernel = \"{}\"\ninitramfs = \"{}\"\nvcpus = {}\nmemory_mib = {}\n\
         agent_timeout_secs = {}\n",
        config.hypervisor,
        config.run_dir.display(),
        config.qemu.allow_tcg,
        config.vm.kernel.display(),
        config.vm.initramfs.display(),
        config.vm.vcpus,
        config.vm.memory_mib,
        config.vm.agent_timeout_secs,
    );
    fs::write(dir.join("runv.toml"), text).unwrap();
}

/// An OCI image layout archive of Debian's static busybox with its applet
/// links, named [`BUSYBOX_IMAGE`].
pub fn build_busybox_image(dir: &Path) -> PathBuf {
    build_busybox_based_image(dir, BUSYBOX_IMAGE, &[], &["sh"])
}

/// An OCI image layout archive `dir/<name's tag>-oci.tar` of busybox (see
/// [`build_busybox_image`]) named `name`, with the given `Entrypoint` and
/// `Cmd`.
pub fn build_busybox_based_image(
    dir: &Path,
    name: &str,
    entrypoint: &[&str],
    cmd: &[&str],
) -> PathBuf {
    build_busybox_image_with_files(dir, name, entrypoint, cmd, &[])
}

/// Like [`build_busybox_based_image`], with copies of the host's `files`
/// (absolute paths) at the same paths in the image: a symbolic link is
/// copied as the file it points to. For a dynamically linked host program,
/// pass it with the libraries and the loader `ldd` names.
pub fn build_busybox_image_with_files(
    dir: &Path,
    name: &str,
    entrypoint: &[&str],
    cmd: &[&str],
    files: &[PathBuf],
) -> PathBuf {
    let stem = name.rsplit('/').next().unwrap().replace(':', "-");
    let work = dir.join(format!("image-{stem}"));
    let root = work.join("rootfs");
    build_busybox_rootfs(&root);
    for file in files {
        let inside = root.join(file.strip_prefix("/").expect("an absolute path"));
        fs::create_dir_all(inside.parent().unwrap()).unwrap();
        fs::copy(file, &inside)
            .unwrap_or_else(|e| panic!("copying {} into the image: {e}", file.display()));
    }
    let layout = work.join("layout");
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();

    let layer_tar = work.join("layer.tar");
    run_ok(
        Command::new("tar")
            .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
            .arg(&root)
            .arg("-cf")
            .arg(&layer_tar)
            .arg("."),
    );
    let diff_id = sha256(&fs::read(&layer_tar).unwrap());
    run_ok(Command::new("gzip").args(["-n", "-1"]).arg(&layer_tar));
    let layer = fs::read(work.join("layer.tar.gz")).unwrap();
    let layer_digest = add_blob(&blobs, &layer);

    let (entrypoint, cmd) = (serde_json::json!(entrypoint), serde_json::json!(cmd));
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],"Entrypoint":{entrypoint},"Cmd":{cmd}}},"rootfs":{{"type":"layers","diff_ids":["sha256:{diff_id}"]}}}}"#
    );
    let config_digest = add_blob(&blobs, config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:{layer_digest}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    let manifest_digest = add_blob(&blobs, manifest.as_bytes());
    fs::write(
        layout.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{manifest_digest}","size":{},"platform":{{"architecture":"amd64","os":"linux"}},"annotations":{{"io.containerd.image.name":"{name}","org.opencontainers.image.ref.name":"test"}}}}]}}"#,
            manifest.len()
        ),
    )
    .unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let archive = dir.join(format!("{stem}-oci.tar"));
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(&archive)
            .arg("."),
    );
    fs::remove_dir_all(&work).unwrap();
    archive
}

fn add_blob(blobs: &Path, content: &[u8]) -> String {
    let digest = sha256(content);
    fs::write(blobs.join(&digest), content).unwrap();
    digest
}

fn sha256(content: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), content).unwrap();
    let output = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn run_ok(command: &mut Command) {
    let status = command.status().unwrap();
    assert!(status.success(), "{command:?} failed");
}
