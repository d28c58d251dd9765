//! Helpers of the tests that need a real network namespace.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun (modprobe tun)".into());
    }
    for tool in ["ip", "tc"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!(
                "no `{tool}` (iproute2) to build the test namespace"
            ));
        }
    }
    None
}

#[macro_export]
macro_rules! skip_unless_able {
    () => {
        if let Some(reason) = common::skip_reason() {
            println!("SKIPPED: {reason}");
            return;
        }
    };
}

/// Why this host cannot make macvtaps, if it cannot: `modprobe macvtap`
/// (a kernel with macvtap built in needs none, and may have no modprobe),
/// then a passthru macvtap made on the namespace's `eth0` and deleted.
pub fn macvtap_skip_reason(ns: &TestNetns) -> Option<String> {
    let modprobe = match Command::new("modprobe").arg("macvtap").output() {
        Ok(output) if output.status.success() => "loaded".to_owned(),
        Ok(output) => String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        Err(e) => e.to_string(),
    };
    let probe = Command::new("ip")
        .args([
            "-n", &ns.name, "link", "add", "link", "eth0", "name", "mvprobe",
        ])
        .args(["type", "macvtap", "mode", "passthru"])
        .output()
        .unwrap();
    if probe.status.success() {
        ns.ip(&["link", "del", "mvprobe"]);
        return None;
    }
    Some(format!(
        "no macvtap (CONFIG_MACVTAP): modprobe macvtap: {modprobe}; ip link add type macvtap: {}",
        String::from_utf8_lossy(&probe.stderr).trim()
    ))
}

/// Runs a command, panicking with its stderr on failure; returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A network namespace with a veth pair: `eth0` inside (as CNI makes
/// it), `host` outside; both removed on drop, even after a failure.
pub struct TestNetns {
    pub name: String,
    pub host: String,
}

impl TestNetns {
    /// Only `lo`, down.
    pub fn bare() -> TestNetns {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let ns = TestNetns {
            name: format!("runv-test-{pid}-{n}"),
            host: format!("rvh{pid}x{n}"),
        };
        run("ip", &["netns", "add", &ns.name]);
        ns
    }

    /// `eth0` with MTU 1400, 10.77.0.2/24, a default route via 10.77.0.1,
    /// a route to 10.78.0.0/16 via 10.77.0.254, fd00:77::2/64 with a
    /// default route via fd00:77::1, and a permanent neighbour.
    pub fn with_eth0() -> TestNetns {
        let ns = TestNetns::bare();
        let peer = format!("{}p", ns.host);
        run(
            "ip",
            &[
                "link", "add", &ns.host, "type", "veth", "peer", "name", &peer,
            ],
        );
        run("ip", &["link", "set", &peer, "netns", &ns.name]);
        ns.ip(&["link", "set", &peer, "name", "eth0"]);
        ns.ip(&["link", "set", "eth0", "mtu", "1400", "up"]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&["addr", "add", "10.77.0.2/24", "dev", "eth0"]);
        ns.ip(&["route", "add", "default", "via", "10.77.0.1"]);
        ns.ip(&["addr", "add", "fd00:77::2/64", "dev", "eth0", "nodad"]);
        ns.ip(&["-6", "route", "add", "default", "via", "fd00:77::1"]);
        ns.ip(&[
            "route",
            "add",
            "10.78.0.0/16",
            "via",
            "10.77.0.254",
            "dev",
            "eth0",
        ]);
        ns.ip(&[
            "neigh",
            "add",
            "10.77.0.1",
            "lladdr",
            "02:00:00:00:00:01",
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
        run("ip", &["link", "set", &ns.host, "mtu", "1400", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    pub fn tc(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("tc", &all)
    }

    pub fn links(&self) -> String {
        self.ip(&["-o", "link", "show"])
    }

    pub fn mac(&self, interface: &str) -> String {
        let line = self.ip(&["-o", "link", "show", interface]);
        let after = line.split("link/ether ").nth(1).unwrap();
        after.split_whitespace().next().unwrap().to_owned()
    }

    pub fn host_index(&self) -> i32 {
        std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", self.host))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host])
            .output();
    }
}
