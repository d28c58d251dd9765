//! The device nodes a container asks for in `linux.devices` (`ctr run
//! --device`, CRI's ContainerConfig.devices, Kubernetes raw block volumes),
//! with the device cgroup's rules in `linux.resources.devices`. The spec
//! names devices by the host's numbers, which in the guest name other
//! devices or none:
//! - a host block device is plugged into the VM as a raw virtio-blk disk
//!   (see `disks`), and the spec is given the guest's numbers for it;
//! - the standard character devices have the same numbers in any Linux and
//!   pass as they are;
//! - any other character device stays on the host: the container is
//!   refused rather than given a node that names something else.

use std::{
    fs,
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
};

use serde_json::{json, Map, Value};

/// A device number, (major, minor).
pub type DeviceNumber = (u32, u32);

/// Character devices with the same numbers in every Linux, which the guest
/// kernel has as well.
const STANDARD_CHAR_DEVICES: [DeviceNumber; 10] = [
    (1, 3),    // null
    (1, 5),    // zero
    (1, 7),    // full
    (1, 8),    // random
    (1, 9),    // urandom
    (5, 0),    // tty
    (5, 1),    // console
    (5, 2),    // ptmx
    (10, 229), // fuse
    (10, 200), // net/tun
];

/// A host block device the container asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBlock {
    pub number: DeviceNumber,
    /// Its node on the host, to plug into the VM.
    pub node: PathBuf,
    /// What the device cgroup's rules let the container do with it: a
    /// subset of "rwm".
    pub access: String,
}

impl HostBlock {
    /// Without `w` the disk goes in read-only: the container may not
    /// write it anyway, and the host device is then safe from the guest.
    pub fn read_only(&self) -> bool {
        !self.access.contains('w')
    }
}

/// The host block devices of `spec`'s `linux.devices`, each once; an error
/// for a device a VM cannot pass.
pub fn host_blocks(spec: &Value) -> Result<Vec<HostBlock>, String> {
    host_blocks_in(spec, Path::new("/sys/dev/block"), Path::new("/dev"))
}

/// [`host_blocks`], with the host's `/sys/dev/block` and `/dev` at
/// `sys_dev_block` and `dev`.
fn host_blocks_in(
    spec: &Value,
    sys_dev_block: &Path,
    dev: &Path,
) -> Result<Vec<HostBlock>, String> {
    let rules = cgroup_rules(spec);
    let mut blocks: Vec<HostBlock> = Vec::new();
    for entry in entries(spec) {
        let path = entry.get("path").and_then(Value::as_str).unwrap_or("?");
        match entry.get("type").and_then(Value::as_str) {
            Some("b") => {
                let number = entry_number(entry, path)?;
                if blocks.iter().all(|block| block.number != number) {
                    blocks.push(HostBlock {
                        number,
                        node: host_node(sys_dev_block, dev, number, path)?,
                        access: access(rules, number),
                    });
                }
            }
            Some("c" | "u") => {
                let number = entry_number(entry, path)?;
                if !STANDARD_CHAR_DEVICES.contains(&number) {
                    let (major, minor) = number;
                    return Err(format!(
                        "a VM sandbox cannot pass host character device {path} \
                         ({major}:{minor}) into a container: the container runs in the pod \
                         VM, whose kernel has its own devices; use runc for it"
                    ));
                }
            }
            // FIFOs have no device behind them.
            _ => {}
        }
    }
    Ok(blocks)
}

/// Gives `spec` the guest's numbers of the plugged block devices, each
/// host block device with the guest number it was plugged as: its
/// `linux.devices` entries are renumbered, and the cgroup rules naming the
/// host number exactly give way to one rule, last, that allows the guest
/// number what the host's rules allowed the host device.
pub fn for_guest(spec: &mut Value, plugged: &[(HostBlock, DeviceNumber)]) {
    let guest_number = |number| {
        plugged
            .iter()
            .find(|(host, _)| host.number == number)
            .map(|(_, guest)| *guest)
    };
    let Some(linux) = spec.get_mut("linux").and_then(Value::as_object_mut) else {
        return;
    };
    for entry in linux
        .get_mut("devices")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object_mut)
    {
        let is_block = entry.get("type").and_then(Value::as_str) == Some("b");
        let renumbered = device_number(entry).and_then(guest_number);
        if let Some(guest) = renumbered.filter(|_| is_block) {
            set_number(entry, guest);
        }
    }
    if plugged.is_empty() {
        return;
    }
    let resources = linux
        .entry("resources")
        .or_insert_with(|| json!({}))
        .as_object_mut();
    let Some(resources) = resources else { return };
    let rules = resources
        .entry("devices")
        .or_insert_with(|| json!([]))
        .as_array_mut();
    let Some(rules) = rules else { return };
    rules.retain(|rule| exact_block_rule(rule).and_then(guest_number).is_none());
    for (host, guest) in plugged {
        if !host.access.is_empty() {
            let mut rule = Map::new();
            rule.insert("allow".into(), true.into());
            rule.insert("type".into(), "b".into());
            set_number(&mut rule, *guest);
            rule.insert("access".into(), host.access.clone().into());
            rules.push(rule.into());
        }
    }
}

fn entries(spec: &Value) -> impl Iterator<Item = &Map<String, Value>> {
    spec.pointer("/linux/devices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
}

fn cgroup_rules(spec: &Value) -> &[Value] {
    spec.pointer("/linux/resources/devices")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn entry_number(entry: &Map<String, Value>, path: &str) -> Result<DeviceNumber, String> {
    device_number(entry)
        .ok_or_else(|| format!("linux.devices entry {path} has no valid major and minor number"))
}

fn device_number(entry: &Map<String, Value>) -> Option<DeviceNumber> {
    let field = |key: &str| {
        entry
            .get(key)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
    };
    Some((field("major")?, field("minor")?))
}

fn set_number(object: &mut Map<String, Value>, (major, minor): DeviceNumber) {
    object.insert("major".into(), major.into());
    object.insert("minor".into(), minor.into());
}

/// The host's node of block device `number`: the kernel's name for it
/// (DEVNAME in its uevent), under `/dev`.
fn host_node(
    sys_dev_block: &Path,
    dev: &Path,
    (major, minor): DeviceNumber,
    path: &str,
) -> Result<PathBuf, String> {
    let uevent = sys_dev_block.join(format!("{major}:{minor}/uevent"));
    let name = fs::read_to_string(&uevent)
        .ok()
        .and_then(|uevent| {
            uevent
                .lines()
                .find_map(|line| line.strip_prefix("DEVNAME=").map(str::to_owned))
        })
        .ok_or_else(|| {
            format!(
                "linux.devices entry {path} names block device {major}:{minor}, which the \
                 host does not have"
            )
        })?;
    let node = dev.join(name);
    let is_it = fs::metadata(&node).is_ok_and(|meta| {
        meta.file_type().is_block_device()
            && (
                nix::sys::stat::major(meta.rdev()),
                nix::sys::stat::minor(meta.rdev()),
            ) == (u64::from(major), u64::from(minor))
    });
    if !is_it {
        return Err(format!(
            "linux.devices entry {path} names block device {major}:{minor}, whose node {} is \
             missing or is another device",
            node.display()
        ));
    }
    Ok(node)
}

/// What the device cgroup's `rules` let a container do with block device
/// `number`: for each of read, write and mknod, the last rule that names
/// it and matches the device decides, and nothing is allowed by default.
fn access(rules: &[Value], number: DeviceNumber) -> String {
    "rwm"
        .chars()
        .filter(|&wanted| {
            rules
                .iter()
                .rfind(|rule| {
                    let rule_access = rule.get("access").and_then(Value::as_str).unwrap_or("rwm");
                    rule_access.contains(wanted) && matches_block(rule, number)
                })
                .is_some_and(|rule| rule.get("allow").and_then(Value::as_bool) == Some(true))
        })
        .collect()
}

fn matches_block(rule: &Value, (major, minor): DeviceNumber) -> bool {
    let Some((rule_major, rule_minor)) = rule_number(rule) else {
        return false;
    };
    matches!(rule_type(rule), "a" | "b")
        && rule_major.is_none_or(|m| m == major)
        && rule_minor.is_none_or(|m| m == minor)
}

/// The block device a rule names exactly, without wildcards.
fn exact_block_rule(rule: &Value) -> Option<DeviceNumber> {
    match rule_number(rule)? {
        (Some(major), Some(minor)) if rule_type(rule) == "b" => Some((major, minor)),
        _ => None,
    }
}

/// A rule's device type: "a" (all) when absent.
fn rule_type(rule: &Value) -> &str {
    rule.get("type").and_then(Value::as_str).unwrap_or("a")
}

/// A rule's major and minor, `None` for a wildcard (absent, null or -1);
/// `None` in all for a rule with a number no device has.
fn rule_number(rule: &Value) -> Option<(Option<u32>, Option<u32>)> {
    let field = |key: &str| match rule.get(key) {
        None | Some(Value::Null) => Some(None),
        Some(value) if value.as_i64() == Some(-1) => Some(None),
        Some(value) => value.as_u64().and_then(|n| u32::try_from(n).ok()).map(Some),
    };
    Some((field("major")?, field("minor")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake /sys/dev/block, and an empty /dev.
    struct FakeHost {
        dir: tempfile::TempDir,
    }

    impl FakeHost {
        fn new() -> FakeHost {
            let dir = tempfile::tempdir().unwrap();
            fs::create_dir_all(dir.path().join("sys")).unwrap();
            fs::create_dir_all(dir.path().join("dev")).unwrap();
            FakeHost { dir }
        }

        fn add(&self, number: &str, name: &str) {
            let entry = self.dir.path().join("sys").join(number);
            fs::create_dir_all(&entry).unwrap();
            fs::write(entry.join("uevent"), format!("MAJOR=7\nDEVNAME={name}\n")).unwrap();
        }

        fn blocks(&self, spec: &Value) -> Result<Vec<HostBlock>, String> {
            host_blocks_in(
                spec,
                &self.dir.path().join("sys"),
                &self.dir.path().join("dev"),
            )
        }
    }

    fn spec(devices: Value, rules: Value) -> Value {
        json!({"linux": {"devices": devices, "resources": {"devices": rules}}})
    }

    /// containerd's default rules, then what `ctr run --device` or CRI
    /// add for the device.
    fn rules_with(device_rule: Value) -> Value {
        json!([
            {"allow": false, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
            {"allow": true, "type": "b", "access": "m"},
            device_rule
        ])
    }

    #[test]
    fn access_follows_the_last_matching_rule() {
        let rules = rules_with(json!({"allow": true, "type": "b", "major": 7, "minor": 5,
            "access": "rw"}));
        let rules = rules.as_array().unwrap();
        assert_eq!(access(rules, (7, 5)), "rwm");
        assert_eq!(access(rules, (7, 6)), "m");
        let read_only = rules_with(json!({"allow": true, "type": "b", "major": 7, "minor": 5,
            "access": "r"}));
        assert_eq!(access(read_only.as_array().unwrap(), (7, 5)), "rm");
        let denied_after = json!([{"allow": true, "access": "rwm"},
            {"allow": false, "type": "b", "major": 7, "minor": -1, "access": "w"}]);
        assert_eq!(access(denied_after.as_array().unwrap(), (7, 5)), "rm");
        assert_eq!(access(&[], (7, 5)), "");
    }

    #[test]
    fn block_devices_are_found_on_the_host() {
        let host = FakeHost::new();
        let spec = spec(
            json!([
                {"path": "/dev/xvda", "type": "b", "major": 7, "minor": 5},
                {"path": "/dev/also", "type": "b", "major": 7, "minor": 5},
                {"path": "/dev/null", "type": "c", "major": 1, "minor": 3},
                {"path": "/dev/fifo", "type": "p"}
            ]),
            rules_with(json!({"allow": true, "type": "b", "major": 7, "minor": 5,
                "access": "r"})),
        );
        let missing = host.blocks(&spec).unwrap_err();
        assert!(
            missing.contains("/dev/xvda names block device 7:5, which the host does not have"),
            "{missing}"
        );
        host.add("7:5", "loop5");
        let not_a_node = host.blocks(&spec).unwrap_err();
        assert!(
            not_a_node.contains("is missing or is another device"),
            "{not_a_node}"
        );

        // The real thing, where the host has a block device.
        let Some(real) = fs::read_dir("/sys/dev/block")
            .ok()
            .and_then(|mut entries| entries.next())
            .and_then(|entry| entry.ok())
        else {
            return;
        };
        let number = real.file_name().to_string_lossy().into_owned();
        let (major, minor) = number.split_once(':').unwrap();
        let (major, minor): (u32, u32) = (major.parse().unwrap(), minor.parse().unwrap());
        let spec = spec_with_block(major, minor, "rw");
        let blocks = host_blocks(&spec).unwrap();
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].number, (major, minor));
        assert!(blocks[0].node.starts_with("/dev"));
        assert_eq!(blocks[0].access, "rwm");
        assert!(!blocks[0].read_only());
        let blocks = host_blocks(&spec_with_block(major, minor, "r")).unwrap();
        assert!(blocks[0].read_only());
    }

    fn spec_with_block(major: u32, minor: u32, access: &str) -> Value {
        spec(
            json!([
                {"path": "/dev/xvda", "type": "b", "major": major, "minor": minor},
                {"path": "/dev/xvdb", "type": "b", "major": major, "minor": minor}
            ]),
            rules_with(
                json!({"allow": true, "type": "b", "major": major, "minor": minor,
                "access": access}),
            ),
        )
    }

    #[test]
    fn only_standard_char_devices_pass() {
        let host = FakeHost::new();
        let standard = spec(
            json!([
                {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
                {"path": "/dev/net/tun", "type": "c", "major": 10, "minor": 200},
                {"path": "/dev/tty", "type": "u", "major": 5, "minor": 0}
            ]),
            json!([]),
        );
        assert_eq!(host.blocks(&standard).unwrap(), []);
        let kvm = spec(
            json!([{"path": "/dev/kvm", "type": "c", "major": 10, "minor": 232}]),
            json!([]),
        );
        let refused = host.blocks(&kvm).unwrap_err();
        assert_eq!(
            refused,
            "a VM sandbox cannot pass host character device /dev/kvm (10:232) into a \
             container: the container runs in the pod VM, whose kernel has its own devices; \
             use runc for it"
        );
        let no_number = spec(json!([{"path": "/dev/x", "type": "b"}]), json!([]));
        let refused = host.blocks(&no_number).unwrap_err();
        assert!(
            refused.contains("/dev/x has no valid major and minor"),
            "{refused}"
        );
        assert_eq!(host.blocks(&json!({"linux": {}})).unwrap(), []);
    }

    #[test]
    fn plugged_devices_get_the_guest_numbers() {
        let mut spec = spec(
            json!([
                {"path": "/dev/xvda", "type": "b", "major": 7, "minor": 5, "fileMode": 432},
                {"path": "/dev/other", "type": "b", "major": 7, "minor": 6},
                {"path": "/dev/null", "type": "c", "major": 1, "minor": 3}
            ]),
            rules_with(json!({"allow": true, "type": "b", "major": 7, "minor": 5,
                "access": "rw"})),
        );
        let host = HostBlock {
            number: (7, 5),
            node: "/dev/loop5".into(),
            access: "rwm".into(),
        };
        let denied = HostBlock {
            number: (7, 6),
            node: "/dev/loop6".into(),
            access: String::new(),
        };
        for_guest(&mut spec, &[(host, (254, 16)), (denied, (254, 32))]);
        assert_eq!(
            spec["linux"]["devices"],
            json!([
                {"path": "/dev/xvda", "type": "b", "major": 254, "minor": 16, "fileMode": 432},
                {"path": "/dev/other", "type": "b", "major": 254, "minor": 32},
                {"path": "/dev/null", "type": "c", "major": 1, "minor": 3}
            ])
        );
        assert_eq!(
            spec["linux"]["resources"]["devices"],
            json!([
                {"allow": false, "access": "rwm"},
                {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
                {"allow": true, "type": "b", "access": "m"},
                {"allow": true, "type": "b", "major": 254, "minor": 16, "access": "rwm"}
            ])
        );

        let mut untouched = json!({"linux": {"devices": []}});
        for_guest(&mut untouched, &[]);
        assert_eq!(untouched, json!({"linux": {"devices": []}}));
    }
}
