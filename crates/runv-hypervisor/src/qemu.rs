//! The `qemu` backend: `qemu-system-x86_64 -M microvm`, with the guest's
//! vsock served by `vhost-device-vsock` over vhost-user. That helper gives
//! the host the same hybrid vsock Unix socket as the builtin VMM, so the
//! agent client cannot tell the two apart.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use nix::{sys::signal, unistd::Pid};
use runv_config::QemuConfig;
use tokio::{
    process::Child,
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::{
    check_boot_files,
    host::{choose_accel, Accel, KvmSupport},
    process::{command_dying_with_parent, find_executable, tail, LOG_TAIL_LINES},
    run_dir::RunDir,
    ExitWatch, Hypervisor, HypervisorError, StartInfo, VmExit, VmSpec, BASE_KERNEL_PARAMS,
};

/// The guest's vsock context id; any value above 2 works, as each VM has
/// its own vsock device.
const GUEST_CID: u32 = 3;
/// The vhost-user socket between QEMU and vhost-device-vsock.
const VHOST_VSOCK_SOCKET: &str = "vhost-vsock.sock";
/// The hybrid vsock socket for host clients.
const HYBRID_VSOCK_SOCKET: &str = "vsock.sock";
const QEMU_LOG: &str = "qemu.log";
const VSOCK_HELPER_LOG: &str = "vhost-device-vsock.log";
/// How long vhost-device-vsock may take to open its socket.
const HELPER_READY_TIMEOUT: Duration = Duration::from_secs(5);
const HELPER_POLL_INTERVAL: Duration = Duration::from_millis(2);

enum Control {
    Terminate,
    Kill,
}

struct Running {
    dir: RunDir,
    control: mpsc::UnboundedSender<Control>,
    exit: ExitWatch,
    supervisor: JoinHandle<()>,
    pids: Vec<u32>,
}

/// A pod VM run by QEMU.
pub struct QemuVm {
    spec: VmSpec,
    config: QemuConfig,
    running: Option<Running>,
    /// How the VM ended, once `stop` has seen it.
    ended: Option<VmExit>,
}

impl QemuVm {
    pub fn new(spec: VmSpec, config: QemuConfig) -> QemuVm {
        QemuVm {
            spec,
            config,
            running: None,
            ended: None,
        }
    }

    /// Everything that can be checked before a process starts.
    fn check_inputs(&self) -> Result<(PathBuf, PathBuf), HypervisorError> {
        check_boot_files(&self.spec)?;
        let qemu = find_executable(&self.config.binary).ok_or_else(|| {
            HypervisorError::MissingProgram {
                what: "QEMU binary",
                program: self.config.binary.clone(),
                fix: "install Debian's qemu-system-x86 package, or set qemu.binary in the \
                      runv config",
            }
        })?;
        let helper = find_executable(&self.config.vhost_vsock_binary).ok_or_else(|| {
            HypervisorError::MissingProgram {
                what: "vhost-user vsock backend",
                program: self.config.vhost_vsock_binary.clone(),
                fix: "install it with `cargo install --locked --root /usr/local \
                      vhost-device-vsock@0.3.0` (scripts/install.sh does), or set \
                      qemu.vhost_vsock_binary in the runv config",
            }
        })?;
        Ok((qemu, helper))
    }

    async fn start_helper(&self, helper: &Path, dir: &RunDir) -> Result<Child, HypervisorError> {
        let socket = dir.join(VHOST_VSOCK_SOCKET);
        let log = dir.join(VSOCK_HELPER_LOG);
        let mut child = spawn_logged(
            helper,
            [
                "--guest-cid".into(),
                GUEST_CID.to_string(),
                "--socket".into(),
                path_arg(&socket),
                "--uds-path".into(),
                path_arg(&dir.join(HYBRID_VSOCK_SOCKET)),
            ],
            &log,
            "vhost-device-vsock",
        )?;
        let deadline = Instant::now() + HELPER_READY_TIMEOUT;
        while !socket.exists() {
            let failure = if let Ok(Some(status)) = child.try_wait() {
                format!("it exited ({status})")
            } else if Instant::now() > deadline {
                format!("its socket did not appear within {HELPER_READY_TIMEOUT:?}")
            } else {
                tokio::time::sleep(HELPER_POLL_INTERVAL).await;
                continue;
            };
            let _ = child.kill().await;
            return Err(HypervisorError::StartFailed {
                what: "vhost-device-vsock",
                detail: format!("{failure}; its log:\n{}", tail(&log, LOG_TAIL_LINES)),
            });
        }
        Ok(child)
    }

    fn qemu_args(&self, accel: Accel, dir: &RunDir) -> Vec<String> {
        let spec = &self.spec;
        let memory = format!("{}M", spec.memory_mib);
        let (accel_arg, cpu) = match accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg,thread=multi", "max"),
        };
        let mut append = BASE_KERNEL_PARAMS.to_owned();
        if !spec.kernel_params.is_empty() {
            append.push(' ');
            append.push_str(&spec.kernel_params);
        }
        let args: Vec<String> = vec![
            "-name".into(),
            format!("runv-{},debug-threads=on", spec.id),
            // acpi=off makes QEMU list the virtio-mmio devices on the kernel
            // command line, which the guest kernel (built without ACPI) needs.
            // rtc=on: without a CMOS clock the guest kernel waits a whole
            // second at boot for the clock's update flag (guest-kernel.md).
            "-machine".into(),
            "microvm,rtc=on,acpi=off,x-option-roms=off,memory-backend=ram".into(),
            "-accel".into(),
            accel_arg.into(),
            "-cpu".into(),
            cpu.into(),
            "-smp".into(),
            spec.vcpus.to_string(),
            "-m".into(),
            memory.clone(),
            // Shared memory, so that vhost-user backends can map the guest.
            "-object".into(),
            format!("memory-backend-memfd,id=ram,size={memory},share=on"),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            // A guest reset ends QEMU: it is how the guest powers off.
            "-no-reboot".into(),
            "-chardev".into(),
            format!("file,id=console,path={}", qemu_path(&spec.console_log)),
            "-serial".into(),
            "chardev:console".into(),
            "-kernel".into(),
            path_arg(&spec.kernel),
            "-initrd".into(),
            path_arg(&spec.initramfs),
            "-append".into(),
            append,
            "-chardev".into(),
            format!(
                "socket,id=vsock,path={}",
                qemu_path(&dir.join(VHOST_VSOCK_SOCKET))
            ),
            "-device".into(),
            "vhost-user-vsock-device,chardev=vsock".into(),
        ];
        args
    }
}

#[async_trait]
impl Hypervisor for QemuVm {
    async fn start(&mut self) -> Result<StartInfo, HypervisorError> {
        if self.running.is_some() || self.ended.is_some() {
            return Err(HypervisorError::AlreadyStarted);
        }
        let begin = Instant::now();
        let (qemu, helper) = self.check_inputs()?;
        let (accel, accel_reason) = choose_accel(self.config.accel, &KvmSupport::probe())
            .map_err(HypervisorError::Accel)?;
        tracing::info!(vm = %self.spec.id, %accel, reason = %accel_reason, "starting qemu");
        let dir = RunDir::for_vm(&self.spec)?;
        let mut helper = self.start_helper(&helper, &dir).await?;
        let qemu = match spawn_logged(
            &qemu,
            self.qemu_args(accel, &dir),
            &dir.join(QEMU_LOG),
            "qemu",
        ) {
            Ok(qemu) => qemu,
            Err(e) => {
                let _ = helper.kill().await;
                return Err(e);
            }
        };
        let pids = [qemu.id(), helper.id()].into_iter().flatten().collect();
        let (control, control_rx) = mpsc::unbounded_channel();
        let (exit_tx, exit_rx) = watch::channel(None);
        let supervisor = tokio::spawn(supervise(
            qemu,
            helper,
            control_rx,
            exit_tx,
            dir.join(QEMU_LOG),
            dir.join(VSOCK_HELPER_LOG),
        ));
        self.running = Some(Running {
            dir,
            control,
            exit: ExitWatch(exit_rx),
            supervisor,
            pids,
        });
        Ok(StartInfo {
            accel,
            accel_reason,
            spawn: begin.elapsed(),
        })
    }

    fn vsock_socket(&self) -> PathBuf {
        self.spec
            .run_dir
            .join(&self.spec.id)
            .join(HYBRID_VSOCK_SOCKET)
    }

    fn pids(&self) -> Vec<u32> {
        self.running
            .as_ref()
            .map(|r| r.pids.clone())
            .unwrap_or_default()
    }

    fn exit_watch(&self) -> Option<ExitWatch> {
        self.running.as_ref().map(|r| r.exit.clone())
    }

    async fn stop(&mut self, grace: Duration) -> VmExit {
        let Some(running) = self.running.take() else {
            return self.ended.clone().unwrap_or(VmExit::Stopped);
        };
        let mut exit = running.exit.clone();
        let _ = running.control.send(Control::Terminate);
        let ended = match tokio::time::timeout(grace, exit.wait()).await {
            Ok(ended) => ended,
            Err(_) => {
                tracing::warn!(vm = %self.spec.id, ?grace, "qemu did not stop in time, killing it");
                let _ = running.control.send(Control::Kill);
                exit.wait().await
            }
        };
        let _ = running.supervisor.await;
        drop(running.dir);
        self.ended = Some(ended.clone());
        ended
    }
}

/// Owns the VM's processes: reaps them, ends the VM when either dies or
/// when asked, and publishes how it ended once all of them are reaped.
async fn supervise(
    mut qemu: Child,
    mut helper: Child,
    mut control: mpsc::UnboundedReceiver<Control>,
    exit: watch::Sender<Option<VmExit>>,
    qemu_log: PathBuf,
    helper_log: PathBuf,
) {
    let mut stop_requested = false;
    let mut control_open = true;
    let ended = loop {
        tokio::select! {
            status = qemu.wait() => {
                break match status {
                    _ if stop_requested => VmExit::Stopped,
                    Ok(status) if status.success() => VmExit::GuestShutdown,
                    Ok(status) => VmExit::Failed(format!(
                        "qemu exited ({status}):\n{}",
                        tail(&qemu_log, LOG_TAIL_LINES)
                    )),
                    Err(e) => VmExit::Failed(format!("cannot wait for qemu: {e}")),
                };
            }
            status = helper.wait() => {
                // Without its vsock backend the VM is unreachable: end it.
                let _ = qemu.kill().await;
                break VmExit::Failed(format!(
                    "vhost-device-vsock exited ({}):\n{}",
                    status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                    tail(&helper_log, LOG_TAIL_LINES)
                ));
            }
            request = control.recv(), if control_open => {
                stop_requested = true;
                match request {
                    Some(Control::Terminate) => {
                        if let Some(pid) = qemu.id() {
                            let _ = signal::kill(Pid::from_raw(pid as i32), signal::SIGTERM);
                        }
                    }
                    // The owner is gone (dropped without stop) or insists.
                    Some(Control::Kill) | None => {
                        control_open = request.is_some();
                        let _ = qemu.start_kill();
                    }
                }
            }
        }
    };
    let _ = helper.kill().await;
    let _ = exit.send(Some(ended));
}

/// Spawns `program` with stdout and stderr going to `log`.
fn spawn_logged(
    program: &Path,
    args: impl IntoIterator<Item = String>,
    log: &Path,
    what: &'static str,
) -> Result<Child, HypervisorError> {
    let io_error = |source| HypervisorError::Io {
        context: format!("cannot start {what}"),
        source,
    };
    let log_file = std::fs::File::create(log).map_err(io_error)?;
    let log_copy = log_file.try_clone().map_err(io_error)?;
    command_dying_with_parent(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_copy)
        .spawn()
        .map_err(io_error)
}

fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// A path inside a QEMU option list, where a comma must be doubled.
fn qemu_path(path: &Path) -> String {
    path_arg(path).replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> VmSpec {
        VmSpec {
            id: "vm,1".into(),
            kernel: dir.join("vmlinux"),
            initramfs: dir.join("initrd"),
            kernel_params: "runv.log_level=debug".into(),
            vcpus: 2,
            memory_mib: 128,
            run_dir: dir.to_owned(),
            console_log: dir.join("console,log"),
            shared_dir: None,
        }
    }

    #[test]
    fn command_line_shares_memory_and_wires_vsock() {
        let tmp = tempfile::tempdir().unwrap();
        let vm = QemuVm::new(spec(tmp.path()), QemuConfig::default());
        let dir = RunDir::create(tmp.path(), "vm").unwrap();
        let args = vm.qemu_args(Accel::Tcg, &dir).join(" ");
        assert!(
            args.contains("memory-backend-memfd,id=ram,size=128M,share=on"),
            "{args}"
        );
        assert!(args.contains("memory-backend=ram"), "{args}");
        assert!(args.contains("microvm,rtc=on,acpi=off"), "{args}");
        assert!(args.contains("-accel tcg,thread=multi -cpu max"), "{args}");
        assert!(args.contains("-smp 2"), "{args}");
        assert!(args.contains("-no-reboot"), "{args}");
        assert!(
            args.contains("vhost-user-vsock-device,chardev=vsock"),
            "{args}"
        );
        assert!(args.contains("console,,log"), "commas doubled: {args}");
        assert!(
            args.contains("console=ttyS0 reboot=t panic=-1 runv.log_level=debug"),
            "{args}"
        );
        let kvm_args = vm.qemu_args(Accel::Kvm, &dir).join(" ");
        assert!(kvm_args.contains("-accel kvm -cpu host"), "{kvm_args}");
    }

    #[tokio::test]
    async fn missing_inputs_are_reported_before_anything_starts() {
        let tmp = tempfile::tempdir().unwrap();
        let mut vm = QemuVm::new(spec(tmp.path()), QemuConfig::default());
        let err = vm.start().await.unwrap_err().to_string();
        assert!(
            err.contains("guest kernel") && err.contains("build-kernel.sh"),
            "{err}"
        );
        std::fs::write(tmp.path().join("vmlinux"), "").unwrap();
        let err = vm.start().await.unwrap_err().to_string();
        assert!(
            err.contains("initramfs") && err.contains("build-initramfs.sh"),
            "{err}"
        );
        std::fs::write(tmp.path().join("initrd"), "").unwrap();
        let config = QemuConfig {
            binary: "/nonexistent/qemu-system-x86_64".into(),
            ..QemuConfig::default()
        };
        let mut vm = QemuVm::new(spec(tmp.path()), config);
        let err = vm.start().await.unwrap_err().to_string();
        assert!(
            err.contains("qemu-system-x86") && err.contains("qemu.binary"),
            "{err}"
        );
        assert!(!tmp.path().join("vm,1").exists(), "no VM directory is left");
    }
}
