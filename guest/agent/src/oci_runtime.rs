//! The OCI runtime: youki's libcontainer, called synchronously. Every call
//! here blocks (it clones helper processes and waits for them); callers
//! run it off the async runtime, one call at a time, under an orphan hold.

use std::{
    error::Error,
    path::{Path, PathBuf},
};

use libcgroups::common::{
    create_cgroup_manager, AnyCgroupManager, CgroupConfig, CgroupManager, ControllerOpt,
};
use libcontainer::{
    container::{builder::ContainerBuilder, Container},
    error::LibcontainerError,
    signal::Signal,
    syscall::syscall::SyscallType,
    workload::{default::DefaultExecutor, Executor, ExecutorError, ExecutorValidationError},
};
use nix::{
    sys::signal::{signal, SigHandler, Signal as NixSignal},
    unistd::Pid,
};
use oci_spec::runtime::{LinuxResources, Spec};

use crate::process_io::ChildPipes;

/// Where the agent's cgroup v2 hierarchy is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How a process's stdio reaches the runtime.
pub enum ChildStdio<'a> {
    Pipes(ChildPipes),
    /// The console socket to send the terminal's master to.
    Terminal(&'a Path),
}

pub struct OciRuntime {
    /// libcontainer's state directories, one per container.
    state_root: PathBuf,
}

impl OciRuntime {
    pub fn new(state_root: PathBuf) -> OciRuntime {
        OciRuntime { state_root }
    }

    fn builder(&self, id: &str, stdio: ChildStdio) -> Result<ContainerBuilder, String> {
        let builder = ContainerBuilder::new(id.to_owned(), SyscallType::default())
            .with_root_path(&self.state_root)
            .map_err(describe)?
            .with_executor(Workload)
            .validate_id()
            .map_err(describe)?;
        Ok(match stdio {
            ChildStdio::Pipes(pipes) => builder
                .with_stdin(pipes.stdin)
                .with_stdout(pipes.stdout)
                .with_stderr(pipes.stderr),
            ChildStdio::Terminal(socket) => builder.with_console_socket(Some(socket)),
        })
    }

    /// Creates container `id` from the bundle (config.json) in `bundle`;
    /// its init process waits for [`OciRuntime::start`]. Returns its PID.
    pub fn create(&self, id: &str, bundle: &Path, stdio: ChildStdio) -> Result<Pid, String> {
        let container = self
            .builder(id, stdio)?
            .as_init(bundle)
            .with_systemd(false)
            .with_detach(true)
            .build()
            .map_err(describe)?;
        container
            .pid()
            // libcontainer's nix is another major version than ours.
            .map(|pid| Pid::from_raw(pid.as_raw()))
            .ok_or_else(|| "the runtime reported no init PID".to_owned())
    }

    pub fn start(&self, id: &str) -> Result<(), String> {
        self.load(id)?.start().map_err(describe)
    }

    /// Runs the process described in `process_json` (an OCI process) in
    /// container `id`; it runs at once. Returns its PID.
    pub fn exec(&self, id: &str, process_json: &Path, stdio: ChildStdio) -> Result<Pid, String> {
        self.builder(id, stdio)?
            .as_tenant()
            .with_detach(true)
            .with_process(Some(process_json))
            .build()
            .map(|pid| Pid::from_raw(pid.as_raw()))
            .map_err(describe)
    }

    /// Signals every process of the container's cgroup.
    pub fn kill_all(&self, id: &str, signal: NixSignal) -> Result<(), String> {
        let signal = Signal::try_from(signal as i32).map_err(|e| with_causes(&e))?;
        self.load(id)?.kill(signal, true).map_err(describe)
    }

    pub fn pause(&self, id: &str) -> Result<(), String> {
        self.load(id)?.pause().map_err(describe)
    }

    pub fn resume(&self, id: &str) -> Result<(), String> {
        self.load(id)?.resume().map_err(describe)
    }

    pub fn update(&self, id: &str, resources: &LinuxResources) -> Result<(), String> {
        let options = ControllerOpt {
            resources,
            disable_oom_killer: false,
            oom_score_adj: None,
            freezer_state: None,
        };
        self.cgroup(id)?
            .apply(&options)
            .map_err(|e| with_causes(&e))
    }

    /// The PIDs in the container's cgroup.
    pub fn pids(&self, id: &str) -> Result<Vec<u32>, String> {
        let pids = self
            .cgroup(id)?
            .get_all_pids()
            .map_err(|e| with_causes(&e))?;
        Ok(pids.into_iter().map(|pid| pid.as_raw() as u32).collect())
    }

    /// The container's cgroup directory.
    pub fn cgroup_dir(&self, id: &str) -> Result<PathBuf, String> {
        let path = self.cgroup_path(id)?;
        Ok(Path::new(CGROUP_ROOT).join(path.strip_prefix("/").unwrap_or(&path)))
    }

    /// Removes a container whose processes have ended: cgroup, state,
    /// poststop hooks.
    pub fn delete(&self, id: &str) -> Result<(), String> {
        self.load(id)?.delete(false).map_err(describe)
    }

    fn load(&self, id: &str) -> Result<Container, String> {
        Container::load(self.state_root.join(id)).map_err(describe)
    }

    fn cgroup_path(&self, id: &str) -> Result<PathBuf, String> {
        Ok(self.load(id)?.spec().map_err(describe)?.cgroup_path)
    }

    fn cgroup(&self, id: &str) -> Result<AnyCgroupManager, String> {
        create_cgroup_manager(CgroupConfig {
            cgroup_path: self.cgroup_path(id)?,
            systemd_cgroup: false,
            container_name: id.to_owned(),
        })
        .map_err(|e| with_causes(&e))
    }
}

/// The workload as libcontainer runs it, with SIGPIPE restored: the agent
/// (a Rust program) ignores it, and an ignored signal stays ignored across
/// exec, which would break pipelines in containers.
#[derive(Clone)]
struct Workload;

impl Executor for Workload {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        // SAFETY: restoring the default disposition installs no handler;
        // this runs in the single-threaded container process before exec.
        unsafe { signal(NixSignal::SIGPIPE, SigHandler::SigDfl) }
            .map_err(|e| ExecutorError::Other(format!("restoring SIGPIPE: {e}")))?;
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

/// A libcontainer error with its causes, and the detail some of its
/// errors keep out of their message.
fn describe(error: LibcontainerError) -> String {
    match &error {
        LibcontainerError::InvalidInput(detail) | LibcontainerError::Other(detail) => {
            format!("{}: {detail}", with_causes(&error))
        }
        _ => with_causes(&error),
    }
}

/// An error followed by every cause below it.
fn with_causes(error: &dyn Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
