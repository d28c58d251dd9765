//! The pod's cgroup on the host. The guest's cgroups bound containers
//! inside the VM; on the host the whole VM is what must be bounded: the
//! shim (which is the VMM on the builtin hypervisor) and every helper it
//! spawns (QEMU, virtiofsd, vhost-device-vsock) run in the cgroup that
//! the sandbox's spec names in `linux.cgroupsPath`, under the pod's cgroup
//! parent, made when missing as runc makes it for a runc sandbox. The shim
//! enters it before it spawns anything, so every helper is born there and
//! its memory is charged there from its first page.
//!
//! containerd's `PodSandboxStats` reads the pod's cgroup parent (the
//! parent of this cgroup), so it answers from the VM's host usage.

use std::{
    fs,
    path::{Path, PathBuf},
};

use cgroups_rs::{
    cgroup::{get_cgroups_relative_paths, Cgroup},
    cpu::CpuController,
    hierarchies,
    memory::MemController,
    CgroupPid,
};
use rustix::fs::XattrFlags;
use serde_json::Value;

use crate::sizing::{PodResources, VmSize};

/// Host memory the VM needs besides its guest RAM: the VMM's own heap,
/// QEMU's TCG translation cache, virtiofsd's and the vsock helper's.
pub const HOST_OVERHEAD_MIB: u64 = 256;

/// Marks the cgroup directories runv made (the pod's missing parents), so
/// that whichever shim leaves one last removes it; one that the kubelet
/// or anyone else made is left to them.
const MADE_XATTR: &str = "trusted.runv.made";

/// The CFS period when the pod names none (the kernel's default).
const DEFAULT_CPU_PERIOD_US: u64 = 100_000;

/// What the cgroup bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    /// CFS quota and period (µs), where the pod declares a CPU limit.
    pub cpu: Option<(u64, u64)>,
}

impl Limits {
    /// The VM's size plus the host's overhead: its guest RAM plus
    /// [`HOST_OVERHEAD_MIB`] of memory, and, for a pod with a CPU limit,
    /// as many CPUs as it has vCPUs (the VM's base vCPUs are the overhead
    /// on top of the pod's limit). A pod without a CPU limit is not
    /// throttled, as under runc.
    pub fn for_vm(size: VmSize, pod: &PodResources) -> Limits {
        let cpu = (pod.cpu_quota_us > 0).then(|| {
            let period = match pod.cpu_period_us {
                0 => DEFAULT_CPU_PERIOD_US,
                period => period,
            };
            (u64::from(size.vcpus) * period, period)
        });
        Limits {
            memory_bytes: (u64::from(size.memory_mib) + HOST_OVERHEAD_MIB) << 20,
            cpu,
        }
    }
}

/// The sandbox spec's `linux.cgroupsPath`, if it names one.
pub fn spec_cgroups_path(spec: &Value) -> Option<&str> {
    spec.get("linux")?
        .get("cgroupsPath")?
        .as_str()
        .filter(|path| !path.is_empty())
}

/// `cgroups_path` as a path below each hierarchy's root, as runc reads it:
/// a cgroupfs path (`/kubepods/burstable/pod<uid>/<id>`) as it is; a
/// systemd one (`<slice>:<prefix>:<name>`, containerd's form with the
/// systemd cgroup driver) as the slice's nesting and the scope
/// (`kubepods.slice/kubepods-burstable.slice/.../<prefix>-<name>.scope`).
pub fn relative_path(cgroups_path: &str) -> Result<String, String> {
    let relative = match cgroups_path.split(':').collect::<Vec<_>>()[..] {
        [path] => path.trim_start_matches('/').to_owned(),
        [_, prefix, name] if prefix.contains('/') || name.contains('/') => {
            return Err(bad_path(cgroups_path, "a systemd unit's name has no `/`"));
        }
        [slice, prefix, name] => format!("{}/{}", slice_path(slice)?, unit_name(prefix, name)),
        _ => {
            return Err(bad_path(
                cgroups_path,
                "it is neither a path nor slice:prefix:name",
            ))
        }
    };
    let relative = relative.trim_start_matches('/').to_owned();
    // Each part is a cgroup's own name: nothing may climb out of the
    // hierarchy (cgroups-rs panics on a path outside it).
    if relative
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(bad_path(cgroups_path, "it has an empty, `.` or `..` part"));
    }
    Ok(relative)
}

fn bad_path(cgroups_path: &str, why: &str) -> String {
    format!("the sandbox's linux.cgroupsPath {cgroups_path:?} is not a cgroup path: {why}")
}

/// A systemd slice's directory: `a-b-c.slice` is
/// `a.slice/a-b.slice/a-b-c.slice`; `-.slice` is the root; none is
/// `system.slice`, as runc's systemd driver has it.
fn slice_path(slice: &str) -> Result<String, String> {
    let slice = match slice {
        "" => "system.slice",
        "-.slice" => return Ok(String::new()),
        slice => slice,
    };
    let name = slice
        .strip_suffix(".slice")
        .filter(|name| !name.is_empty() && !name.contains('/'))
        .ok_or_else(|| bad_path(slice, "a systemd slice is named <name>.slice"))?;
    let parts: Vec<&str> = name.split('-').collect();
    if parts.iter().any(|part| part.is_empty()) {
        return Err(bad_path(slice, "a slice's name has no empty `-` part"));
    }
    Ok((1..=parts.len())
        .map(|n| format!("{}.slice", parts[..n].join("-")))
        .collect::<Vec<_>>()
        .join("/"))
}

/// runc's unit for a container: a scope, unless the name is a slice.
fn unit_name(prefix: &str, name: &str) -> String {
    match name.ends_with(".slice") {
        true => name.to_owned(),
        false => format!("{prefix}-{name}.scope"),
    }
}

/// The pod's cgroup, which this shim is in while it exists.
pub struct HostCgroup {
    cgroup: Cgroup,
    /// The cgroups the shim came from, one per hierarchy: where it goes
    /// back before the pod's cgroup is removed.
    origin: Vec<PathBuf>,
}

impl HostCgroup {
    /// Makes the cgroup `cgroups_path` (and its missing ancestors), sets
    /// `limits` and moves this process into it. On error nothing is left.
    pub fn enter(cgroups_path: &str, limits: Limits) -> Result<HostCgroup, String> {
        let relative = relative_path(cgroups_path)?;
        let origin = own_cgroups()
            .map_err(|e| format!("cannot read the shim's own cgroups (/proc/self/cgroup): {e}"))?;
        let made: Vec<String> = ancestors(&relative)
            .filter(|ancestor| !exists(ancestor))
            .collect();
        let fail = |what: &str, e: cgroups_rs::error::Error| {
            format!("cannot {what} the pod's cgroup {relative} (linux.cgroupsPath {cgroups_path:?}): {e}")
        };
        let cgroup = Cgroup::new(hierarchies::auto(), &relative).map_err(|e| fail("make", e))?;
        for dir in made.iter().flat_map(|ancestor| dirs(ancestor)) {
            // Without the mark the directory only stays behind, empty.
            let _ = rustix::fs::setxattr(&dir, MADE_XATTR, b"1", XattrFlags::empty());
        }
        let host = HostCgroup { cgroup, origin };
        host.limit(limits).map_err(|e| fail("limit", e))?;
        host.cgroup
            .add_task_by_tgid(CgroupPid::from(u64::from(std::process::id())))
            .map_err(|e| fail("enter", e))?;
        tracing::info!(cgroup = %relative, ?limits, "the pod VM's host processes are in the pod's cgroup");
        Ok(host)
    }

    fn limit(&self, limits: Limits) -> cgroups_rs::error::Result<()> {
        if let Some(memory) = self.cgroup.controller_of::<MemController>() {
            memory.set_limit(limits.memory_bytes as i64)?;
        }
        if let (Some(cpu), Some((quota, period))) =
            (self.cgroup.controller_of::<CpuController>(), limits.cpu)
        {
            cpu.set_cfs_quota_and_period(Some(quota as i64), Some(period))?;
        }
        Ok(())
    }
}

impl Drop for HostCgroup {
    /// Moves the shim back where it came from and removes the cgroup and
    /// the ancestors runv made. The VM's helpers must be gone: a cgroup
    /// that still holds a process stays, with a warning.
    fn drop(&mut self) {
        let pid = std::process::id().to_string();
        for dir in &self.origin {
            if let Err(e) = fs::write(dir.join("cgroup.procs"), &pid) {
                tracing::warn!(cgroup = %dir.display(), error = %e, "cannot move the shim back to its cgroup");
            }
        }
        remove(self.cgroup.path());
    }
}

/// Removes the cgroup `relative`, then each ancestor that runv made
/// ([`MADE_XATTR`]) and nothing else uses: the last pod in it removes it.
fn remove(relative: &str) {
    if let Err(e) = Cgroup::load(hierarchies::auto(), relative).delete() {
        tracing::warn!(cgroup = %relative, error = %e, "cannot remove the pod's cgroup");
        return;
    }
    for ancestor in ancestors(relative) {
        let dirs = dirs(&ancestor);
        let made = dirs.iter().any(|dir| {
            let mut mark = [0u8; 1];
            rustix::fs::getxattr(dir, MADE_XATTR, &mut mark).is_ok()
        });
        // Busy while another pod's cgroup is in it.
        if !made || dirs.iter().any(|dir| fs::remove_dir(dir).is_err()) {
            return;
        }
    }
}

/// Removes the cgroup `cgroups_path` if it is there and empty: the
/// cleanup after a shim that died (its helpers died with it).
pub fn remove_leftover(cgroups_path: &str) {
    let Ok(relative) = relative_path(cgroups_path) else {
        return;
    };
    if exists(&relative) {
        remove(&relative);
    }
}

/// `relative`'s ancestors, innermost first, the root excluded.
fn ancestors(relative: &str) -> impl Iterator<Item = String> + '_ {
    Path::new(relative)
        .ancestors()
        .skip(1)
        .filter(|ancestor| !ancestor.as_os_str().is_empty())
        .map(|ancestor| ancestor.to_string_lossy().into_owned())
}

/// The directories of the cgroup `relative`, one per hierarchy.
fn dirs(relative: &str) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Cgroup::load(hierarchies::auto(), relative)
        .subsystems()
        .iter()
        .map(|subsystem| subsystem.to_controller().path().to_owned())
        .collect();
    dirs.dedup();
    dirs
}

fn exists(relative: &str) -> bool {
    dirs(relative).iter().any(|dir| dir.is_dir())
}

/// This process's cgroup directories, one per hierarchy.
fn own_cgroups() -> cgroups_rs::error::Result<Vec<PathBuf>> {
    let relative = get_cgroups_relative_paths()?;
    let root = Cgroup::load(hierarchies::auto(), "");
    let mut dirs: Vec<PathBuf> = Vec::new();
    for subsystem in root.subsystems() {
        let name = subsystem.controller_name();
        // v2 has one line, `0::<path>`; v1 one per hierarchy, a named one
        // (systemd's) as `name=<name>`.
        let path = match root.v2() {
            true => relative.get(""),
            false => relative
                .get(&name)
                .or_else(|| relative.get(&format!("name={name}"))),
        };
        if let Some(path) = path {
            let dir = subsystem
                .to_controller()
                .path()
                .join(path.trim_start_matches('/'));
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    Ok(dirs)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn cgroupfs_paths_are_kept() {
        assert_eq!(
            relative_path("/kubepods/burstable/pod1/abc").unwrap(),
            "kubepods/burstable/pod1/abc"
        );
        assert_eq!(relative_path("runv/abc").unwrap(), "runv/abc");
    }

    #[test]
    fn systemd_paths_nest_their_slices() {
        assert_eq!(
            relative_path("kubepods-besteffort-pod1.slice:cri-containerd:abc").unwrap(),
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/\
             cri-containerd-abc.scope"
        );
        assert_eq!(
            relative_path(":cri-containerd:abc").unwrap(),
            "system.slice/cri-containerd-abc.scope"
        );
        assert_eq!(relative_path("-.slice:p:abc").unwrap(), "p-abc.scope");
        assert_eq!(
            relative_path("a.slice:p:b.slice").unwrap(),
            "a.slice/b.slice"
        );
    }

    #[test]
    fn paths_that_climb_out_are_refused() {
        for path in [
            "/kubepods/../../etc",
            "/a//b",
            "/",
            "a.slice:p:../x",
            "a--b.slice:p:c",
            "nota:slice:c",
            "a:b",
        ] {
            let err = relative_path(path).unwrap_err();
            assert!(err.contains("linux.cgroupsPath"), "{path}: {err}");
        }
    }

    #[test]
    fn limits_are_the_vm_and_the_overhead() {
        let size = VmSize {
            vcpus: 3,
            memory_mib: 768,
        };
        let unlimited = PodResources::default();
        assert_eq!(
            Limits::for_vm(size, &unlimited),
            Limits {
                memory_bytes: (768 + HOST_OVERHEAD_MIB) << 20,
                cpu: None
            }
        );
        let limited = PodResources {
            cpu_quota_us: 150_000,
            cpu_period_us: 50_000,
            ..PodResources::default()
        };
        assert_eq!(Limits::for_vm(size, &limited).cpu, Some((150_000, 50_000)));
    }

    /// The real cgroup file system: made with its missing parents,
    /// limited, entered, and all gone with the shim back where it was.
    #[test]
    fn enter_limits_and_removes_a_fresh_cgroup() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIPPED: making cgroups needs root");
            return;
        }
        let top = format!("runv-unit-{}", std::process::id());
        let path = format!("/{top}/pod/sandbox");
        let before = fs::read_to_string("/proc/self/cgroup").unwrap();
        let limits = Limits {
            memory_bytes: 300 << 20,
            cpu: Some((150_000, 100_000)),
        };
        let cgroup = HostCgroup::enter(&path, limits).unwrap();
        let inside = fs::read_to_string("/proc/self/cgroup").unwrap();
        // v1's memory hierarchy, or v2's only one (a hybrid host's v2
        // hierarchy holds no controller and is not used).
        let memory_line = inside
            .lines()
            .find(|line| line.contains(":memory:"))
            .or_else(|| inside.lines().find(|line| line.starts_with("0::")))
            .unwrap();
        assert!(memory_line.ends_with(&path[..]), "{inside}");
        let memory = dirs(&path[1..])
            .into_iter()
            .find_map(|dir| {
                ["memory.max", "memory.limit_in_bytes"]
                    .iter()
                    .find_map(|file| fs::read_to_string(dir.join(file)).ok())
            })
            .expect("a memory limit file");
        assert_eq!(memory.trim(), (300u64 << 20).to_string());
        // A second pod under the same parents, which it did not make:
        // the parents stay while the first pod is in them.
        let second = HostCgroup::enter(&format!("/{top}/pod/second"), limits).unwrap();
        drop(second);
        assert!(exists(&path[1..]), "the first pod's cgroup stays");
        drop(cgroup);
        assert_eq!(fs::read_to_string("/proc/self/cgroup").unwrap(), before);
        assert!(!exists(&top), "{top} is left");
    }

    #[test]
    fn the_spec_names_the_path() {
        let spec = json!({ "linux": { "cgroupsPath": "/kubepods/pod1/abc" } });
        assert_eq!(spec_cgroups_path(&spec), Some("/kubepods/pod1/abc"));
        assert_eq!(spec_cgroups_path(&json!({ "linux": {} })), None);
        assert_eq!(
            spec_cgroups_path(&json!({ "linux": { "cgroupsPath": "" } })),
            None
        );
    }
}
