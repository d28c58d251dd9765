//! Containers without a PID namespace of their own: one that joined
//! another container's (CRI's `shareProcessNamespace`, `kubectl debug
//! --target`), or that runs in the VM's. When such a container's init
//! ends, no namespace teardown kills its other processes; they would live
//! on holding its stdio, and the host would never see the container end.
//! As runc's shim does, the agent kills what is left of the container
//! (its cgroup) once its init has ended.

use std::{fs, io::ErrorKind, path::PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::reaper::ExitWatch;

/// Whether the container gets a PID namespace of its own (an entry
/// without a path), in which its init's end ends every process.
pub fn has_own_namespace(spec: &Spec) -> bool {
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|linux| linux.namespaces().as_ref());
    namespaces.is_some_and(|namespaces| {
        namespaces
            .iter()
            .any(|ns| ns.typ() == LinuxNamespaceType::Pid && ns.path().is_none())
    })
}

/// Once `init` has ended, kills every process left in the container's
/// cgroup `cgroup_dir` (cgroup v2's `cgroup.kill`: its descendants too,
/// and no fork escapes it).
pub fn kill_leftovers_after(mut init: ExitWatch, container_id: String, cgroup_dir: PathBuf) {
    tokio::spawn(async move {
        if init.wait_for(Option::is_some).await.is_err() {
            return;
        }
        match fs::write(cgroup_dir.join("cgroup.kill"), "1") {
            Ok(()) => tracing::info!(container = %container_id, "init ended: killed the rest"),
            // Removed already: nothing is left.
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                container = %container_id,
                error = %e,
                "init ended, but its other processes could not be killed"
            ),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(namespaces: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"namespaces": namespaces}
        }))
        .unwrap()
    }

    #[test]
    fn only_a_fresh_pid_namespace_is_the_containers_own() {
        assert!(has_own_namespace(&spec_with(
            serde_json::json!([{"type": "pid"}, {"type": "ipc"}])
        )));
        assert!(!has_own_namespace(&spec_with(
            serde_json::json!([{"type": "pid", "path": "/proc/7/ns/pid"}])
        )));
        assert!(!has_own_namespace(&spec_with(
            serde_json::json!([{"type": "ipc"}])
        )));
    }
}
