//! runv's configuration file (`/etc/runv/runv.toml` by default).
//!
//! Every key is optional and has a working default; an unknown key or a
//! value out of range is an error that names the key and the file, so that
//! a typo never silently falls back to a default.

use std::{
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

/// Where the shim and `runv-ctl` look for the configuration when none is named.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/runv/runv.toml";

/// Where `scripts/install.sh` puts the guest kernel and initramfs.
pub const DEFAULT_SHARE_DIR: &str = "/usr/local/share/runv";

/// A configuration error, always naming what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read runv config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid runv config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid runv config {path}: `{key}` {problem}")]
    Value {
        path: PathBuf,
        key: &'static str,
        problem: String,
    },
}

/// Which hypervisor runs the pod VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorKind {
    /// The in-process KVM microVM (runv-vmm): no process beside the shim.
    Builtin,
    /// `qemu-system-x86_64 -M microvm` with vhost-user helpers.
    Qemu,
}

impl fmt::Display for HypervisorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HypervisorKind::Builtin => "builtin",
            HypervisorKind::Qemu => "qemu",
        })
    }
}

/// How QEMU executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelMode {
    /// KVM when the host can run the guest with it, TCG otherwise.
    Auto,
    /// KVM, or fail when the host cannot run the guest with it.
    Kvm,
    /// Software emulation: slow, but runs anywhere.
    Tcg,
}

/// How a pod's network namespace is joined to the VM's NICs
/// (docs/networking.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkInterconnect {
    /// A tap per CNI interface, joined to it by tc mirred redirects.
    #[default]
    TcMirred,
    /// A passthru macvtap on the CNI interface, whose queue the NIC uses.
    Macvtap,
    /// A bridge holding the CNI interface (given a MAC of its own) and a
    /// tap.
    Bridge,
}

impl fmt::Display for NetworkInterconnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NetworkInterconnect::TcMirred => "tc-mirred",
            NetworkInterconnect::Macvtap => "macvtap",
            NetworkInterconnect::Bridge => "bridge",
        })
    }
}

/// Pod networking settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    pub interconnect: NetworkInterconnect,
    /// Pass an SR-IOV VF that CNI put in the pod's namespace to the VM as a
    /// PCI function (VFIO) instead of joining it to a tap; only where the
    /// hypervisor can (docs/networking.md, "VF passthrough").
    pub vf_passthrough: bool,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            interconnect: NetworkInterconnect::default(),
            vf_passthrough: true,
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The hypervisor of every pod VM.
    pub hypervisor: HypervisorKind,
    /// Log level of the shim and the agent: error, warn, info, debug, trace.
    pub log_level: String,
    /// Directory under which each VM gets a private directory for its sockets.
    pub run_dir: PathBuf,
    pub vm: VmConfig,
    pub builtin: BuiltinConfig,
    pub qemu: QemuConfig,
    pub network: NetworkConfig,
}

/// The pod VM's shape and boot files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    /// Uncompressed ELF guest kernel with a PVH entry point.
    pub kernel: PathBuf,
    /// Compressed cpio initramfs with runv-agent as /init.
    pub initramfs: PathBuf,
    /// Extra guest kernel command line parameters, appended to runv's own.
    pub kernel_params: String,
    /// The VM's own vCPUs (guest kernel, agent); a pod's CPU limits come
    /// on top (the shim's `sizing`).
    pub vcpus: u32,
    /// The VM's own memory; a pod's memory limit comes on top.
    pub memory_mib: u32,
    /// The most vCPUs a pod VM gets, base and limits together. None: the
    /// CPUs the shim may run on (its VM's vCPU threads run where it does).
    pub max_vcpus: Option<u32>,
    /// The most memory a pod VM gets, base and limit together.
    pub max_memory_mib: u32,
    /// How long to wait for the guest agent to answer after the VM starts,
    /// and the deadline of each call to it (WaitProcess aside).
    pub agent_timeout_secs: u64,
    /// How long a VM may take to power off before it is killed.
    pub shutdown_timeout_secs: u64,
    /// The most of the guest console one log file keeps; the log rotates
    /// once to `console.log.1`, so a VM's console takes at most twice this
    /// on the host, whatever the guest writes.
    pub console_log_kib: u32,
}

/// Settings of the `builtin` hypervisor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BuiltinConfig {
    /// `vm.kernel` is a PVM guest kernel (CONFIG_PVM_GUEST): the only kind
    /// of guest a host whose KVM is the PVM backend (kvm_pvm) can run.
    pub pvm_guest_kernel: bool,
    /// The guest reports the pages it frees (virtio-balloon free page
    /// reporting) and the host takes their memory back.
    pub free_page_reporting: bool,
    /// The kernel and initramfs pages are mapped from their files, copy
    /// on write, instead of copied into each VM: every VM's guest shares
    /// the pages it only reads (not with VFIO devices, whose DMA pins RAM).
    pub share_boot_files: bool,
    /// An ext4 image of the guest's root (scripts/build-initramfs.sh makes
    /// it beside the initramfs), booted from instead of `vm.initramfs`:
    /// the guest mounts it read-only from a virtio-pmem device with DAX,
    /// so runv-agent runs from the host's page cache of the image, one
    /// copy for every VM, and no guest RAM holds it. Unset: the initramfs.
    pub root_image: Option<PathBuf>,
}

impl Default for BuiltinConfig {
    fn default() -> Self {
        BuiltinConfig {
            pvm_guest_kernel: false,
            free_page_reporting: true,
            share_boot_files: true,
            root_image: None,
        }
    }
}

/// Settings of the `qemu` hypervisor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    /// The QEMU binary, a path or a name looked up in PATH.
    pub binary: PathBuf,
    /// The vhost-user vsock backend (from the vhost-device-vsock crate).
    pub vhost_vsock_binary: PathBuf,
    /// The vhost-user virtio-fs backend (from the virtiofsd crate), started
    /// for a VM that shares a host directory with its guest.
    pub virtiofsd_binary: PathBuf,
    pub accel: AccelMode,
    /// Whether QEMU may run the guest under TCG software emulation. QEMU's
    /// security policy does not treat TCG as a security boundary, so a host
    /// without usable KVM must opt in.
    pub allow_tcg: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hypervisor: HypervisorKind::Builtin,
            log_level: "info".into(),
            run_dir: PathBuf::from("/run/runv"),
            vm: VmConfig::default(),
            builtin: BuiltinConfig::default(),
            qemu: QemuConfig::default(),
            network: NetworkConfig::default(),
        }
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            kernel: Path::new(DEFAULT_SHARE_DIR).join("vmlinux"),
            initramfs: Path::new(DEFAULT_SHARE_DIR).join("runv-initramfs.cpio.gz"),
            kernel_params: String::new(),
            vcpus: 1,
            memory_mib: 256,
            max_vcpus: None,
            max_memory_mib: 16384,
            agent_timeout_secs: 30,
            shutdown_timeout_secs: 5,
            console_log_kib: 1024,
        }
    }
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            binary: PathBuf::from("qemu-system-x86_64"),
            vhost_vsock_binary: PathBuf::from("vhost-device-vsock"),
            virtiofsd_binary: PathBuf::from("virtiofsd"),
            accel: AccelMode::Auto,
            allow_tcg: false,
        }
    }
}

const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];
/// The builtin VMM's MP table gives the vCPUs APIC IDs 0 to n-1 and the
/// IOAPIC n, below the broadcast ID 0xff: at most 254 vCPUs.
const MAX_VCPUS: u32 = 254;
const MIN_MEMORY_MIB: u32 = 64;
/// A console log of 1 GiB is already more than any operator reads.
const MAX_CONSOLE_LOG_KIB: u32 = 1 << 20;

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Reads `path` when given, else the default file when it exists, else
    /// the built-in defaults.
    pub fn load_or_default(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            Some(path) => Config::load(path),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Config::load(Path::new(DEFAULT_CONFIG_PATH))
            }
            None => Ok(Config::default()),
        }
    }

    /// Parses and validates configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        config.validate(origin)?;
        Ok(config)
    }

    fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, problem: String| ConfigError::Value {
            path: origin.to_owned(),
            key,
            problem,
        };
        if !LOG_LEVELS.contains(&self.log_level.as_str()) {
            return Err(invalid(
                "log_level",
                format!(
                    "is {:?}; use one of {}",
                    self.log_level,
                    LOG_LEVELS.join(", ")
                ),
            ));
        }
        if !(1..=MAX_VCPUS).contains(&self.vm.vcpus) {
            return Err(invalid(
                "vm.vcpus",
                format!("is {}; use 1 to {MAX_VCPUS}", self.vm.vcpus),
            ));
        }
        if self.vm.memory_mib < MIN_MEMORY_MIB {
            return Err(invalid(
                "vm.memory_mib",
                format!(
                    "is {}; the guest needs at least {MIN_MEMORY_MIB}",
                    self.vm.memory_mib
                ),
            ));
        }
        if let Some(max) = self.vm.max_vcpus {
            if !(self.vm.vcpus..=MAX_VCPUS).contains(&max) {
                return Err(invalid(
                    "vm.max_vcpus",
                    format!("is {max}; use vm.vcpus ({}) to {MAX_VCPUS}", self.vm.vcpus),
                ));
            }
        }
        if self.vm.max_memory_mib < self.vm.memory_mib {
            return Err(invalid(
                "vm.max_memory_mib",
                format!(
                    "is {}; it must be at least vm.memory_mib ({})",
                    self.vm.max_memory_mib, self.vm.memory_mib
                ),
            ));
        }
        if self.vm.agent_timeout_secs == 0 {
            return Err(invalid("vm.agent_timeout_secs", "must be above 0".into()));
        }
        if !(1..=MAX_CONSOLE_LOG_KIB).contains(&self.vm.console_log_kib) {
            return Err(invalid(
                "vm.console_log_kib",
                format!(
                    "is {}; use 1 to {MAX_CONSOLE_LOG_KIB}",
                    self.vm.console_log_kib
                ),
            ));
        }
        for (key, program) in [
            ("qemu.binary", &self.qemu.binary),
            ("qemu.vhost_vsock_binary", &self.qemu.vhost_vsock_binary),
            ("qemu.virtiofsd_binary", &self.qemu.virtiofsd_binary),
        ] {
            if program.as_os_str().is_empty() {
                return Err(invalid(
                    key,
                    "is empty; name a program in PATH or give its path".into(),
                ));
            }
        }
        if !self.run_dir.is_absolute() {
            return Err(invalid(
                "run_dir",
                format!("is {:?}; it must be an absolute path", self.run_dir),
            ));
        }
        Ok(())
    }
}

impl VmConfig {
    /// The most vCPUs a pod VM gets: `max_vcpus`, else the CPUs the shim
    /// may run on; never fewer than `vcpus`, never more than a VM can have.
    pub fn vcpu_cap(&self) -> u32 {
        let cap = self.max_vcpus.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| u32::try_from(n.get()).unwrap_or(MAX_VCPUS))
        });
        cap.clamp(self.vcpus, MAX_VCPUS)
    }

    pub fn agent_timeout(&self) -> Duration {
        Duration::from_secs(self.agent_timeout_secs)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }

    pub fn console_log_bytes(&self) -> u64 {
        u64::from(self.console_log_kib) << 10
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn empty_file_gives_the_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config.hypervisor, HypervisorKind::Builtin);
        assert!(!config.builtin.pvm_guest_kernel);
        assert!(config.builtin.free_page_reporting);
        assert!(config.builtin.share_boot_files);
        assert_eq!(config.vm.vcpus, 1);
        assert_eq!(config.vm.console_log_bytes(), 1 << 20);
        assert_eq!(config.qemu.accel, AccelMode::Auto);
        assert!(!config.qemu.allow_tcg);
        assert_eq!(config.qemu.virtiofsd_binary, Path::new("virtiofsd"));
        assert_eq!(config.vm.kernel, Path::new("/usr/local/share/runv/vmlinux"));
        assert_eq!(config.network.interconnect, NetworkInterconnect::TcMirred);
        assert!(config.network.vf_passthrough);
        let off = parse("[network]\nvf_passthrough = false\n").unwrap();
        assert!(!off.network.vf_passthrough);
    }

    #[test]
    fn shipped_default_config_parses() {
        let shipped = include_str!("../../../configs/runv.toml");
        let config = parse(shipped).unwrap();
        assert_eq!(config.hypervisor, Config::default().hypervisor);
        assert_eq!(config.vm.memory_mib, VmConfig::default().memory_mib);
        assert_eq!(
            config.qemu.virtiofsd_binary,
            QemuConfig::default().virtiofsd_binary
        );
        // The one key the shipped file sets beyond the defaults.
        assert_eq!(BuiltinConfig::default().root_image, None);
        assert_eq!(
            config.builtin.root_image,
            Some(Path::new(DEFAULT_SHARE_DIR).join("runv-root.img"))
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("[vm]\nvcpu = 2\n").unwrap_err().to_string();
        assert!(err.contains("unknown field `vcpu`"), "{err}");
        assert!(err.contains("test.toml"), "{err}");
    }

    #[test]
    fn bad_values_are_named_with_the_fix() {
        let err = parse("[vm]\nvcpus = 0\n").unwrap_err().to_string();
        assert!(err.contains("`vm.vcpus` is 0; use 1 to 254"), "{err}");
        let err = parse("[vm]\nvcpus = 255\n").unwrap_err().to_string();
        assert!(err.contains("`vm.vcpus` is 255; use 1 to 254"), "{err}");
        let err = parse("[vm]\nvcpus = 2\nmax_vcpus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`vm.max_vcpus` is 1; use vm.vcpus (2) to 254"),
            "{err}"
        );
        let err = parse("[vm]\nmax_vcpus = -1\n").unwrap_err().to_string();
        assert!(err.contains("max_vcpus"), "{err}");
        let err = parse("[vm]\nmax_memory_mib = 128\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`vm.max_memory_mib` is 128; it must be at least vm.memory_mib (256)"),
            "{err}"
        );
        let err = parse("[vm]\nmax_memory_mib = \"4G\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("max_memory_mib") && err.contains("expected u32"),
            "{err}"
        );
        let err = parse("[vm]\nmemory_mib = 16\n").unwrap_err().to_string();
        assert!(err.contains("`vm.memory_mib`"), "{err}");
        let err = parse("[vm]\nconsole_log_kib = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`vm.console_log_kib` is 0; use 1 to 1048576"),
            "{err}"
        );
        let err = parse("log_level = \"loud\"\n").unwrap_err().to_string();
        assert!(
            err.contains("`log_level`") && err.contains("debug"),
            "{err}"
        );
        let err = parse("hypervisor = \"xen\"\n").unwrap_err().to_string();
        assert!(err.contains("unknown variant `xen`"), "{err}");
        let err = parse("[builtin]\npvm_guest_kernel = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pvm_guest_kernel"), "{err}");
        let err = parse("[network]\ninterconnect = \"ovs\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `ovs`"), "{err}");
        let err = parse("[network]\nvf_passthrough = \"yes\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("vf_passthrough") && err.contains("expected a boolean"),
            "{err}"
        );
        let err = parse("[qemu]\naccel = \"hvf\"\n").unwrap_err().to_string();
        assert!(err.contains("unknown variant `hvf`"), "{err}");
        let err = parse("[qemu]\nvirtiofsd_binary = \"\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`qemu.virtiofsd_binary` is empty; name a program"),
            "{err}"
        );
    }

    #[test]
    fn vcpu_cap_defaults_to_the_host_and_keeps_the_base() {
        let config = parse("").unwrap();
        assert_eq!(config.vm.max_vcpus, None);
        assert_eq!(config.vm.max_memory_mib, 16384);
        let host = std::thread::available_parallelism().unwrap().get() as u32;
        assert_eq!(config.vm.vcpu_cap(), host.min(MAX_VCPUS));
        let config = parse("[vm]\nvcpus = 2\nmax_vcpus = 6\n").unwrap();
        assert_eq!(config.vm.vcpu_cap(), 6);
        // A base above the host's CPUs is the operator's choice: kept.
        let big_base = parse(&format!("[vm]\nvcpus = {}\n", host + 1)).unwrap();
        assert_eq!(big_base.vm.vcpu_cap(), host + 1);
    }

    #[test]
    fn missing_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.toml");
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("absent.toml"), "{err}");
    }
}
