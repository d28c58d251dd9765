//! Pod networks for tests: Debian's CNI bridge plugin on a bridge and /24
//! of the test's own, installed as the only CNI config of a CRI
//! containerd, and the pod IPs CRI reports.

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use k8s_cri::v1::{PodSandboxStatusRequest, StatusRequest};

use crate::{containerd::Containerd, cri::CriClient};

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

/// The test's own bridge and /24, from its PID, so that parallel runs and
/// the host's own networks are left alone. Dropping it deletes the bridge.
pub struct TestNetwork {
    pub bridge: String,
    pub prefix: String,
}

impl TestNetwork {
    pub fn new() -> TestNetwork {
        let id = std::process::id();
        TestNetwork {
            bridge: format!("rvt{}", id % 100_000),
            prefix: format!("10.{}.{}", 200 + id % 50, (id / 50) % 250),
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
            r#"{{"cniVersion": "1.0.0", "name": "runv-test", "plugins": [
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

    /// Writes the config list into the CNI config directory of
    /// `containerd` (started with CRI), its IPAM state under the same
    /// directory.
    pub fn install(&self, containerd: &Containerd) {
        let cni_dir = containerd.dir().join("cni");
        fs::create_dir_all(&cni_dir).unwrap();
        fs::write(
            cni_dir.join("10-runv-test.conflist"),
            self.conflist(&containerd.dir().join("cni-state")),
        )
        .unwrap();
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
