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

use k8s_cri::v1::{
    Capability, ImageSpec, LinuxContainerConfig, LinuxContainerSecurityContext,
    PodSandboxStatsRequest,
};
use runv_tests::{
    bench::program_with_libraries,
    cni::{self, pod_ip, pod_netns},
    containerd::{build_busybox_image_with_files, Containerd},
    cri::{
        app_config, exec_sync, pod_config, remove_pods, run_pod, start_app, wait_exited, CriClient,
    },
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

    let pod_netns = vec![
        pod_netns(&mut cri, &client_pod).await,
        pod_netns(&mut cri, &server_pod).await,
    ];
    remove_pods(&containerd, &mut cri, &[&client_pod, &server_pod]).await;
    let taps = runv_taps(&pod_netns);
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

/// The pod image with the host's iptables (its nft and legacy multi-call
/// binaries), as a service mesh's init container carries.
const MESH_IMAGE: &str = "docker.io/runv/mesh-init:test";
/// Where Debian's iptables keeps its extensions.
const XTABLES_EXTENSIONS: &str = "/usr/lib/x86_64-linux-gnu/xtables";

/// A service mesh's traffic capture in a runv pod: an init container
/// with NET_ADMIN sets iptables rules the way Istio's does (REDIRECT in
/// nat, matched by owner, multiport and conntrack, a TPROXY rule in
/// mangle, IPv6 too, through both iptables-nft and iptables-legacy), and
/// then the pod's traffic goes where the rules say: an app's outbound
/// connection to port 80 anywhere lands on the "sidecar"'s port 15001,
/// and the host's connection to the pod IP's port 8080 on its port 15006.
#[tokio::test(flavor = "multi_thread")]
async fn iptables_rules_of_an_init_container_redirect_the_pods_traffic() {
    let Some(containerd) = Containerd::start_with_cri() else {
        return;
    };
    // The two multi-call binaries, and the match and target extensions
    // they load at run time.
    let extensions = fs::read_dir(XTABLES_EXTENSIONS)
        .into_iter()
        .flatten()
        .filter_map(|entry| Some(entry.ok()?.path()));
    let iptables: std::collections::BTreeSet<PathBuf> = [
        "/usr/sbin/xtables-nft-multi",
        "/usr/sbin/xtables-legacy-multi",
    ]
    .iter()
    .map(PathBuf::from)
    .filter(|program| program.is_file())
    .chain(extensions)
    .flat_map(|program| program_with_libraries(&program))
    .collect();
    let iptables: Vec<PathBuf> = iptables.into_iter().collect();
    if !iptables.iter().any(|p| p.ends_with("xtables-legacy-multi"))
        || !iptables.iter().any(|p| p.ends_with("xtables-nft-multi"))
    {
        println!("SKIPPED: the host has no iptables 1.8 (Debian package iptables)");
        return;
    }
    let archive =
        build_busybox_image_with_files(containerd.dir(), MESH_IMAGE, &[], &["sh"], &iptables);
    containerd.import_image(&archive);
    let mut cri = CriClient::with_pod_images(&containerd).await;
    let log_dir = containerd.dir().join("pod-logs");
    fs::create_dir_all(&log_dir).unwrap();
    let config = pod_config("meshed", &log_dir);
    let pod = run_pod(&mut cri, &config).await;
    let pod_ip = pod_ip(&mut cri, &pod).await;

    // iptables-legacy locks /run/xtables.lock, which the image lacks.
    let rules = "set -e
        mkdir -p /run
        nft='/usr/sbin/xtables-nft-multi iptables'
        $nft -t nat -N MESH_OUTBOUND
        $nft -t nat -A OUTPUT -p tcp -m multiport --dports 80,81 \
            -m owner ! --uid-owner 1337 -j MESH_OUTBOUND
        $nft -t nat -A MESH_OUTBOUND -p tcp -m conntrack --ctstate NEW -j REDIRECT --to-ports 15001
        $nft -t nat -A PREROUTING -p tcp --dport 8080 -j REDIRECT --to-ports 15006
        $nft -t mangle -A PREROUTING -p tcp --dport 9090 -m mark ! --mark 0x539 \
            -j TPROXY --on-port 15008 --tproxy-mark 0x539/0xffffffff
        /usr/sbin/xtables-nft-multi ip6tables -t nat -A OUTPUT -p tcp --dport 80 -j REDIRECT --to-ports 15001
        /usr/sbin/xtables-legacy-multi iptables -t mangle -A OUTPUT -p tcp --dport 7777 -j MARK --set-mark 1
        /usr/sbin/xtables-legacy-multi ip6tables -t filter -A INPUT -p tcp --dport 7777 -j ACCEPT
        echo rules set";
    let mut init = app_config("mesh-init");
    init.image = Some(ImageSpec {
        image: MESH_IMAGE.into(),
        ..Default::default()
    });
    init.args = vec![rules.into()];
    init.linux = Some(LinuxContainerConfig {
        security_context: Some(LinuxContainerSecurityContext {
            capabilities: Some(Capability {
                add_capabilities: vec!["NET_ADMIN".into(), "NET_RAW".into()],
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let init = start_app(&mut cri, &pod, &config, init).await;
    let exit_code = wait_exited(&mut cri, &init).await.exit_code;
    let init_log = fs::read_to_string(log_dir.join("mesh-init.log")).unwrap_or_default();
    assert_eq!(
        exit_code, 0,
        "the init container's rules failed:\n{init_log}"
    );

    let mut sidecar = app_config("sidecar");
    sidecar.args = vec![
        "mkdir -p /out /in && echo outbound captured > /out/index.html && \
         echo inbound captured > /in/index.html && echo started sidecar && \
         httpd -p 15001 -h /out && exec httpd -f -p 15006 -h /in"
            .into(),
    ];
    start_app(&mut cri, &pod, &config, sidecar).await;
    let app = start_app(&mut cri, &pod, &config, app_config("app")).await;

    // 192.0.2.1 (TEST-NET-1) is nobody: only the rule can answer for it.
    let outbound = exec_sync(
        &mut cri,
        &app,
        &["wget", "-q", "-O", "-", "http://192.0.2.1/"],
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&outbound.stdout),
        "outbound captured\n",
        "{}",
        String::from_utf8_lossy(&outbound.stderr)
    );
    let inbound = http_get(&format!("{pod_ip}:8080"));
    assert!(
        inbound.contains("inbound captured"),
        "the host got: {inbound}"
    );

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

/// Tap devices named by runv's convention in the host's namespace and in
/// those of `pod_netns` that are left (not in other tests' pods, which
/// run at the same time).
fn runv_taps(pod_netns: &[PathBuf]) -> Vec<String> {
    let links = |netns: Option<&Path>| {
        let mut command = Command::new("nsenter");
        if let Some(netns) = netns {
            command.arg(format!("--net={}", netns.display()));
        }
        let output = command
            .args(["ip", "-o", "link", "show"])
            .output()
            .expect("running ip");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| line.contains("_runv"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let left = pod_netns.iter().filter(|netns| netns.exists());
    left.flat_map(|netns| links(Some(netns)))
        .chain(links(None))
        .collect()
}
