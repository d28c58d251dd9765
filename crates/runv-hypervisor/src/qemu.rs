//! The `qemu` backend: `qemu-system-x86_64 -M microvm`, with the guest's
//! vsock served by `vhost-device-vsock` over vhost-user. That helper gives
//! the host the same hybrid vsock Unix socket as the builtin VMM, so the
//! agent client cannot tell the two apart. A VM that shares a directory
//! with its guest also gets `virtiofsd`, the virtio-fs backend.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use nix::{sys::signal, unistd::Pid};
use runv_config::QemuConfig;
use runv_protocol::SHARED_FS_TAG;
use tokio::{
    process::Child,
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::{
    check_boot_files,
    host::{choose_accel, Accel, KvmSupport},
    process::{find_executable, path_arg, spawn_logged, tail, LOG_TAIL_LINES},
    run_dir::RunDir,
    vhost_user::{self, Backend},
    ExitWatch, Hypervisor, HypervisorError, StartInfo, VmExit, VmSpec, BASE_KERNEL_PARAMS,
};

/// The guest's vsock context id; any value above 2 works, as each VM has
/// its own vsock device.
const GUEST_CID: u32 = 3;
/// The vhost-user socket between QEMU and vhost-device-vsock.
const VHOST_VSOCK_SOCKET: &str = "vhost-vsock.sock";
const QEMU_LOG: &str = "qemu.log";
const VSOCK_HELPER_LOG: &str = "vhost-device-vsock.log";
/// The vhost-user socket between QEMU and virtiofsd.
const VIRTIOFSD_SOCKET: &str = "virtiofsd.sock";
const VIRTIOFSD_LOG: &str = "virtiofsd.log";
/// How long QEMU may take to exit after a backend did: a backend also
/// exits when QEMU closes its connection on the way out, and then QEMU's
/// own exit says why the VM ended.
const QEMU_EXIT_AFTER_BACKEND: Duration = Duration::from_millis(500);

/// The programs a VM runs, found before any of them starts.
struct Programs {
    qemu: PathBuf,
    vsock: PathBuf,
    /// Only for a VM with a shared directory.
    share: Option<Share>,
}

/// A host directory shared with the guest, and the virtiofsd that serves it.
struct Share {
    virtiofsd: PathBuf,
    dir: PathBuf,
}

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
    fn check_inputs(&self) -> Result<Programs, HypervisorError> {
        check_boot_files(&self.spec)?;
        let qemu = find_executable(&self.config.binary).ok_or_else(|| {
            HypervisorError::MissingProgram {
                what: "QEMU binary",
                program: self.config.binary.clone(),
                fix: "install Debian's qemu-system-x86 package, or set qemu.binary in the \
                      runv config",
            }
        })?;
        let vsock = find_executable(&self.config.vhost_vsock_binary).ok_or_else(|| {
            HypervisorError::MissingProgram {
                what: "vhost-user vsock backend",
                program: self.config.vhost_vsock_binary.clone(),
                fix: "install it with `cargo install --locked --root /usr/local \
                      vhost-device-vsock@0.3.0` (scripts/install.sh does), or set \
                      qemu.vhost_vsock_binary in the runv config",
            }
        })?;
        let share = match &self.spec.shared_dir {
            Some(dir) => Some(self.check_share(dir)?),
            None => None,
        };
        Ok(Programs { qemu, vsock, share })
    }

    /// The shared directory must exist and virtiofsd be installed.
    fn check_share(&self, dir: &Path) -> Result<Share, HypervisorError> {
        if !dir.is_dir() {
            return Err(HypervisorError::MissingFile {
                what: "shared directory",
                path: dir.to_owned(),
                fix: "create it before starting the VM",
            });
        }
        let virtiofsd = find_executable(&self.config.virtiofsd_binary).ok_or_else(|| {
            HypervisorError::MissingProgram {
                what: "virtio-fs backend",
                program: self.config.virtiofsd_binary.clone(),
                fix: "install it with `apt-get install libcap-ng-dev libseccomp-dev && cargo \
                      install --locked --root /usr/local virtiofsd@1.14.0` (scripts/install.sh \
                      does), or set qemu.virtiofsd_binary in the runv config",
            }
        })?;
        Ok(Share {
            virtiofsd,
            dir: dir.to_owned(),
        })
    }

    /// Starts the vhost-user backends and waits for their sockets; on
    /// error none is left running.
    async fn start_backends(
        programs: &Programs,
        dir: &RunDir,
        vsock_socket: &Path,
    ) -> Result<Vec<Backend>, HypervisorError> {
        let mut backends = Vec::new();
        let started = async {
            backends.push(Backend::spawn(
                "vhost-device-vsock",
                &programs.vsock,
                vhost_user::vsock_args(GUEST_CID, &dir.join(VHOST_VSOCK_SOCKET), vsock_socket),
                dir.join(VHOST_VSOCK_SOCKET),
                dir.join(VSOCK_HELPER_LOG),
            )?);
            if let Some(share) = &programs.share {
                backends.push(Backend::spawn(
                    "virtiofsd",
                    &share.virtiofsd,
                    vhost_user::virtiofsd_args(&share.dir, &dir.join(VIRTIOFSD_SOCKET)),
                    dir.join(VIRTIOFSD_SOCKET),
                    dir.join(VIRTIOFSD_LOG),
                )?);
            }
            // Both start at once; they take a few milliseconds each.
            for backend in &mut backends {
                backend.wait_ready().await?;
            }
            Ok(())
        }
        .await;
        match started {
            Ok(()) => Ok(backends),
            Err(e) => {
                vhost_user::kill_all(&mut backends).await;
                Err(e)
            }
        }
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
        let mut args: Vec<String> = vec![
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
        if spec.shared_dir.is_some() {
            args.extend([
                "-chardev".into(),
                format!(
                    "socket,id=fs,path={}",
                    qemu_path(&dir.join(VIRTIOFSD_SOCKET))
                ),
                "-device".into(),
                format!("vhost-user-fs-device,chardev=fs,tag={SHARED_FS_TAG}"),
            ]);
        }
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
        let programs = self.check_inputs()?;
        let (accel, accel_reason) = choose_accel(self.config.accel, &KvmSupport::probe())
            .map_err(HypervisorError::Accel)?;
        tracing::info!(vm = %self.spec.id, %accel, reason = %accel_reason, "starting qemu");
        let dir = RunDir::for_vm(&self.spec)?;
        let mut backends = Self::start_backends(&programs, &dir, &self.spec.vsock_socket()).await?;
        let qemu = match spawn_logged(
            &programs.qemu,
            self.qemu_args(accel, &dir),
            &dir.join(QEMU_LOG),
            "qemu",
        ) {
            Ok(qemu) => qemu,
            Err(e) => {
                vhost_user::kill_all(&mut backends).await;
                return Err(e);
            }
        };
        let pids = std::iter::once(qemu.id())
            .chain(backends.iter().map(Backend::pid))
            .flatten()
            .collect();
        let (control, control_rx) = mpsc::unbounded_channel();
        let (exit_tx, exit_rx) = watch::channel(None);
        let supervisor = tokio::spawn(supervise(
            qemu,
            backends,
            control_rx,
            exit_tx,
            dir.join(QEMU_LOG),
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
        self.spec.vsock_socket()
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

/// Owns the VM's processes: reaps them, ends the VM when any dies or when
/// asked, and publishes how it ended once all of them are reaped.
async fn supervise(
    mut qemu: Child,
    mut backends: Vec<Backend>,
    mut control: mpsc::UnboundedReceiver<Control>,
    exit: watch::Sender<Option<VmExit>>,
    qemu_log: PathBuf,
) {
    let mut stop_requested = false;
    let mut control_open = true;
    let ended = loop {
        tokio::select! {
            // QEMU first: when it and a backend end together, QEMU's exit
            // is the reason.
            biased;
            status = qemu.wait() => break qemu_exit(status, stop_requested, &qemu_log),
            backend_exit = vhost_user::first_exit(&mut backends) => {
                match tokio::time::timeout(QEMU_EXIT_AFTER_BACKEND, qemu.wait()).await {
                    Ok(status) => break qemu_exit(status, stop_requested, &qemu_log),
                    // QEMU runs on without the device's backend: the guest
                    // has lost its vsock or its file system, so end the VM.
                    Err(_) => {
                        let _ = qemu.kill().await;
                        break VmExit::Failed(backend_exit);
                    }
                }
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
    vhost_user::kill_all(&mut backends).await;
    let _ = exit.send(Some(ended));
}

/// How the VM ended, from QEMU's exit.
fn qemu_exit(
    status: std::io::Result<std::process::ExitStatus>,
    stop_requested: bool,
    qemu_log: &Path,
) -> VmExit {
    match status {
        _ if stop_requested => VmExit::Stopped,
        Ok(status) if status.success() => VmExit::GuestShutdown,
        Ok(status) => VmExit::Failed(format!(
            "qemu exited ({status}):\n{}",
            tail(qemu_log, LOG_TAIL_LINES)
        )),
        Err(e) => VmExit::Failed(format!("cannot wait for qemu: {e}")),
    }
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
        assert!(!args.contains("vhost-user-fs-device"), "no share: {args}");
    }

    #[test]
    fn shared_directory_is_wired_to_virtiofsd() {
        let tmp = tempfile::tempdir().unwrap();
        let mut spec = spec(tmp.path());
        spec.shared_dir = Some(tmp.path().join("shared"));
        let vm = QemuVm::new(spec, QemuConfig::default());
        let dir = RunDir::create(tmp.path(), "vm").unwrap();
        let args = vm.qemu_args(Accel::Tcg, &dir).join(" ");
        let socket = dir.join(VIRTIOFSD_SOCKET);
        assert!(
            args.contains(&format!(
                "-chardev socket,id=fs,path={} -device vhost-user-fs-device,chardev=fs,\
                 tag=runv-shared",
                socket.display()
            )),
            "{args}"
        );
    }

    #[tokio::test]
    async fn missing_virtiofsd_is_reported_before_anything_starts() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("vmlinux"), "").unwrap();
        std::fs::write(tmp.path().join("initrd"), "").unwrap();
        let mut spec = spec(tmp.path());
        spec.shared_dir = Some(tmp.path().join("shared"));
        // Any program will do for QEMU and the vsock backend: none may start.
        let config = QemuConfig {
            binary: "sh".into(),
            vhost_vsock_binary: "sh".into(),
            virtiofsd_binary: "/nonexistent/virtiofsd".into(),
            ..QemuConfig::default()
        };
        let mut vm = QemuVm::new(spec.clone(), config.clone());
        let err = vm.start().await.unwrap_err().to_string();
        assert!(
            err.contains("shared directory") && err.contains("shared"),
            "{err}"
        );
        std::fs::create_dir(tmp.path().join("shared")).unwrap();
        let mut vm = QemuVm::new(spec, config);
        let err = vm.start().await.unwrap_err().to_string();
        assert!(
            err.contains("virtio-fs backend `/nonexistent/virtiofsd` not found")
                && err.contains("cargo install --locked --root /usr/local virtiofsd@1.14.0")
                && err.contains("qemu.virtiofsd_binary"),
            "{err}"
        );
        assert!(!tmp.path().join("vm,1").exists(), "no VM directory is left");
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
