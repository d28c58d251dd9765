//! Pod networking through containerd's CRI plugin and Debian's CNI bridge
//! plugin, on a subnet and bridge of the test's own: a runv pod serves
//! HTTP on its pod IP to the host, a second runv pod reaches it, a pod
//! reaches the host, the pod's network counters rise, and removing the
//! pods leaves no tap, qdisc or process of runv's.

use std::{
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use k8s_cri::v1::{NamespaceMode, PodSandboxStatsRequest};
use runv_tests::{
    cni::{self, pod_ip, wait_network_ready, TestNetwork},
    containerd::Containerd,
    cri::{
        app_config, build_pause_image, exec_sync, pod_config, remove_pods, run_pod, start_app,
        CriClient,
    },
};

/// The page the pod serves.
const PAGE: &str = "hello from a runv pod";
const HTTP_PORT: u16 = 8080;

#[tokio::test(flavor = "multi_thread")]
async fn pods_reach_the_host_and_each_other() {
    if let Some(why) = cni::unavailable() {
        println!("SKIPPED: {why}");
        return;
    }
    let Some(containerd) = Containerd::start_with_cri() else {
        return;
    };
    let network = TestNetwork::new();
    network.install(&containerd);
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
    // CRI's pod stats read the pod namespace's interface, which carries
    // the VM's traffic.
    let pod_stats = cri
        .runtime
        .pod_sandbox_stats(PodSandboxStatsRequest {
            pod_sandbox_id: server_pod.clone(),
        })
        .await
        .expect("PodSandboxStats")
        .into_inner();
    let interface = pod_stats
        .stats
        .and_then(|stats| stats.linux?.network?.default_interface);
    println!("CRI PodSandboxStats default interface: {interface:?}");
    let cri_rx = interface.and_then(|i| i.rx_bytes).map_or(0, |b| b.value);
    assert!(cri_rx > 0, "CRI pod stats count the pod's traffic");

    remove_pods(&containerd, &mut cri, &[&client_pod, &server_pod]).await;
    let taps = runv_taps();
    assert!(taps.is_empty(), "taps left: {taps:?}");
    containerd.stop();
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
