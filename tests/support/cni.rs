//! Pod networks for tests: Debian's CNI bridge plugin on a bridge and /24
//! of the test's own, which every CRI containerd of the tests installs
//! ([`crate::containerd::Containerd::start_with_cri`]), and the pod IPs
//! CRI reports.

use std::{
    fs,
    path::Path,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use k8s_cri::v1::{PodSandboxStatusRequest, StatusRequest};

use crate::cri::CriClient;

/// The name of the tests' CNI config list: late in the directory's order,
/// so that a test that writes a config of its own (a lower number) has
/// its pods use that one.
const CONFLIST: &str = "90-runv-test.conflist";

/// The name of the tests' CNI network.
pub const NETWORK_NAME: &str = "runv-test";

/// Where, below a CRI containerd's directory, the IPAM plugin keeps the
/// addresses it gave out.
pub const IPAM_DIR: &str = "cni-state";

/// Debian's CNI bridge plugin (containernetworking-plugins).
pub const BRIDGE_PLUGIN: &str = "/usr/lib/cni/bridge";

/// Why pods cannot get a CNI network on this host, if they cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid only reads the process's credentials.
    if unsafe { libc::geteuid() } != 0 {
        return Some("CNI needs root".into());
    }
    if !Path::new(BRIDGE_PLUGIN).is_file() {
        return Some("no CNI bridge plugin (apt-get install containernetworking-plugins)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun (modprobe tun)".into());
    }
    None
}

/// A bridge and /24 of the test's own, from its PID and a count of the
/// networks it made, so that parallel tests and runs and the host's own
/// networks are left alone. Dropping it deletes the bridge.
pub struct TestNetwork {
    pub bridge: String,
    pub prefix: String,
}

impl TestNetwork {
    pub fn new() -> TestNetwork {
        static MADE: AtomicU32 = AtomicU32::new(0);
        let made = MADE.fetch_add(1, Ordering::Relaxed) % 16;
        let id = std::process::id() % 100_000;
        let slot = id * 16 + made;
        TestNetwork {
            bridge: format!("rvt{id}n{made}"),
            prefix: format!("10.{}.{}", 200 + slot % 50, (slot / 50) % 250),
        }
    }

    /// The bridge's address: the pods' gateway, the host seen from a pod.
    pub fn gateway(&self) -> String {
        format!("{}.1", self.prefix)
    }

    /// A CNI config list: the bridge plugin with host-local addresses on
    /// the test's /24, the bridge as gateway, no masquerade.
    pub fn conflist(&self, state_dir: &Path) -> String {
        format!(
            r#"{{"cniVersion": "1.0.0", "name": "{NETWORK_NAME}", "plugins": [
  {{"type": "bridge", "bridge": "{bridge}", "isGateway": true, "ipMasq": false,
    "ipam": {{"type": "host-local", "dataDir": "{state}",
      "ranges": [[{{"subnet": "{prefix}.0/24", "gateway": "{prefix}.1"}}]],
      "routes": [{{"dst": "0.0.0.0/0"}}]}}}},
  {{"type": "loopback"}}
]}}"#,
            bridge = self.bridge,
            prefix = self.prefix,
            state = state_dir.display()
        )
    }

    /// Writes the config list into the CNI config directory of the CRI
    /// containerd whose directory is `root`, its IPAM state beside it.
    pub fn install(&self, root: &Path) {
        let cni_dir = root.join("cni");
        fs::create_dir_all(&cni_dir).unwrap();
        fs::write(cni_dir.join(CONFLIST), self.conflist(&root.join(IPAM_DIR))).unwrap();
    }
}

impl Default for TestNetwork {
    fn default() -> TestNetwork {
        TestNetwork::new()
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "delete", &self.bridge])
            .output();
    }
}

/// Waits until CRI has loaded the test's CNI config.
pub async fn wait_network_ready(cri: &mut CriClient) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = cri
            .runtime
            .status(StatusRequest { verbose: false })
            .await
            .expect("CRI Status")
            .into_inner();
        let ready = status.status.is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.r#type == "NetworkReady" && c.status)
        });
        if ready {
            return;
        }
        assert!(Instant::now() < deadline, "CRI's network never got ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The IP CRI reports for the pod.
pub async fn pod_ip(cri: &mut CriClient, pod_id: &str) -> String {
    let status = cri
        .runtime
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.into(),
            verbose: false,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner();
    status
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .filter(|ip| !ip.is_empty())
        .expect("the pod has an IP")
}

/// The pod's network namespace on the host, from CRI's verbose status
/// (the sandbox's runtime spec), as containerd enters it for PortForward.
pub async fn pod_netns(cri: &mut CriClient, pod_id: &str) -> std::path::PathBuf {
    let status = cri
        .runtime
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.into(),
            verbose: true,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner();
    let info: serde_json::Value =
        serde_json::from_str(status.info.get("info").expect("verbose info")).unwrap();
    info.pointer("/runtimeSpec/linux/namespaces")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .find(|ns| ns["type"] == "network")
        .and_then(|ns| ns["path"].as_str())
        .map(Into::into)
        .expect("the sandbox has a network namespace")
}
