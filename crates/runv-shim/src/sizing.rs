//! The pod VM's size. The VM boots with the sandbox, before any app
//! container exists, so it is sized once, from what the pod declares:
//! containerd's CRI plugin (1.6.7 and later) puts the sum of the pod's
//! container limits, which the kubelet (1.23 and later) passes in
//! `PodSandboxConfig.linux.resources`, on the sandbox's spec as
//! annotations. The configured `vm.vcpus` and `vm.memory_mib` are the VM's
//! own base; the pod's limits come on top, as they would on a runc node
//! whose pods share the host kernel's resources.

use runv_config::VmConfig;
use serde_json::Value;

/// CFS period and quota (µs) of the pod: its CPU limit is quota / period.
const CPU_PERIOD_ANNOTATION: &str = "io.kubernetes.cri.sandbox-cpu-period";
const CPU_QUOTA_ANNOTATION: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// The pod's memory limit in bytes.
const MEMORY_ANNOTATION: &str = "io.kubernetes.cri.sandbox-memory";
/// Who the pod is, for people reading the shim's warnings.
const NAME_ANNOTATION: &str = "io.kubernetes.cri.sandbox-name";
const NAMESPACE_ANNOTATION: &str = "io.kubernetes.cri.sandbox-namespace";

const MIB: u64 = 1 << 20;

/// The limits a pod declares; 0 where it declares none. containerd writes
/// 0 for an absent limit, and a container outside CRI has no annotations.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PodResources {
    /// Who asks, for warnings: `namespace/name`, or the pod ID.
    pub pod: String,
    pub cpu_period_us: u64,
    pub cpu_quota_us: u64,
    pub memory_bytes: u64,
}

/// An annotation's limit; a negative one means "no limit" (0), as
/// cgroups' quota of -1 does.
fn parse_limit(key: &str, text: &str) -> Result<u64, String> {
    let value = text.trim().parse::<i64>().map_err(|_| {
        format!("the sandbox annotation {key} is {text:?}; containerd writes an integer")
    })?;
    Ok(value.max(0) as u64)
}

/// What the VM boots with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u32,
}

impl PodResources {
    /// Reads the pod's limits from the sandbox's spec. A value that is not
    /// an integer is an error: a VM silently smaller than the pod's limits
    /// would OOM-kill its containers below them.
    pub fn from_spec(spec: &Value, pod_id: &str) -> Result<PodResources, String> {
        let annotation = |key: &str| spec.get("annotations")?.get(key)?.as_str();
        let limit = |key: &str| annotation(key).map_or(Ok(0), |text| parse_limit(key, text));
        let pod = match (
            annotation(NAMESPACE_ANNOTATION),
            annotation(NAME_ANNOTATION),
        ) {
            (Some(namespace), Some(name)) => format!("{namespace}/{name}"),
            _ => pod_id.to_owned(),
        };
        Ok(PodResources {
            pod,
            cpu_period_us: limit(CPU_PERIOD_ANNOTATION)?,
            cpu_quota_us: limit(CPU_QUOTA_ANNOTATION)?,
            memory_bytes: limit(MEMORY_ANNOTATION)?,
        })
    }

    /// Whole CPUs the pod's limit needs, rounded up: a 1.5-CPU limit
    /// needs 2 vCPUs to be reachable.
    fn cpus(&self) -> u64 {
        match (self.cpu_quota_us, self.cpu_period_us) {
            (0, _) | (_, 0) => 0,
            (quota, period) => quota.div_ceil(period),
        }
    }

    fn memory_mib(&self) -> u64 {
        self.memory_bytes.div_ceil(MIB)
    }
}

/// The VM's size for `pod`: the base of `vm` plus the pod's limits, at
/// most the configured caps (with a warning naming the pod, since its
/// containers can then not use all they were promised).
pub fn vm_size(vm: &VmConfig, pod: &PodResources) -> VmSize {
    let vcpus = capped(
        pod,
        "vCPUs",
        u64::from(vm.vcpus) + pod.cpus(),
        vm.vcpu_cap(),
        "vm.max_vcpus",
    );
    let memory_mib = capped(
        pod,
        "MiB of memory",
        u64::from(vm.memory_mib) + pod.memory_mib(),
        vm.max_memory_mib,
        "vm.max_memory_mib",
    );
    VmSize { vcpus, memory_mib }
}

fn capped(pod: &PodResources, what: &str, asked: u64, cap: u32, key: &str) -> u32 {
    if asked <= u64::from(cap) {
        return asked as u32;
    }
    tracing::warn!(
        pod = %pod.pod,
        "the pod's limits need a VM of {asked} {what}; it gets {cap} ({key} in the runv config)"
    );
    cap
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn vm(vcpus: u32, memory_mib: u32) -> VmConfig {
        VmConfig {
            vcpus,
            memory_mib,
            max_vcpus: Some(8),
            max_memory_mib: 4096,
            ..VmConfig::default()
        }
    }

    fn sandbox(annotations: Value) -> Value {
        json!({ "annotations": annotations })
    }

    fn resources(period: &str, quota: &str, memory: &str) -> PodResources {
        PodResources::from_spec(
            &sandbox(json!({
                CPU_PERIOD_ANNOTATION: period,
                CPU_QUOTA_ANNOTATION: quota,
                MEMORY_ANNOTATION: memory,
            })),
            "p1",
        )
        .unwrap()
    }

    #[test]
    fn limits_come_on_top_of_the_base() {
        let pod = resources("100000", "200000", &(512 << 20).to_string());
        assert_eq!(
            vm_size(&vm(1, 256), &pod),
            VmSize {
                vcpus: 3,
                memory_mib: 768
            }
        );
    }

    #[test]
    fn partial_cpus_and_mib_round_up() {
        // 1.5 CPUs (1500m) and 100 MiB and a byte.
        let pod = resources("100000", "150000", &((100 << 20) + 1).to_string());
        assert_eq!(
            vm_size(&vm(1, 256), &pod),
            VmSize {
                vcpus: 3,
                memory_mib: 357
            }
        );
        // 100m still needs a vCPU of its own.
        let pod = resources("100000", "10000", "0");
        assert_eq!(vm_size(&vm(1, 256), &pod).vcpus, 2);
    }

    #[test]
    fn no_limits_give_the_base() {
        let base = VmSize {
            vcpus: 2,
            memory_mib: 512,
        };
        // What containerd writes for a pod without limits.
        let pod = resources("100000", "0", "0");
        assert_eq!(vm_size(&vm(2, 512), &pod), base);
        // A quota without a period, and cgroups' "unlimited".
        assert_eq!(vm_size(&vm(2, 512), &resources("0", "50000", "0")), base);
        assert_eq!(vm_size(&vm(2, 512), &resources("100000", "-1", "-1")), base);
        // `ctr run`, or a containerd before 1.6.7: no annotations.
        let none = PodResources::from_spec(&json!({}), "p1").unwrap();
        assert_eq!(
            none,
            PodResources {
                pod: "p1".into(),
                ..PodResources::default()
            }
        );
        assert_eq!(vm_size(&vm(2, 512), &none), base);
    }

    #[test]
    fn caps_bound_the_size() {
        let pod = resources("100000", "6400000", &(64u64 << 30).to_string());
        assert_eq!(
            vm_size(&vm(1, 256), &pod),
            VmSize {
                vcpus: 8,
                memory_mib: 4096
            }
        );
    }

    #[test]
    fn the_pod_is_named_by_namespace_and_name() {
        let spec = sandbox(json!({
            NAMESPACE_ANNOTATION: "default",
            NAME_ANNOTATION: "web",
        }));
        let pod = PodResources::from_spec(&spec, "abc123").unwrap();
        assert_eq!(pod.pod, "default/web");
    }

    #[test]
    fn malformed_annotations_are_named() {
        for (key, value) in [
            (CPU_QUOTA_ANNOTATION, "2 CPUs"),
            (CPU_PERIOD_ANNOTATION, ""),
            (MEMORY_ANNOTATION, "512Mi"),
        ] {
            let err = PodResources::from_spec(&sandbox(json!({ key: value })), "p1").unwrap_err();
            assert!(
                err.contains(key) && err.contains(&format!("{value:?}")),
                "{err}"
            );
        }
    }
}
