//! What the benchmarks share: host programs copied into pod images, and
//! the labels of a report (hypervisor, accelerator, host, date, where the
//! JSON goes).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{containerd::Containerd, processes_mentioning};

/// `program` and the shared libraries and loader `ldd` lists for it.
pub fn program_with_libraries(program: &Path) -> Vec<PathBuf> {
    let output = Command::new("ldd")
        .arg(program)
        .output()
        .expect("running ldd");
    assert!(output.status.success(), "ldd {}", program.display());
    let mut files = vec![program.to_owned()];
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or the
        // loader's "/lib64/ld-linux-x86-64.so.2 (0x...)".
        let path = line.split("=>").last().unwrap_or_default().trim();
        let path = path.split(" (").next().unwrap_or_default();
        if path.starts_with('/') {
            files.push(PathBuf::from(path));
        }
    }
    files
}

/// The accelerator of the QEMU running a pod of `containerd`, from its
/// command line.
pub fn qemu_accel(containerd: &Containerd) -> String {
    processes_mentioning(containerd.dir())
        .iter()
        .filter(|line| line.contains("qemu-system"))
        .find_map(|line| {
            let mut words = line.split(' ');
            words.find(|w| *w == "-accel")?;
            let accel = words.next()?.split(',').next()?;
            Some(match accel {
                "tcg" => "TCG".to_owned(),
                "kvm" => "KVM".to_owned(),
                other => other.to_owned(),
            })
        })
        .unwrap_or_else(|| "an accelerator not found on QEMU's command line".into())
}

/// The `hypervisor` of a runv configuration file.
pub fn configured_hypervisor(config: &Path) -> String {
    fs::read_to_string(config)
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("hypervisor = "))
        .map(|kind| kind.trim_matches('"').to_owned())
        .unwrap_or_else(|| "unknown".into())
}

pub fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// The trimmed stdout of a command, empty if it could not run.
pub fn command_output(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output();
    output
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Cargo's target directory: the bench binary is
/// `<target>/<profile>/deps/<bench>`.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_owned()
}

/// The median of `values` (the mean of the middle two of an even count),
/// or None for none.
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => None,
        n if n % 2 == 1 => Some(values[n / 2]),
        n => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// Writes a benchmark's report to `<target>/bench/<name>.json`; returns
/// the path.
pub fn write_report(name: &str, report: &serde_json::Value) -> PathBuf {
    let out = target_dir().join("bench");
    fs::create_dir_all(&out).unwrap();
    let path = out.join(format!("{name}.json"));
    fs::write(&path, serde_json::to_string_pretty(report).unwrap()).unwrap();
    path
}

/// The labels every benchmark report starts with: when, on which
/// hypervisor and accelerator, the VM's size, the kernels and the CPU.
pub struct ReportLabels {
    pub date: String,
    pub hypervisor: String,
    pub accel: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub host_kernel: String,
    pub guest_kernel: String,
    pub cpu: String,
}

impl ReportLabels {
    /// The labels of a run on `hypervisor` with `accel`, VMs like `vm`
    /// and `guest_kernel`; the host's kernel, its CPU and the date are read
    /// now.
    pub fn read(
        hypervisor: String,
        accel: String,
        vm: &runv_config::VmConfig,
        guest_kernel: String,
    ) -> ReportLabels {
        ReportLabels {
            cpu: cpu_model(),
            host_kernel: command_output("uname", &["-r"]),
            date: command_output("date", &["-u", "+%F %H:%M UTC"]),
            hypervisor,
            accel,
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            guest_kernel,
        }
    }

    /// A report: these labels, then `fields` (a JSON object) in its order.
    pub fn report(&self, fields: serde_json::Value) -> serde_json::Value {
        let serde_json::Value::Object(fields) = fields else {
            panic!("a report's fields are a JSON object");
        };
        let mut report = serde_json::json!({
            "date": self.date,
            "hypervisor": self.hypervisor,
            "accel": self.accel,
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "host_kernel": self.host_kernel,
            "guest_kernel": self.guest_kernel,
            "cpu": self.cpu,
        });
        report
            .as_object_mut()
            .expect("the labels are an object")
            .extend(fields);
        report
    }
}
