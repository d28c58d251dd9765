//! A container's `linux.namespaces` as the guest must see them.
//!
//! CRI makes a pod's containers share namespaces by naming, in each app
//! container's spec, `/proc/<pid>/ns/<type>` where `<pid>` is the task PID
//! the runtime reported for the sandbox (for `kubectl debug --target`'s
//! PID namespace, the target container's). runv reports the shim's own
//! PID for every task (`process::task_pid`), never a guest PID, so such a
//! path is rewritten to the sandbox init's guest PID as the agent sees it:
//! the agent is the guest's PID 1 and its /proc is the root PID
//! namespace's, where the OCI runtime opens the path before entering the
//! container's mount namespace. As every task has the same PID, a
//! `--target` path names the sandbox's PID namespace too. Any other path
//! names something on the host, which a VM cannot join, and goes (with a
//! warning) for a namespace of the container's own.

use serde_json::{json, Value};

use crate::process::task_pid;

/// The types whose paths may name a pod container's namespace; their
/// OCI type is also their file's name under /proc/<pid>/ns. The network
/// namespace never reaches the guest: the VM is the pod's network boundary.
const SHAREABLE: [&str; 3] = ["ipc", "uts", "pid"];

/// Rewrites `namespaces` for the guest, where `pod_inits` holds the guest
/// PID of the pod's sandbox init while it runs (the only process whose
/// namespaces a spec may name); a `hostname` needs a UTS namespace.
pub fn for_guest(namespaces: &mut Vec<Value>, pod_inits: &[u32], has_hostname: bool) {
    namespaces.retain(|ns| ns.get("type").and_then(Value::as_str) != Some("network"));
    for namespace in namespaces.iter_mut().filter_map(Value::as_object_mut) {
        let Some(path) = namespace.get("path").and_then(Value::as_str) else {
            continue;
        };
        let kind = namespace.get("type").and_then(Value::as_str).unwrap_or("");
        match guest_path(kind, path, pod_inits) {
            Some(guest) => {
                namespace.insert("path".into(), guest.into());
            }
            None => {
                tracing::warn!(
                    namespace = kind,
                    path,
                    "the container gets a {kind} namespace of its own: \
                 the path names no namespace of this pod's containers in the VM"
                );
                namespace.remove("path");
            }
        }
    }
    if has_hostname {
        give_hostname_a_namespace(namespaces);
    }
}

/// Refuses a pod whose first container (the CRI sandbox, or a container
/// of its own with `ctr run`) would share the node's network, IPC or PID
/// namespace: a runv pod is a VM with its own kernel, so such a pod would
/// silently get the VM's namespaces instead of the node's.
pub fn refuse_node_namespaces(spec: &Value) -> Result<(), String> {
    let namespaces = spec
        .pointer("/linux/namespaces")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let has = |kind: &str| {
        namespaces
            .iter()
            .any(|ns| ns.get("type").and_then(Value::as_str) == Some(kind))
    };
    let shared: Vec<&str> = [
        ("network", "hostNetwork: true (ctr run --net-host)"),
        ("ipc", "hostIPC: true"),
        ("pid", "hostPID: true"),
    ]
    .into_iter()
    .filter(|(kind, _)| !has(kind))
    .map(|(_, field)| field)
    .collect();
    if shared.is_empty() {
        return Ok(());
    }
    Err(format!(
        "runv cannot run this pod: it asks to share the node's namespaces ({}), \
         and a runv pod is a VM with its own kernel, which has only its own; \
         run it with runc (no runtimeClassName, or `ctr run` without \
         --runtime io.containerd.runv.v2), or drop those settings",
        shared.join(", ")
    ))
}

/// The guest's path for `path` if it is `/proc/<task PID>/ns/<kind>` for
/// a shareable `kind` while the sandbox's init runs (once it has ended,
/// there is no namespace to join).
fn guest_path(kind: &str, path: &str, pod_inits: &[u32]) -> Option<String> {
    let pid = path
        .strip_prefix("/proc/")
        .and_then(|rest| rest.strip_suffix(&format!("/ns/{kind}")))
        .and_then(|pid| pid.parse::<u32>().ok())?;
    let init = pod_inits.first()?;
    (SHAREABLE.contains(&kind) && pid == task_pid()).then(|| format!("/proc/{init}/ns/{kind}"))
}

/// A spec that names a hostname but no UTS namespace would set the name
/// of the VM's own UTS namespace, which an OCI runtime refuses to do: the
/// container gets a UTS namespace of its own instead (which, for a CRI
/// sandbox, the pod's app containers join).
fn give_hostname_a_namespace(namespaces: &mut Vec<Value>) {
    let has_uts = namespaces
        .iter()
        .any(|ns| ns.get("type").and_then(Value::as_str) == Some("uts"));
    if !has_uts {
        namespaces.push(json!({"type": "uts"}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(namespaces: Value, pod_inits: &[u32]) -> Value {
        let mut namespaces = serde_json::from_value(namespaces).unwrap();
        for_guest(&mut namespaces, pod_inits, false);
        Value::Array(namespaces)
    }

    #[test]
    fn paths_to_the_sandboxs_namespaces_name_its_guest_init() {
        let task = task_pid();
        let cri_app = json!([
            {"type": "pid", "path": format!("/proc/{task}/ns/pid")},
            {"type": "network", "path": "/var/run/netns/cni-1"},
            {"type": "ipc", "path": format!("/proc/{task}/ns/ipc")},
            {"type": "uts", "path": format!("/proc/{task}/ns/uts")},
            {"type": "mount"}
        ]);
        assert_eq!(
            rewritten(cri_app, &[7]),
            json!([
                {"type": "pid", "path": "/proc/7/ns/pid"},
                {"type": "ipc", "path": "/proc/7/ns/ipc"},
                {"type": "uts", "path": "/proc/7/ns/uts"},
                {"type": "mount"}
            ])
        );
    }

    #[test]
    fn other_paths_give_namespaces_of_the_containers_own() {
        let task = task_pid();
        let elsewhere = json!([
            // A host process; a guest PID.
            {"type": "ipc", "path": "/proc/42/ns/ipc"},
            {"type": "ipc", "path": "/proc/7/ns/ipc"},
            // Another type's file of the task.
            {"type": "uts", "path": format!("/proc/{task}/ns/ipc")},
            // Not a type the pod shares.
            {"type": "mount", "path": format!("/proc/{task}/ns/mount")},
            // A bind-mounted namespace file on the host.
            {"type": "pid", "path": "/run/ns/pid"},
            {"type": "pid", "path": format!("/proc/{task}/../{task}/ns/pid")}
        ]);
        assert_eq!(
            rewritten(elsewhere, &[7]),
            json!([{"type": "ipc"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                   {"type": "pid"}, {"type": "pid"}])
        );
        // The sandbox has ended: nothing to join.
        let ended = json!([{"type": "ipc", "path": format!("/proc/{task}/ns/ipc")}]);
        assert_eq!(rewritten(ended, &[]), json!([{"type": "ipc"}]));
    }

    #[test]
    fn pods_in_the_nodes_namespaces_are_refused_by_name() {
        let own = json!({"linux": {"namespaces": [
            {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
            {"type": "network", "path": "/var/run/netns/cni-1"}]}});
        refuse_node_namespaces(&own).unwrap();
        let host_network = json!({"linux": {"namespaces": [
            {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]}});
        let err = refuse_node_namespaces(&host_network).unwrap_err();
        assert!(err.contains("hostNetwork: true"), "{err}");
        assert!(
            !err.contains("hostIPC") && !err.contains("hostPID"),
            "{err}"
        );
        assert!(err.contains("run it with runc"), "{err}");
        let err = refuse_node_namespaces(&json!({"linux": {"namespaces": [
            {"type": "network"}, {"type": "mount"}]}}))
        .unwrap_err();
        assert!(err.contains("hostIPC: true, hostPID: true"), "{err}");
        let err = refuse_node_namespaces(&json!({"process": {}})).unwrap_err();
        assert!(
            err.contains("hostNetwork: true") && err.contains("hostPID: true"),
            "{err}"
        );
    }

    #[test]
    fn a_joined_uts_namespace_takes_no_other() {
        let path = format!("/proc/{}/ns/uts", task_pid());
        let mut joined = vec![json!({"type": "uts", "path": path})];
        for_guest(&mut joined, &[7], true);
        assert_eq!(joined, [json!({"type": "uts", "path": "/proc/7/ns/uts"})]);
    }
}
