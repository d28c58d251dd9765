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

/// Writes a benchmark's report to `<target>/bench/<name>.json`; returns
/// the path.
pub fn write_report(name: &str, report: &serde_json::Value) -> PathBuf {
    let out = target_dir().join("bench");
    fs::create_dir_all(&out).unwrap();
    let path = out.join(format!("{name}.json"));
    fs::write(&path, serde_json::to_string_pretty(report).unwrap()).unwrap();
    path
}
