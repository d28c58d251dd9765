//! Pod networking through containerd's CRI plugin and Debian's CNI bridge
//! plugin, on a subnet and bridge of the test's own: a runv pod serves
//! HTTP on its pod IP to the host, a second runv pod reaches it, a pod
//! reaches the host, the pod's network counters rise, and removing the
//! pods leaves no tap, qdisc or process of runv's.
//!
//! With a real SR-IOV VF named in `RUNV_TEST_VF`, the VF passthrough test
//! gives it to a runv pod through CNI's host-device plugin and checks that
//! the VM owns it and that the host gets it back.

use std::{
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use k8s_cri::v1::PodSandboxStatsRequest;
use runv_tests::{
    cni::{self, pod_ip, pod_netns},
    containerd::Containerd,
    cri::{app_config, exec_sync, pod_config, remove_pods, run_pod, start_app, CriClient},
};

/// The page the pod serves.
const PAGE: &str = "hello from a runv pod";
const HTTP_PORT: u16 = 8080;

#[tokio::test(flavor = "multi_thread")]
async fn pods_reach_the_host_and_each_other() {
    let Some(containerd) = Containerd::start_with_cri() else {
        return;
    };
    let mut cri = CriClient::with_pod_images(&containerd).await;

    let log_dir = containerd.dir().join("pod-logs");
    fs::create_dir_all(&log_dir).unwrap();
    let server_config = pod_config("server", &log_dir);
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

    let client_config = pod_config("client", &log_dir);
    let client_pod = run_pod(&mut cri, &client_config).await;
    let client = start_app(&mut cri, &client_pod, &client_config, app_config("client")).await;
    let url = format!("http://{server_ip}:{HTTP_PORT}/");
    let fetched = exec_sync(&mut cri, &client, &["wget", "-q", "-O", "-", &url]).await;
    assert_eq!(
        String::from_utf8_lossy(&fetched.stdout).trim(),
        PAGE,
        "pod to pod"
    );

    let listener = TcpListener::bind(format!("{}:0", containerd.network().gateway())).unwrap();
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

/// CRI PortForward (`kubectl port-forward`) into a runv pod: containerd
/// dials 127.0.0.1:<port> in the pod's network namespace on the host,
/// which this test does the same way. A server bound to the VM's loopback
/// answers, and so does one bound only to the pod IP; a port nothing
/// listens on gets its connection closed, not a hang.
#[tokio::test(flavor = "multi_thread")]
async fn port_forward_reaches_servers_inside_the_vm() {
    let Some(containerd) = Containerd::start_with_cri() else {
        return;
    };
    let mut cri = CriClient::with_pod_images(&containerd).await;
    let log_dir = containerd.dir().join("pod-logs");
    fs::create_dir_all(&log_dir).unwrap();
    let config = pod_config("forwarded", &log_dir);
    let pod = run_pod(&mut cri, &config).await;
    let pod_ip = pod_ip(&mut cri, &pod).await;
    let mut httpd = app_config("httpd");
    httpd.args = vec![format!(
        "mkdir -p /www && echo '{PAGE}' > /www/index.html && echo started httpd && \
         httpd -p 127.0.0.1:{HTTP_PORT} -h /www && exec httpd -f -p {pod_ip}:8081 -h /www"
    )];
    start_app(&mut cri, &pod, &config, httpd).await;

    let netns = pod_netns(&mut cri, &pod).await;
    for port in [HTTP_PORT, 8081] {
        let page = in_netns(&netns, move || http_get(&format!("127.0.0.1:{port}")));
        assert!(
            page.contains(PAGE),
            "port {port} through PortForward's path: {page}"
        );
    }
    let nobody = in_netns(&netns, || {
        let mut stream = TcpStream::connect("127.0.0.1:9999")?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let _ = stream.write_all(b"GET / HTTP/1.0\r\n\r\n");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).map(|_| response)
    });
    match nobody {
        Ok(response) => assert!(response.is_empty(), "port 9999 answered {response:?}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }

    remove_pods(&containerd, &mut cri, &[&pod]).await;
    containerd.stop();
}

/// Runs `work` on a thread inside the network namespace `netns`.
fn in_netns<T: Send + 'static>(netns: &Path, work: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = fs::File::open(netns).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        work()
    })
    .join()
    .unwrap()
}

/// A VF passed through (runv's fastest network mode): CNI's host-device
/// plugin moves the VF named in `RUNV_TEST_VF` into the pod's namespace
/// with a static address; runv binds its function to vfio-pci and the
/// builtin VMM gives it to the guest, whose VF driver makes the NIC. The
/// host reaches the pod over the NIC's own switch, from an address on the
/// physical function. After the pod is gone the function is back on its
/// host driver and CNI's DEL has put the netdev back in the host's
/// namespace under its name.
#[tokio::test(flavor = "multi_thread")]
async fn vf_passthrough_gives_the_vf_to_the_vm_and_back() {
    let vf = match vfio_skip_reason() {
        Ok(vf) => vf,
        Err(why) => {
            println!("SKIPPED: no VFIO on this host ({why})");
            return;
        }
    };
    let function = fs::canonicalize(format!("/sys/class/net/{vf}/device")).unwrap();
    let bdf = function.file_name().unwrap().to_str().unwrap().to_owned();
    let host_driver = driver_of(&function).expect("the VF has a host driver");
    let pf = fs::read_dir(function.join("physfn/net"))
        .unwrap()
        .next()
        .expect("the physical function has a netdev")
        .unwrap()
        .file_name()
        .into_string()
        .unwrap();
    println!("VF {vf}: function {bdf}, driver {host_driver}, physical function {pf}");

    let Some(containerd) = Containerd::start_with_cri() else {
        return;
    };
    let config = fs::read_to_string(containerd.runv_config()).unwrap();
    fs::write(
        containerd.runv_config(),
        config.replace("hypervisor = \"qemu\"", "hypervisor = \"builtin\""),
    )
    .unwrap();
    // A /24 of the test's own; the host end on the physical function.
    let id = std::process::id();
    let prefix = format!("10.{}.{}", 150 + id % 50, (id / 50) % 250);
    let (host_ip, vf_ip) = (format!("{prefix}.1"), format!("{prefix}.2"));
    let cni_dir = containerd.dir().join("cni");
    fs::create_dir_all(&cni_dir).unwrap();
    fs::write(
        cni_dir.join("10-runv-vf.conflist"),
        format!(
            r#"{{"cniVersion": "1.0.0", "name": "runv-vf-test", "plugins": [
  {{"type": "host-device", "device": "{vf}",
    "ipam": {{"type": "static", "addresses": [{{"address": "{vf_ip}/24"}}]}}}}
]}}"#
        ),
    )
    .unwrap();
    let _host_end = HostAddress::add(&pf, &format!("{host_ip}/24"));
    let mut cri = CriClient::with_pod_images(&containerd).await;

    let log_dir = containerd.dir().join("pod-logs");
    fs::create_dir_all(&log_dir).unwrap();
    let pod_config = pod_config("vf", &log_dir);
    let pod = run_pod(&mut cri, &pod_config).await;
    assert_eq!(pod_ip(&mut cri, &pod).await, vf_ip);
    assert_eq!(
        driver_of(&function).as_deref(),
        Some("vfio-pci"),
        "the VM holds the function"
    );
    let mut httpd = app_config("httpd");
    httpd.args = vec![format!(
        "mkdir -p /www && echo '{PAGE}' > /www/index.html && echo started httpd && \
         exec httpd -f -p {HTTP_PORT} -h /www"
    )];
    let httpd = start_app(&mut cri, &pod, &pod_config, httpd).await;
    let links = exec_sync(&mut cri, &httpd, &["ip", "-o", "link"]).await;
    println!("guest links:\n{}", String::from_utf8_lossy(&links.stdout));
    let ping = Command::new("ping")
        .args(["-c", "3", "-W", "2", &vf_ip])
        .output()
        .expect("running ping");
    assert!(ping.status.success(), "ping {vf_ip}: {ping:?}");
    let page = http_get(&format!("{vf_ip}:{HTTP_PORT}"));
    assert!(page.contains(PAGE), "the host got: {page}");

    remove_pods(&containerd, &mut cri, &[&pod]).await;
    // runv gave the function back before CNI's DEL moved the netdev out.
    assert_eq!(driver_of(&function), Some(host_driver));
    let driver_override = fs::read_to_string(function.join("driver_override")).unwrap();
    assert_eq!(driver_override.trim(), "(null)", "the override is cleared");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !Path::new("/sys/class/net").join(&vf).exists() {
        assert!(
            Instant::now() < deadline,
            "{vf} never came back to the host's namespace"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    containerd.stop();
}

/// The VF netdev to test with, or which check failed.
fn vfio_skip_reason() -> Result<String, String> {
    let vf = std::env::var("RUNV_TEST_VF").map_err(|_| "RUNV_TEST_VF names no VF netdev")?;
    if let Some(why) = cni::unavailable() {
        return Err(why);
    }
    if !Path::new("/sys/class/net")
        .join(&vf)
        .join("device/physfn")
        .exists()
    {
        return Err(format!(
            "{vf} is no SR-IOV VF netdev in the host's namespace"
        ));
    }
    if !Path::new("/dev/vfio/vfio").exists() {
        return Err("no /dev/vfio/vfio: modprobe vfio".into());
    }
    if !Path::new("/sys/bus/pci/drivers/vfio-pci").exists() {
        return Err("vfio-pci is not loaded: modprobe vfio-pci".into());
    }
    for plugin in ["host-device", "static"] {
        if !Path::new("/usr/lib/cni").join(plugin).is_file() {
            return Err(format!("no CNI {plugin} plugin"));
        }
    }
    runv_hypervisor::host::builtin_usable(&runv_hypervisor::KvmSupport::probe(), false)
        .map(|_| vf)
        .map_err(|why| format!("the builtin hypervisor cannot run here: {why}"))
}

/// The driver a PCI function is bound to.
fn driver_of(function: &Path) -> Option<String> {
    let driver: PathBuf = fs::read_link(function.join("driver")).ok()?;
    Some(driver.file_name()?.to_str()?.to_owned())
}

/// An address on a host interface, removed on drop.
struct HostAddress {
    interface: String,
    cidr: String,
}

impl HostAddress {
    fn add(interface: &str, cidr: &str) -> HostAddress {
        for args in [
            vec!["addr", "add", cidr, "dev", interface],
            vec!["link", "set", interface, "up"],
        ] {
            let status = Command::new("ip").args(&args).status().unwrap();
            assert!(status.success(), "ip {args:?}");
        }
        HostAddress {
            interface: interface.into(),
            cidr: cidr.into(),
        }
    }
}

impl Drop for HostAddress {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["addr", "del", &self.cidr, "dev", &self.interface])
            .status();
    }
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
