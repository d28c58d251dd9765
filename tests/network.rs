//! Pod networking through containerd's CRI plugin and Debian's CNI bridge
//! plugin, on a subnet and bridge of the test's own: a runv pod serves
//! HTTP on its pod IP to the host, a second runv pod reaches it, a pod
//! reaches the host, the pod's network counters rise, and removing the
//! pods leaves no tap, qdisc or process of runv's.

use std::{
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use k8s_cri::v1::{NamespaceMode, PodSandboxStatusRequest, StatusRequest};
use runv_tests::{
    containerd::Containerd,
    cri::{
        app_config, build_pause_image, exec_sync, pod_config, remove_pods, run_pod, start_app,
        CriClient,
    },
};

/// The page the pod serves.
const PAGE: &str = "hello from a runv pod";
const HTTP_PORT: u16 = 8080;

/// Why this test cannot run here, if it cannot.
fn unavailable() -> Option<String> {
    // SAFETY: geteuid only reads the process's credentials.
    if unsafe { libc::geteuid() } != 0 {
        return Some("CNI needs root".into());
    }
    if !Path::new("/usr/lib/cni/bridge").is_file() {
        return Some("no CNI bridge plugin (apt-get install containernetworking-plugins)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun (modprobe tun)".into());
    }
    None
}

/// The test's own bridge and /24, from its PID, so that parallel runs and
/// the host's own networks are left alone.
struct TestNetwork {
    bridge: String,
    prefix: String,
}

impl TestNetwork {
    fn new() -> TestNetwork {
        let id = std::process::id();
        TestNetwork {
            bridge: format!("rvt{}", id % 100_000),
            prefix: format!("10.{}.{}", 200 + id % 50, (id / 50) % 250),
        }
    }

    fn gateway(&self) -> String {
        format!("{}.1", self.prefix)
    }

    /// A CNI config list: the bridge plugin with host-local addresses on
    /// the test's /24, the bridge as gateway, no masquerade.
    fn conflist(&self, state_dir: &Path) -> String {
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
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "delete", &self.bridge])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_reach_the_host_and_each_other() {
    if let Some(why) = unavailable() {
        println!("SKIPPED: {why}");
        return;
    }
    let Some(containerd) = Containerd::start_with_cri() else {
        return;
    };
    let network = TestNetwork::new();
    let cni_dir = containerd.dir().join("cni");
    fs::create_dir_all(&cni_dir).unwrap();
    fs::write(
        cni_dir.join("10-runv-test.conflist"),
        network.conflist(&containerd.dir().join("cni-state")),
    )
    .unwrap();
    containerd.import_busybox();
    containerd.import_image(&build_pause_image(containerd.dir()));
    let socket = containerd.dir().join("containerd.sock");
    let mut cri = CriClient::connect(&socket).await;
    wait_network_ready(&mut cri).await;

    let log_dir = containerd.dir().join("pod-logs");
    fs::create_dir_all(&log_dir).unwrap();
    let server_config = pod_config("server", &log_dir, NamespaceMode::Pod);
    let server_pod = run_pod(&mut cri, &server_config).await;
    let server_ip = pod_ip(&mut cri, &server_pod).await;
    println!("server pod IP: {server_ip}");
    let mut httpd = app_config("httpd");
    httpd.args = vec![format!(
        "mkdir -p /www && echo '{PAGE}' > /www/index.html && echo started httpd && \
         exec httpd -f -p {HTTP_PORT} -h /www"
    )];
    let httpd = start_app(&mut cri, &server_pod, &server_config, httpd).await;

    let page = http_get(&format!("{server_ip}:{HTTP_PORT}"));
    assert!(page.contains(PAGE), "the host got: {page}");

    let client_config = pod_config("client", &log_dir, NamespaceMode::Pod);
    let client_pod = run_pod(&mut cri, &client_config).await;
    let client = start_app(&mut cri, &client_pod, &client_config, app_config("client")).await;
    let url = format!("http://{server_ip}:{HTTP_PORT}/");
    let fetched = exec_sync(&mut cri, &client, &["wget", "-q", "-O", "-", &url]).await;
    assert_eq!(
        String::from_utf8_lossy(&fetched.stdout).trim(),
        PAGE,
        "pod to pod"
    );

    let listener = TcpListener::bind(format!("{}:0", network.gateway())).unwrap();
    let host_url = format!("http://{}/", listener.local_addr().unwrap());
    let host_server = std::thread::spawn(move || serve_once(listener, "hello from the host"));
    let fetched = exec_sync(&mut cri, &httpd, &["wget", "-q", "-O", "-", &host_url]).await;
    assert_eq!(
        String::from_utf8_lossy(&fetched.stdout).trim(),
        "hello from the host",
        "pod to host"
    );
    host_server.join().unwrap();

    let before = rx_bytes(&containerd, &httpd);
    for _ in 0..5 {
        http_get(&format!("{server_ip}:{HTTP_PORT}"));
    }
    let after = rx_bytes(&containerd, &httpd);
    println!("pod network rx bytes: {before} before, {after} after 5 requests");
    assert!(after > before, "network counters rise: {before} -> {after}");

    remove_pods(&containerd, &mut cri, &[&client_pod, &server_pod]).await;
    let taps = runv_taps();
    assert!(taps.is_empty(), "taps left: {taps:?}");
    containerd.stop();
}

/// Waits until CRI has loaded the test's CNI config.
async fn wait_network_ready(cri: &mut CriClient) {
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

async fn pod_ip(cri: &mut CriClient, pod_id: &str) -> String {
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

/// A plain HTTP/1.0 GET of `/` from `address`, retried for a while (the
/// server may still be starting); returns the whole response.
fn http_get(address: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = TcpStream::connect(address).and_then(|mut stream| {
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        });
        match attempt {
            Ok(response) if !response.is_empty() => return response,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            other => panic!("GET http://{address}/: {other:?}"),
        }
    }
}

/// Answers one HTTP request with `body`.
fn serve_once(listener: TcpListener, body: &str) {
    let (mut stream, _) = listener.accept().unwrap();
    let mut request = [0; 1024];
    let _ = stream.read(&mut request);
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}\n",
        body.len() + 1
    );
    stream.write_all(response.as_bytes()).unwrap();
}

/// The bytes the pod received on its interfaces, from `ctr task metrics`.
fn rx_bytes(containerd: &Containerd, container_id: &str) -> u64 {
    let metrics = containerd.ctr_ok(&["task", "metrics", "--format", "json", container_id]);
    let metrics: serde_json::Value = serde_json::from_str(&metrics).unwrap();
    metrics
        .get("network")
        .and_then(|n| n.as_array())
        .into_iter()
        .flatten()
        .filter_map(|interface| interface.get("rx_bytes").and_then(|b| b.as_u64()))
        .sum()
}

/// Tap devices named by runv's convention, in any network namespace left.
fn runv_taps() -> Vec<String> {
    let output = Command::new("ip")
        .args(["-all", "netns", "exec", "ip", "-o", "link", "show"])
        .output()
        .expect("running ip");
    let root = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("running ip");
    [output.stdout, root.stdout]
        .iter()
        .flat_map(|out| {
            String::from_utf8_lossy(out)
                .lines()
                .filter(|line| line.contains("_runv"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}
