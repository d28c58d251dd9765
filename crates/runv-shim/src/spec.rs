//! The OCI runtime spec as the guest must see it. containerd writes the
//! bundle's config.json with host paths; inside the VM the container's
//! root and every host bind mount come through the pod's shared directory
//! (virtio-fs), and host-only settings have no meaning.
//!
//! The spec is handled as JSON, so that fields runv does not touch pass
//! through to the agent exactly as containerd wrote them.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde_json::{Map, Value};

use crate::namespaces;

/// A host path the guest reaches through the shared directory: the caller
/// bind-mounts `source` at `<shared>/<container id>/<share_name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    pub source: PathBuf,
    pub share_name: String,
    /// The mount asked for `ro`: the host bind is read-only too.
    pub read_only: bool,
    /// The mount asked for `rslave` or `rshared` (Kubernetes'
    /// HostToContainer and Bidirectional): mounts the host makes under the
    /// source later reach the guest.
    pub follows_host: bool,
}

/// What the guest reaches through disks the agent mounted rather than
/// through the shared directory (see `disks`).
#[derive(Debug, Default)]
pub struct DiskPlacement {
    /// The guest mount of the root file system, when it is a disk.
    pub root: Option<PathBuf>,
    /// The guest mounts of disk volumes, by index in the spec's mounts.
    pub volumes: BTreeMap<usize, PathBuf>,
}

/// The guest's spec and the host binds it relies on.
#[derive(Debug)]
pub struct GuestSpec {
    pub spec: Value,
    pub binds: Vec<HostBind>,
}

/// CRI's annotations that group containers into pods.
const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";
const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

/// Reads a bundle's config.json.
pub fn read(bundle: &Path) -> Result<Value, String> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("{} is not valid JSON: {e}", path.display()))
}

/// The pod container `container_id` belongs to: a CRI app container
/// joins its sandbox's pod; a sandbox, or a container outside any pod
/// (`ctr run`), is a pod of its own.
pub fn pod_id(spec: &Value, container_id: &str) -> String {
    let annotation = |key: &str| spec.get("annotations")?.get(key)?.as_str();
    match (
        annotation(CONTAINER_TYPE_ANNOTATION),
        annotation(SANDBOX_ID_ANNOTATION),
    ) {
        (Some("container"), Some(sandbox)) if !sandbox.is_empty() => sandbox.to_owned(),
        _ => container_id.to_owned(),
    }
}

/// The share name of a container's root file system.
pub const ROOTFS_SHARE: &str = "rootfs";

/// Host directories whose bind mounts name the guest's own (the guest has
/// its own /dev, /proc and /sys), kept as they are.
const GUEST_OWNED_SOURCES: [&str; 3] = ["/dev", "/proc", "/sys"];

/// Rewrites `spec` (a bundle's config.json) for container `id` whose guest
/// share directory is `guest_dir` (`GUEST_SHARED_DIR/<id>`), with its disks
/// where `disks` says, in a pod whose running container inits have the
/// guest PIDs `pod_inits`:
/// - `root.path` becomes the root disk's mount or `<guest_dir>/rootfs`;
/// - each disk volume becomes a bind of its guest mount;
/// - each bind mount of a host path becomes a bind of its share;
/// - namespaces as [`namespaces::for_guest`] says: the network namespace
///   goes, paths naming a pod container's IPC, UTS or PID namespace stay;
/// - the cgroups path goes: it names the host's hierarchy (systemd's
///   `slice:prefix:name` form included), the agent places the container
///   in the guest's;
/// - OCI hooks, AppArmor and SELinux labels go: they are host facilities.
pub fn for_guest(
    mut spec: Value,
    guest_dir: &Path,
    disks: &DiskPlacement,
    pod_inits: &[u32],
) -> Result<GuestSpec, String> {
    let root = spec.get_mut("root").and_then(Value::as_object_mut).ok_or(
        "config.json has no `root`: containerd always writes one; is the bundle complete?",
    )?;
    let root_path = match &disks.root {
        Some(disk) => disk.clone(),
        None => guest_dir.join(ROOTFS_SHARE),
    };
    root.insert("path".into(), root_path.to_string_lossy().into());
    let binds = share_bind_mounts(&mut spec, guest_dir, &disks.volumes)?;
    let object = spec
        .as_object_mut()
        .ok_or("config.json is not a JSON object")?;
    if object.remove("hooks").is_some() {
        tracing::warn!(
            "dropping OCI hooks: they are host programs, and the container runs in a VM"
        );
    }
    let has_hostname = object
        .get("hostname")
        .and_then(Value::as_str)
        .is_some_and(|name| !name.is_empty());
    if let Some(linux) = object.get_mut("linux").and_then(Value::as_object_mut) {
        linux.remove("mountLabel");
        linux.remove("cgroupsPath");
        if let Some(namespaces) = linux.get_mut("namespaces").and_then(Value::as_array_mut) {
            namespaces::for_guest(namespaces, pod_inits, has_hostname);
        }
    }
    if let Some(process) = object.get_mut("process").and_then(Value::as_object_mut) {
        strip_host_labels(process);
    }
    Ok(GuestSpec { spec, binds })
}

/// Names the node's hostname in a spec that names none, as runc's
/// container would have it: a new UTS namespace starts with the node's
/// name, where in the VM it would start with the guest's ("(none)").
/// [`for_guest`] then gives the container a UTS namespace of its own if it
/// has none. A container that joins a pod's UTS namespace keeps its name.
pub fn default_hostname(spec: &mut Value, node_hostname: &str) {
    let Some(object) = spec.as_object_mut() else {
        return;
    };
    let named = object
        .get("hostname")
        .and_then(Value::as_str)
        .is_some_and(|name| !name.is_empty());
    let joins_uts = object
        .get("linux")
        .and_then(|linux| linux.get("namespaces"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|ns| {
            ns.get("type").and_then(Value::as_str) == Some("uts") && ns.get("path").is_some()
        });
    if !named && !joins_uts {
        object.insert("hostname".into(), node_hostname.into());
    }
}

/// An exec's OCI process (containerd's JSON) as the guest must see it.
pub fn process_for_guest(process_json: &[u8]) -> Result<Vec<u8>, String> {
    let mut process: Value = serde_json::from_slice(process_json)
        .map_err(|e| format!("the exec's process spec is not valid JSON: {e}"))?;
    let object = process
        .as_object_mut()
        .ok_or("the exec's process spec is not a JSON object")?;
    strip_host_labels(object);
    Ok(serde_json::to_vec(&process).expect("a JSON value serializes"))
}

fn strip_host_labels(process: &mut Map<String, Value>) {
    process.remove("apparmorProfile");
    process.remove("selinuxLabel");
}

fn share_bind_mounts(
    spec: &mut Value,
    guest_dir: &Path,
    disk_volumes: &BTreeMap<usize, PathBuf>,
) -> Result<Vec<HostBind>, String> {
    let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) else {
        return Ok(Vec::new());
    };
    let mut binds = Vec::new();
    for (index, mount) in mounts.iter_mut().enumerate() {
        let Some(mount) = mount.as_object_mut() else {
            return Err(format!("config.json mount {index} is not an object"));
        };
        if let Some(guest_mount) = disk_volumes.get(&index) {
            bind_disk_mount(mount, guest_mount);
            continue;
        }
        if !is_bind(mount) {
            continue;
        }
        let destination = mount
            .get("destination")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let source = mount
            .get("source")
            .and_then(Value::as_str)
            .map(PathBuf::from)
            .ok_or_else(|| format!("bind mount at {destination:?} has no source"))?;
        if !source.is_absolute() {
            return Err(format!(
                "bind mount at {destination:?} has the relative source {source:?}: give an \
                 absolute host path"
            ));
        }
        if GUEST_OWNED_SOURCES
            .iter()
            .any(|dir| source.starts_with(dir))
        {
            continue;
        }
        let leaf = Path::new(&destination)
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let share_name = format!("mounts/{index}-{leaf}");
        mount.insert(
            "source".into(),
            guest_dir.join(&share_name).to_string_lossy().into(),
        );
        let read_only = has_option(mount, "ro");
        let follows_host = ["rslave", "slave", "rshared", "shared"]
            .iter()
            .any(|option| has_option(mount, option));
        binds.push(HostBind {
            source,
            share_name,
            read_only,
            follows_host,
        });
    }
    Ok(binds)
}

/// Whether the OCI mount `mount` lists `option`.
fn has_option(mount: &Map<String, Value>, option: &str) -> bool {
    mount
        .get("options")
        .and_then(Value::as_array)
        .is_some_and(|options| options.iter().any(|o| o.as_str() == Some(option)))
}

/// Makes `mount` a bind of the disk the agent mounted at `guest_mount`,
/// read-only if the mount asked for it.
fn bind_disk_mount(mount: &mut Map<String, Value>, guest_mount: &Path) {
    let mut options = vec!["rbind"];
    if has_option(mount, "ro") {
        options.push("ro");
    }
    mount.insert("type".into(), "bind".into());
    mount.insert("source".into(), guest_mount.to_string_lossy().into());
    mount.insert("options".into(), options.into());
}

/// A place in the container's root file system that a mount of its spec
/// needs to exist.
#[derive(Debug, PartialEq, Eq)]
pub struct MountPoint {
    /// The path inside the container.
    pub path: PathBuf,
    /// An empty file (the bind of a host file), else a directory.
    pub file: bool,
}

/// The mount points the spec's mounts need in the root file system
/// itself, in order: those below another mount that is not a bind (a
/// tmpfs `/dev`, `/sys`) are made in that mount, not in the root.
pub fn mount_points(spec: &Value) -> Vec<MountPoint> {
    let mut covered: Vec<PathBuf> = Vec::new();
    let mut points = Vec::new();
    let mounts = spec.get("mounts").and_then(Value::as_array);
    for mount in mounts.into_iter().flatten().filter_map(Value::as_object) {
        let Some(path) = mount.get("destination").and_then(Value::as_str) else {
            continue;
        };
        let path = PathBuf::from(path);
        if covered
            .iter()
            .any(|dir| path != *dir && path.starts_with(dir))
        {
            continue;
        }
        let bind = is_bind(mount);
        let file = bind
            && mount
                .get("source")
                .and_then(Value::as_str)
                .and_then(|source| std::fs::metadata(source).ok())
                .is_some_and(|meta| !meta.is_dir());
        if !bind {
            covered.push(path.clone());
        }
        points.push(MountPoint { path, file });
    }
    points
}

fn is_bind(mount: &Map<String, Value>) -> bool {
    mount.get("type").and_then(Value::as_str) == Some("bind")
        || mount
            .get("options")
            .and_then(Value::as_array)
            .is_some_and(|options| {
                options
                    .iter()
                    .any(|o| matches!(o.as_str(), Some("bind" | "rbind")))
            })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn no_disks() -> DiskPlacement {
        DiskPlacement::default()
    }

    fn cri_like_spec() -> Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "apparmorProfile": "cri-containerd.apparmor.d"},
            "root": {"path": "rootfs", "readonly": true},
            "hooks": {"prestart": [{"path": "/usr/bin/hook"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind",
                 "source": "/var/lib/containerd/sandboxes/s1/hosts", "options": ["rbind", "rw"]},
                {"destination": "/data", "source": "/srv/data", "options": ["bind", "ro"]},
                {"destination": "/dev/fuse", "type": "bind", "source": "/dev/fuse"},
                {"destination": "/dev/shm", "type": "tmpfs", "source": "shm"}
            ],
            "linux": {
                "namespaces": [
                    {"type": "pid"},
                    {"type": "network", "path": "/var/run/netns/cni-1"},
                    {"type": "ipc", "path": "/proc/42/ns/ipc"}
                ],
                "mountLabel": "system_u:object_r:container_file_t"
            },
            "x-unknown": {"kept": true}
        })
    }

    #[test]
    fn root_and_host_binds_move_to_the_share() {
        let guest = for_guest(
            cri_like_spec(),
            Path::new("/run/runv/shared/c1"),
            &no_disks(),
            &[],
        )
        .unwrap();
        let spec = &guest.spec;
        assert_eq!(spec["root"]["path"], "/run/runv/shared/c1/rootfs");
        assert_eq!(spec["root"]["readonly"], true);
        assert_eq!(spec["mounts"][0]["source"], "proc");
        assert_eq!(
            spec["mounts"][1]["source"],
            "/run/runv/shared/c1/mounts/1-hosts"
        );
        assert_eq!(
            spec["mounts"][2]["source"],
            "/run/runv/shared/c1/mounts/2-data"
        );
        assert_eq!(spec["mounts"][3]["source"], "/dev/fuse");
        assert_eq!(spec["mounts"][4]["type"], "tmpfs");
        assert_eq!(
            guest.binds,
            vec![
                HostBind {
                    source: "/var/lib/containerd/sandboxes/s1/hosts".into(),
                    share_name: "mounts/1-hosts".into(),
                    read_only: false,
                    follows_host: false,
                },
                HostBind {
                    source: "/srv/data".into(),
                    share_name: "mounts/2-data".into(),
                    read_only: true,
                    follows_host: false,
                },
            ]
        );
        assert_eq!(spec["x-unknown"]["kept"], true);
    }

    #[test]
    fn mount_points_in_the_root_are_those_of_its_own_mounts() {
        let spec = json!({"mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hostname"},
            {"destination": "/data", "source": "/etc", "options": ["rbind", "ro"]}
        ]});
        let point = |path: &str, file| MountPoint {
            path: path.into(),
            file,
        };
        assert_eq!(
            mount_points(&spec),
            vec![
                point("/proc", false),
                point("/dev", false),
                point("/etc/hosts", true),
                point("/data", false),
            ]
        );
    }

    #[test]
    fn disks_are_bound_from_their_guest_mounts() {
        let disks = DiskPlacement {
            root: Some("/run/runv/disks/2".into()),
            volumes: BTreeMap::from([(2, PathBuf::from("/run/runv/disks/3"))]),
        };
        let guest = for_guest(cri_like_spec(), Path::new("/g"), &disks, &[]).unwrap();
        assert_eq!(guest.spec["root"]["path"], "/run/runv/disks/2");
        assert_eq!(
            guest.spec["mounts"][2],
            json!({"destination": "/data", "type": "bind",
                   "source": "/run/runv/disks/3", "options": ["rbind", "ro"]})
        );
        let shared: Vec<_> = guest.binds.iter().map(|b| b.share_name.as_str()).collect();
        assert_eq!(shared, ["mounts/1-hosts"], "the disk is not shared");
    }

    #[test]
    fn host_only_settings_go() {
        let spec = for_guest(cri_like_spec(), Path::new("/g"), &no_disks(), &[])
            .unwrap()
            .spec;
        assert!(spec.get("hooks").is_none());
        assert!(spec["process"].get("apparmorProfile").is_none());
        assert!(spec["linux"].get("mountLabel").is_none());
        assert_eq!(
            spec["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "ipc"}])
        );
    }

    #[test]
    fn a_hostname_without_a_uts_namespace_gets_one() {
        let spec = json!({"root": {"path": "rootfs"}, "hostname": "node-1",
            "linux": {"namespaces": [{"type": "pid"}],
                      "cgroupsPath": "kubepods-besteffort-pod1.slice:cri-containerd:c1"}});
        let spec = for_guest(spec, Path::new("/g"), &no_disks(), &[])
            .unwrap()
            .spec;
        assert_eq!(
            spec["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "uts"}])
        );
        assert!(spec["linux"].get("cgroupsPath").is_none());
        let no_hostname = json!({"root": {"path": "rootfs"},
            "linux": {"namespaces": [{"type": "pid"}]}});
        let spec = for_guest(no_hostname, Path::new("/g"), &no_disks(), &[])
            .unwrap()
            .spec;
        assert_eq!(spec["linux"]["namespaces"], json!([{"type": "pid"}]));
    }

    #[test]
    fn a_spec_without_hostname_gets_the_nodes_as_with_runc() {
        let mut ctr_run = json!({"linux": {"namespaces": [{"type": "uts"}, {"type": "pid"}]}});
        default_hostname(&mut ctr_run, "node-1");
        assert_eq!(ctr_run["hostname"], "node-1");
        let mut shares_the_vms = json!({"root": {"path": "rootfs"},
            "linux": {"namespaces": [{"type": "pid"}]}});
        default_hostname(&mut shares_the_vms, "node-1");
        let guest = for_guest(shares_the_vms, Path::new("/g"), &no_disks(), &[]).unwrap();
        assert_eq!(guest.spec["hostname"], "node-1");
        assert_eq!(
            guest.spec["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "uts"}])
        );
        let mut named = json!({"hostname": "pod-1", "linux": {"namespaces": [{"type": "uts"}]}});
        default_hostname(&mut named, "node-1");
        assert_eq!(named["hostname"], "pod-1");
        let mut cri_app = json!({"linux": {"namespaces": [
            {"type": "uts", "path": "/proc/1/ns/uts"}]}});
        default_hostname(&mut cri_app, "node-1");
        assert!(cri_app.get("hostname").is_none());
    }

    #[test]
    fn bad_specs_name_the_problem() {
        let no_root =
            for_guest(json!({"process": {}}), Path::new("/g"), &no_disks(), &[]).unwrap_err();
        assert!(no_root.contains("no `root`"), "{no_root}");
        let relative = json!({"root": {"path": "rootfs"},
            "mounts": [{"destination": "/x", "type": "bind", "source": "data"}]});
        let relative = for_guest(relative, Path::new("/g"), &no_disks(), &[]).unwrap_err();
        assert!(relative.contains("relative source"), "{relative}");
        assert!(process_for_guest(b"[").is_err());
    }

    #[test]
    fn app_containers_join_their_sandbox() {
        let app = json!({"annotations": {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": "s1"}});
        assert_eq!(pod_id(&app, "c1"), "s1");
        let sandbox = json!({"annotations": {
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-id": "s1"}});
        assert_eq!(pod_id(&sandbox, "s1"), "s1");
        assert_eq!(pod_id(&json!({}), "c2"), "c2");
    }

    #[test]
    fn exec_processes_lose_host_labels() {
        let process = process_for_guest(br#"{"args":["ls"],"selinuxLabel":"x"}"#).unwrap();
        let process: Value = serde_json::from_slice(&process).unwrap();
        assert_eq!(process, json!({"args": ["ls"]}));
    }
}
