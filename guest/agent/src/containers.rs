//! The pod's containers and their processes, as the agent protocol names
//! them: what exists, in which state, and the order of operations around
//! the OCI runtime (stdio attached before start, exit statuses watched
//! from the moment a process exists, one runtime call at a time).

use std::{
    collections::HashMap,
    fs,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::Duration,
};

use nix::{
    errno::Errno,
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use oci_spec::runtime::{LinuxResources, Process as OciProcess, Spec};
use runv_protocol::{agent, stdio::StreamHeader};
use ttrpc::Code;

use crate::{
    cgroup_stats, network,
    oci_runtime::{ChildStdio, OciRuntime},
    process_io::{ChildPipes, Connection, ProcessIo, Streams},
    reaper::{Exit, ExitWatch, Reaper},
    shared_pid,
    tty::ConsoleSocket,
};

/// How long StartProcess waits for the host's stdio connections.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the agent keeps its container files (bundles, exec process
/// specs, console sockets) and libcontainer its state.
const AGENT_RUN_DIR: &str = "/run/runv";

/// Longest container or exec ID: containerd's limit.
const MAX_ID_LEN: usize = 76;

/// A failed request: what went wrong, and whose fault it is.
#[derive(Debug)]
pub struct Failure {
    pub code: Code,
    pub message: String,
}

fn failure(code: Code, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

type Result<T> = std::result::Result<T, Failure>;

pub struct Containers {
    runtime: Arc<OciRuntime>,
    reaper: Arc<Reaper>,
    dirs: Dirs,
    table: Mutex<HashMap<String, Arc<Container>>>,
    /// One runtime call at a time: a process it clones copies every open
    /// descriptor of the agent, and must not hold another process's
    /// half-made stdio.
    serial: tokio::sync::Mutex<()>,
    console_sockets: AtomicU64,
}

struct Dirs {
    bundles: PathBuf,
    consoles: PathBuf,
}

struct Container {
    bundle: PathBuf,
    /// By exec ID; the init process under "".
    processes: Mutex<HashMap<String, Arc<Process>>>,
}

struct Process {
    io: ProcessIo,
    pid: OnceLock<Pid>,
    exit: OnceLock<ExitWatch>,
    started: AtomicBool,
    /// An exec process until it starts: its spec and its child's stdio.
    pending_exec: Mutex<Option<PendingExec>>,
}

struct PendingExec {
    spec_file: PathBuf,
    stdio: PendingStdio,
}

enum PendingStdio {
    Pipes(ChildPipes),
    Terminal(ConsoleSocket),
}

impl Process {
    fn new(io: ProcessIo) -> Process {
        Process {
            io,
            pid: OnceLock::new(),
            exit: OnceLock::new(),
            started: AtomicBool::new(false),
            pending_exec: Mutex::new(None),
        }
    }

    fn exited(&self) -> Option<Exit> {
        *self.exit.get()?.borrow()
    }

    /// Started and not ended yet.
    fn is_running(&self) -> bool {
        self.started.load(Ordering::SeqCst) && self.exit.get().is_some() && self.exited().is_none()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The name of a process in messages.
fn process_name(container_id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        format!("the init process of container {container_id}")
    } else {
        format!("exec process {exec_id} of container {container_id}")
    }
}

/// IDs become file names: containerd's alphabet only.
fn check_id(what: &str, id: &str) -> Result<()> {
    let valid = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if valid {
        Ok(())
    } else {
        Err(failure(
            Code::INVALID_ARGUMENT,
            format!(
                "{what} {id:?} is not a valid ID: 1 to {MAX_ID_LEN} of [A-Za-z0-9_.-], \
                 not starting with a dot"
            ),
        ))
    }
}

impl Containers {
    pub fn new(reaper: Arc<Reaper>) -> Containers {
        let run_dir = PathBuf::from(AGENT_RUN_DIR);
        Containers {
            runtime: Arc::new(OciRuntime::new(run_dir.join("oci"))),
            reaper,
            dirs: Dirs {
                bundles: run_dir.join("bundles"),
                consoles: run_dir.join("consoles"),
            },
            table: Mutex::default(),
            serial: tokio::sync::Mutex::new(()),
            console_sockets: AtomicU64::new(0),
        }
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.table)
            .get(id)
            .cloned()
            .ok_or_else(|| failure(Code::NOT_FOUND, format!("container {id} does not exist")))
    }

    fn process(&self, container_id: &str, exec_id: &str) -> Result<Arc<Process>> {
        let container = self.container(container_id)?;
        let process = lock(&container.processes).get(exec_id).cloned();
        process.ok_or_else(|| {
            failure(
                Code::NOT_FOUND,
                format!("{} does not exist", process_name(container_id, exec_id)),
            )
        })
    }

    /// Runs a runtime call off the async runtime, alone, with orphans held.
    async fn run<T: Send + 'static>(
        &self,
        what: &str,
        call: impl FnOnce(&OciRuntime) -> std::result::Result<T, String> + Send + 'static,
    ) -> Result<T> {
        let _serial = self.serial.lock().await;
        let _hold = self.reaper.hold_orphans();
        self.blocking(what, call).await
    }

    /// Runs a runtime call that creates a process, and watches the process
    /// before any reaping can take it.
    async fn run_spawning(
        &self,
        what: &str,
        call: impl FnOnce(&OciRuntime) -> std::result::Result<Pid, String> + Send + 'static,
    ) -> Result<(Pid, ExitWatch)> {
        let _serial = self.serial.lock().await;
        let hold = self.reaper.hold_orphans();
        let pid = self.blocking(what, call).await?;
        let exit = self.reaper.watch(pid);
        drop(hold);
        Ok((pid, exit))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        what: &str,
        call: impl FnOnce(&OciRuntime) -> std::result::Result<T, String> + Send + 'static,
    ) -> Result<T> {
        let runtime = self.runtime.clone();
        tokio::task::spawn_blocking(move || call(&runtime))
            .await
            .map_err(|e| failure(Code::INTERNAL, format!("{what}: runtime task failed: {e}")))?
            .map_err(|e| failure(Code::INTERNAL, format!("{what}: {e}")))
    }

    fn console_socket(&self) -> Result<ConsoleSocket> {
        let n = self.console_sockets.fetch_add(1, Ordering::Relaxed);
        fs::create_dir_all(&self.dirs.consoles)
            .and_then(|()| ConsoleSocket::bind(self.dirs.consoles.join(format!("{n}.sock"))))
            .map_err(|e| failure(Code::INTERNAL, format!("creating a console socket: {e}")))
    }

    /// The process's stdio: its agent side, and what the runtime hands the
    /// child.
    fn prepare_stdio(&self, stdio: &agent::Stdio) -> Result<(ProcessIo, PendingStdio)> {
        let streams = Streams::from_request(stdio);
        if streams.terminal {
            Ok((
                ProcessIo::for_terminal(streams),
                PendingStdio::Terminal(self.console_socket()?),
            ))
        } else {
            let (io, pipes) = ProcessIo::with_pipes(streams).map_err(|e| {
                failure(
                    Code::INTERNAL,
                    format!("creating the process's stdio pipes: {e}"),
                )
            })?;
            Ok((io, PendingStdio::Pipes(pipes)))
        }
    }

    pub async fn create_container(&self, request: agent::CreateContainerRequest) -> Result<()> {
        let id = request.container_id;
        check_id("container ID", &id)?;
        if lock(&self.table).contains_key(&id) {
            return Err(failure(
                Code::ALREADY_EXISTS,
                format!("container {id} already exists"),
            ));
        }
        let stdio = request.stdio.into_option().unwrap_or_default();
        let spec = container_spec(&id, &request.oci_spec_json, stdio.terminal)?;
        let bundle = self.dirs.bundles.join(&id);
        write_json(&bundle, "config.json", &spec)?;
        let created = self.create_init(&id, &bundle, &stdio).await;
        match created {
            Ok(init) => {
                if !shared_pid::has_own_namespace(&spec) {
                    self.kill_leftovers_after(&id, &init);
                }
                let container = Container {
                    bundle,
                    processes: Mutex::new(HashMap::from([(String::new(), Arc::new(init))])),
                };
                lock(&self.table).insert(id.clone(), Arc::new(container));
                tracing::info!(container = %id, "container created");
                Ok(())
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&bundle);
                Err(e)
            }
        }
    }

    /// See `shared_pid`. A container whose cgroup is unknown still runs;
    /// its leftovers then keep it until they end.
    fn kill_leftovers_after(&self, id: &str, init: &Process) {
        let exit = init.exit.get().expect("a created init is watched").clone();
        match self.runtime.cgroup_dir(id) {
            Ok(cgroup_dir) => shared_pid::kill_leftovers_after(exit, id.to_owned(), cgroup_dir),
            Err(e) => {
                tracing::warn!(container = %id, error = %e, "no cgroup to clean up after its init")
            }
        }
    }

    async fn create_init(
        &self,
        id: &str,
        bundle: &std::path::Path,
        stdio: &agent::Stdio,
    ) -> Result<Process> {
        let (io, child) = self.prepare_stdio(stdio)?;
        let (pid, exit, console) = {
            let (id, bundle) = (id.to_owned(), bundle.to_owned());
            match child {
                PendingStdio::Pipes(pipes) => {
                    let call = move |runtime: &OciRuntime| {
                        runtime.create(&id, &bundle, ChildStdio::Pipes(pipes))
                    };
                    let (pid, exit) = self.run_spawning("creating the container", call).await?;
                    (pid, exit, None)
                }
                PendingStdio::Terminal(socket) => {
                    let path = socket.path().to_owned();
                    let call = move |runtime: &OciRuntime| {
                        runtime.create(&id, &bundle, ChildStdio::Terminal(&path))
                    };
                    let (pid, exit) = self.run_spawning("creating the container", call).await?;
                    (pid, exit, Some(socket))
                }
            }
        };
        let init = Process::new(io);
        let _ = init.pid.set(pid);
        let _ = init.exit.set(exit);
        if let Some(socket) = console {
            take_terminal(&init.io, socket)?;
        }
        Ok(init)
    }

    pub async fn exec_process(&self, request: agent::ExecProcessRequest) -> Result<()> {
        let (id, exec_id) = (request.container_id, request.exec_id);
        check_id("exec ID", &exec_id)?;
        let container = self.container(&id)?;
        let init = self.process(&id, "")?;
        if !init.is_running() {
            return Err(failure(
                Code::FAILED_PRECONDITION,
                format!("cannot exec in container {id}: its init process is not running"),
            ));
        }
        if lock(&container.processes).contains_key(&exec_id) {
            return Err(failure(
                Code::ALREADY_EXISTS,
                format!("{} already exists", process_name(&id, &exec_id)),
            ));
        }
        let stdio = request.stdio.into_option().unwrap_or_default();
        let mut process: OciProcess =
            serde_json::from_slice(&request.oci_process_json).map_err(|e| {
                failure(
                    Code::INVALID_ARGUMENT,
                    format!(
                        "the OCI process of exec {exec_id} in container {id} is not valid: {e}"
                    ),
                )
            })?;
        check_process(&process, None, &format!("exec {exec_id} in container {id}"))?;
        process.set_terminal(Some(stdio.terminal));
        let spec_file = write_json(&container.bundle, &format!("exec-{exec_id}.json"), &process)?;
        let (io, stdio) = self.prepare_stdio(&stdio)?;
        let process = Process::new(io);
        *lock(&process.pending_exec) = Some(PendingExec { spec_file, stdio });
        lock(&container.processes).insert(exec_id.clone(), Arc::new(process));
        tracing::info!(container = %id, exec = %exec_id, "exec process created");
        Ok(())
    }

    /// Attaches a stdio connection of a created process.
    pub fn attach(&self, header: &StreamHeader, connection: Box<dyn Connection>) -> Result<()> {
        let process = self.process(&header.container_id, &header.exec_id)?;
        process.io.attach(header.stream, connection).map_err(|e| {
            failure(
                Code::FAILED_PRECONDITION,
                format!(
                    "{}: {e}",
                    process_name(&header.container_id, &header.exec_id)
                ),
            )
        })
    }

    pub async fn start_process(&self, container_id: &str, exec_id: &str) -> Result<u32> {
        let process = self.process(container_id, exec_id)?;
        let name = process_name(container_id, exec_id);
        if process.started.swap(true, Ordering::SeqCst) {
            return Err(failure(
                Code::FAILED_PRECONDITION,
                format!("{name} was already started"),
            ));
        }
        if let Err(e) = process.io.wait_attached(ATTACH_TIMEOUT).await {
            process.started.store(false, Ordering::SeqCst);
            return Err(failure(
                Code::DEADLINE_EXCEEDED,
                format!("cannot start {name}: {e}"),
            ));
        }
        let pending = lock(&process.pending_exec).take();
        let pid = match pending {
            None => {
                start_copying(&process.io, &name)?;
                let id = container_id.to_owned();
                self.run(&format!("starting {name}"), move |runtime| {
                    runtime.start(&id)
                })
                .await?;
                *process
                    .pid
                    .get()
                    .expect("an init process has its PID from creation")
            }
            Some(exec) => self.start_exec(container_id, &process, exec, &name).await?,
        };
        tracing::info!(container = %container_id, exec = %exec_id, pid = pid.as_raw(), "process started");
        Ok(pid.as_raw() as u32)
    }

    async fn start_exec(
        &self,
        container_id: &str,
        process: &Process,
        exec: PendingExec,
        name: &str,
    ) -> Result<Pid> {
        let id = container_id.to_owned();
        let spec_file = exec.spec_file;
        let what = format!("starting {name}");
        let (pid, exit) = match exec.stdio {
            PendingStdio::Pipes(pipes) => {
                let call = move |runtime: &OciRuntime| {
                    runtime.exec(&id, &spec_file, ChildStdio::Pipes(pipes))
                };
                self.run_spawning(&what, call).await?
            }
            PendingStdio::Terminal(socket) => {
                let path = socket.path().to_owned();
                let call = move |runtime: &OciRuntime| {
                    runtime.exec(&id, &spec_file, ChildStdio::Terminal(&path))
                };
                let spawned = self.run_spawning(&what, call).await?;
                take_terminal(&process.io, socket)?;
                spawned
            }
        };
        let _ = process.pid.set(pid);
        let _ = process.exit.set(exit);
        start_copying(&process.io, name)?;
        Ok(pid)
    }

    pub async fn signal_process(&self, request: agent::SignalProcessRequest) -> Result<()> {
        let (id, exec_id) = (request.container_id, request.exec_id);
        let signal = Signal::try_from(request.signal as i32).map_err(|_| {
            failure(
                Code::INVALID_ARGUMENT,
                format!("{} is not a signal", request.signal),
            )
        })?;
        if request.all {
            self.container(&id)?;
            let container_id = id.clone();
            return self
                .run(
                    &format!("signalling every process of container {id}"),
                    move |runtime| runtime.kill_all(&container_id, signal),
                )
                .await;
        }
        let process = self.process(&id, &exec_id)?;
        let name = process_name(&id, &exec_id);
        let Some(&pid) = process.pid.get() else {
            return Err(failure(
                Code::FAILED_PRECONDITION,
                format!("{name} is not started"),
            ));
        };
        if process.exited().is_some() {
            return Err(failure(
                Code::NOT_FOUND,
                format!("{name} has already exited"),
            ));
        }
        match kill(pid, signal) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(failure(
                Code::INTERNAL,
                format!("signalling {name} with {signal}: {e}"),
            )),
        }
    }

    /// The process's end, once its output is all sent.
    pub async fn wait_process(&self, container_id: &str, exec_id: &str) -> Result<Exit> {
        let process = self.process(container_id, exec_id)?;
        let Some(exit) = process.exit.get() else {
            return Err(failure(
                Code::FAILED_PRECONDITION,
                format!("{} is not started", process_name(container_id, exec_id)),
            ));
        };
        let mut exit = exit.clone();
        let ended = exit
            .wait_for(Option::is_some)
            .await
            .map(|exit| exit.expect("waited for an exit"))
            .map_err(|_| failure(Code::INTERNAL, "the reaper stopped"))?;
        process
            .io
            .wait_drained(process.started.load(Ordering::SeqCst))
            .await;
        Ok(ended)
    }

    pub fn resize_tty(&self, request: &agent::ResizeTtyRequest) -> Result<()> {
        let process = self.process(&request.container_id, &request.exec_id)?;
        process
            .io
            .resize(request.width, request.height)
            .map_err(|e| {
                failure(
                    Code::FAILED_PRECONDITION,
                    format!(
                        "resizing the terminal of {}: {e}",
                        process_name(&request.container_id, &request.exec_id)
                    ),
                )
            })
    }

    pub fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<()> {
        let process = self.process(container_id, exec_id)?;
        if !process.io.streams().stdin {
            return Err(failure(
                Code::FAILED_PRECONDITION,
                format!("{} has no stdin", process_name(container_id, exec_id)),
            ));
        }
        process.io.close_stdin();
        Ok(())
    }

    pub fn delete_process(&self, container_id: &str, exec_id: &str) -> Result<()> {
        if exec_id.is_empty() {
            return Err(failure(
                Code::INVALID_ARGUMENT,
                format!("the init process of container {container_id} goes with RemoveContainer"),
            ));
        }
        let container = self.container(container_id)?;
        let process = self.process(container_id, exec_id)?;
        if process.is_running() {
            return Err(failure(
                Code::FAILED_PRECONDITION,
                format!("{} is still running", process_name(container_id, exec_id)),
            ));
        }
        lock(&container.processes).remove(exec_id);
        let _ = fs::remove_file(container.bundle.join(format!("exec-{exec_id}.json")));
        Ok(())
    }

    pub async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>> {
        self.container(container_id)?;
        let id = container_id.to_owned();
        self.run(
            &format!("listing the processes of container {container_id}"),
            move |runtime| runtime.pids(&id),
        )
        .await
    }

    pub async fn pause(&self, container_id: &str) -> Result<()> {
        self.container(container_id)?;
        let id = container_id.to_owned();
        self.run(
            &format!("pausing container {container_id}"),
            move |runtime| runtime.pause(&id),
        )
        .await
    }

    pub async fn resume(&self, container_id: &str) -> Result<()> {
        self.container(container_id)?;
        let id = container_id.to_owned();
        self.run(
            &format!("resuming container {container_id}"),
            move |runtime| runtime.resume(&id),
        )
        .await
    }

    pub async fn update(&self, request: agent::UpdateContainerRequest) -> Result<()> {
        let id = request.container_id;
        self.container(&id)?;
        let resources: LinuxResources =
            serde_json::from_slice(&request.resources_json).map_err(|e| {
                failure(
                    Code::INVALID_ARGUMENT,
                    format!(
                        "the resources for container {id} are not valid OCI LinuxResources: {e}"
                    ),
                )
            })?;
        let container_id = id.clone();
        self.run(
            &format!("updating the resources of container {id}"),
            move |runtime| runtime.update(&container_id, &resources),
        )
        .await
    }

    pub async fn stats(&self, container_id: &str) -> Result<agent::ContainerStats> {
        self.container(container_id)?;
        let id = container_id.to_owned();
        self.blocking(
            &format!("reading the statistics of container {container_id}"),
            move |runtime| {
                let dir = runtime.cgroup_dir(&id)?;
                let mut stats = cgroup_stats::read(&dir).map_err(|e| e.to_string())?;
                // The VM's interfaces, which every container shares.
                stats.network = network::pod_interface_stats()
                    .map_err(|e| format!("reading the network statistics: {e}"))?;
                Ok(stats)
            },
        )
        .await
    }

    pub async fn remove_container(&self, container_id: &str) -> Result<()> {
        let container = self.container(container_id)?;
        let running: Vec<String> = lock(&container.processes)
            .iter()
            .filter(|(_, process)| process.is_running())
            .map(|(exec_id, process)| {
                let pid = process.pid.get().map_or(0, |pid| pid.as_raw());
                format!("{} (PID {pid})", process_name(container_id, exec_id))
            })
            .collect();
        if !running.is_empty() {
            return Err(failure(
                Code::FAILED_PRECONDITION,
                format!(
                    "container {container_id} is running: {}; stop its processes first",
                    running.join(", ")
                ),
            ));
        }
        let id = container_id.to_owned();
        self.run(
            &format!("removing container {container_id}"),
            move |runtime| runtime.delete(&id),
        )
        .await?;
        lock(&self.table).remove(container_id);
        fs::remove_dir_all(&container.bundle).map_err(|e| {
            failure(
                Code::INTERNAL,
                format!(
                    "removing the bundle {} of container {container_id}: {e}",
                    container.bundle.display()
                ),
            )
        })?;
        tracing::info!(container = %container_id, "container removed");
        Ok(())
    }
}

/// The container's spec, checked for what the agent needs, with the
/// terminal the host asked for and a cgroup of its own.
fn container_spec(id: &str, json: &[u8], terminal: bool) -> Result<Spec> {
    let invalid = |message: String| failure(Code::INVALID_ARGUMENT, message);
    let mut spec: Spec = serde_json::from_slice(json)
        .map_err(|e| invalid(format!("the OCI spec of container {id} is not valid: {e}")))?;
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| invalid(format!("the OCI spec of container {id} has no root")))?
        .path()
        .clone();
    if !root.is_absolute() || !root.is_dir() {
        return Err(invalid(format!(
            "the root file system {} of container {id} is not a directory in the guest",
            root.display()
        )));
    }
    let mut process = spec
        .process()
        .clone()
        .ok_or_else(|| invalid(format!("the OCI spec of container {id} has no process")))?;
    check_process(&process, Some(&root), &format!("container {id}"))?;
    process.set_terminal(Some(terminal));
    spec.set_process(Some(process));
    if let Some(linux) = spec.linux_mut() {
        if linux.cgroups_path().is_none() {
            linux.set_cgroups_path(Some(PathBuf::from(format!("/runv/{id}"))));
        }
        let propagation = linux
            .rootfs_propagation()
            .as_deref()
            .map(rootfs_propagation)
            .transpose()
            .map_err(|name| {
                invalid(format!(
                    "container {id}: unknown rootfsPropagation {name:?}; use one of \
                     private, rprivate, slave, rslave, shared, rshared, unbindable, \
                     runbindable"
                ))
            })?;
        linux.set_rootfs_propagation(propagation.map(str::to_owned));
    } else {
        return Err(invalid(format!(
            "the OCI spec of container {id} has no linux section"
        )));
    }
    Ok(spec)
}

/// runc's names for the root's propagation (containerd's CRI sends
/// `rshared` and `rslave` for Bidirectional and HostToContainer volumes) as
/// libcontainer knows them; it makes the root's propagation recursive
/// whatever the name says, as runc does.
fn rootfs_propagation(name: &str) -> std::result::Result<&'static str, &str> {
    match name {
        "private" | "rprivate" => Ok("private"),
        "slave" | "rslave" => Ok("slave"),
        "shared" | "rshared" => Ok("shared"),
        "unbindable" | "runbindable" => Ok("unbindable"),
        unknown => Err(unknown),
    }
}

fn check_process(process: &OciProcess, root: Option<&std::path::Path>, whose: &str) -> Result<()> {
    crate::process_spec::check(process, root, whose)
        .map_err(|message| failure(Code::INVALID_ARGUMENT, message))
}

/// Writes `value` as `dir/name`, creating `dir`.
fn write_json(dir: &std::path::Path, name: &str, value: &impl serde::Serialize) -> Result<PathBuf> {
    let path = dir.join(name);
    fs::create_dir_all(dir)
        .and_then(|()| {
            let json = serde_json::to_vec(value).map_err(std::io::Error::other)?;
            fs::write(&path, json)
        })
        .map(|()| path.clone())
        .map_err(|e| failure(Code::INTERNAL, format!("writing {}: {e}", path.display())))
}

fn take_terminal(io: &ProcessIo, socket: ConsoleSocket) -> Result<()> {
    socket
        .receive_master()
        .and_then(|master| io.set_terminal(master))
        .map_err(|e| {
            failure(
                Code::INTERNAL,
                format!("taking the process's terminal: {e}"),
            )
        })
}

fn start_copying(io: &ProcessIo, name: &str) -> Result<()> {
    io.start_copying().map_err(|e| {
        failure(
            Code::INTERNAL,
            format!("connecting the stdio of {name}: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        for id in ["web", "a1_b-2.c", &"x".repeat(MAX_ID_LEN)] {
            check_id("container ID", id).unwrap();
        }
        for id in [
            "",
            "../etc",
            ".hidden",
            "a b",
            "a/b",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            let err = check_id("container ID", id).unwrap_err();
            assert_eq!(err.code, Code::INVALID_ARGUMENT);
            assert!(err.message.contains("not a valid ID"), "{}", err.message);
        }
    }

    #[test]
    fn specs_are_checked_and_completed() {
        let rootfs = tempfile::tempdir().unwrap();
        // The default spec's process runs `sh`.
        fs::create_dir_all(rootfs.path().join("bin")).unwrap();
        fs::write(rootfs.path().join("bin/sh"), "").unwrap();
        let mut spec = Spec::default();
        let mut root = spec.root().clone().unwrap();
        root.set_path(rootfs.path().to_owned());
        spec.set_root(Some(root));
        let json = serde_json::to_vec(&spec).unwrap();

        let completed = container_spec("web", &json, true).unwrap();
        assert_eq!(completed.process().as_ref().unwrap().terminal(), Some(true));
        assert_eq!(
            completed
                .linux()
                .as_ref()
                .unwrap()
                .cgroups_path()
                .as_deref(),
            Some(std::path::Path::new("/runv/web"))
        );

        let err = container_spec("web", b"{", false).unwrap_err();
        assert!(
            err.message
                .contains("OCI spec of container web is not valid"),
            "{}",
            err.message
        );

        let mut missing_root = spec.clone();
        let mut root = spec.root().clone().unwrap();
        root.set_path(rootfs.path().join("gone"));
        missing_root.set_root(Some(root));
        let json = serde_json::to_vec(&missing_root).unwrap();
        let err = container_spec("web", &json, false).unwrap_err();
        assert!(
            err.message.contains("is not a directory in the guest"),
            "{}",
            err.message
        );

        let mut no_args = spec.clone();
        let mut process = spec.process().clone().unwrap();
        process.set_args(Some(vec![]));
        no_args.set_process(Some(process));
        let json = serde_json::to_vec(&no_args).unwrap();
        let err = container_spec("web", &json, false).unwrap_err();
        assert!(err.message.contains("has no args"), "{}", err.message);

        for (given, taken) in [
            ("rshared", "shared"),
            ("rslave", "slave"),
            ("private", "private"),
        ] {
            let mut propagated = spec.clone();
            let mut linux = spec.linux().clone().unwrap();
            linux.set_rootfs_propagation(Some(given.into()));
            propagated.set_linux(Some(linux));
            let json = serde_json::to_vec(&propagated).unwrap();
            let completed = container_spec("web", &json, false).unwrap();
            let linux = completed.linux().as_ref().unwrap();
            assert_eq!(linux.rootfs_propagation().as_deref(), Some(taken));
        }
        let mut odd = spec.clone();
        let mut linux = spec.linux().clone().unwrap();
        linux.set_rootfs_propagation(Some("rsideways".into()));
        odd.set_linux(Some(linux));
        let json = serde_json::to_vec(&odd).unwrap();
        let err = container_spec("web", &json, false).unwrap_err();
        assert!(
            err.message
                .contains("unknown rootfsPropagation \"rsideways\""),
            "{}",
            err.message
        );
    }
}
