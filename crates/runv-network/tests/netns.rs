//! PodNetwork against real network namespaces: needs root and /dev/net/tun
//! (and `ip`/`tc` to build the test namespace and look at it), and the
//! macvtap test a kernel with macvtap; prints `SKIPPED: <reason>`
//! otherwise.

mod common;

use std::{
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::fs::{FileTypeExt, MetadataExt},
    },
    time::{Duration, Instant},
};

use common::{macvtap_skip_reason, run, TestNetns};

use runv_network::{
    format_mac, Interconnect, IpAddress, IpFamily, NeighborConfig, PodNetwork, RouteConfig,
};

/// An AF_PACKET socket on a host interface.
fn packet_socket(ifindex: i32) -> OwnedFd {
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket calls on a new fd with a zeroed sockaddr_ll.
    unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(protocol),
        );
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(fd);
        let mut address: libc::sockaddr_ll = std::mem::zeroed();
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = protocol;
        address.sll_ifindex = ifindex;
        let rc = libc::bind(
            fd.as_raw_fd(),
            &address as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
        fd
    }
}

/// Reads frames from `fd` until `wanted` accepts one, for at most 5 s.
fn read_until(fd: RawFd, skip: usize, wanted: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let mut poll = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, 200) };
        if ready <= 0 {
            continue;
        }
        let mut buffer = vec![0u8; 65536];
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::read(fd, buffer.as_mut_ptr().cast(), buffer.len()) };
        assert!(n >= 0, "read: {}", io::Error::last_os_error());
        let frame = buffer[skip.min(n as usize)..n as usize].to_vec();
        if wanted(&frame) {
            return frame;
        }
        seen.push(frame.len());
    }
    panic!("the frame never came (saw frames of lengths {seen:?})");
}

fn write_all(fd: RawFd, bytes: &[u8]) {
    // SAFETY: the buffer is valid for its length.
    let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
    assert_eq!(
        n,
        bytes.len() as isize,
        "write: {}",
        io::Error::last_os_error()
    );
}

/// An ARP request "who has 10.77.0.2" from `sender`.
fn arp_request(sender: [u8; 6]) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&sender);
    frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&sender);
    frame.extend_from_slice(&[10, 77, 0, 1]);
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&[10, 77, 0, 2]);
    frame.resize(60, 0);
    frame
}

/// The size of `struct virtio_net_hdr` in front of every tap frame.
const VNET_HDR: usize = 10;

/// Host → pod: an ARP request sent to the pod's address comes out of the
/// tap, behind its virtio_net_hdr. Pod → host: a frame written to the tap
/// (as the guest sends it) comes out of the host end of the veth.
fn assert_traffic_passes(ns: &TestNetns, network: &PodNetwork) {
    let tap = &network.interfaces()[0];
    let guest_mac = tap.mac();
    let host = packet_socket(ns.host_index());
    let sender = [0x02, 0x52, 0x55, 0x4e, 0x56, 0x01];
    let request = arp_request(sender);
    write_all(host.as_raw_fd(), &request);
    let tap_fd = tap.tap.as_raw_fd();
    // SAFETY: fcntl on an open fd.
    unsafe { libc::fcntl(tap_fd, libc::F_SETFL, libc::O_NONBLOCK) };
    let frame = read_until(tap_fd, VNET_HDR, |f| f.len() >= 42 && f[6..12] == sender);
    assert_eq!(&frame[..42], &request[..42]);

    let mut out = vec![0u8; VNET_HDR];
    let marker = b"runv-network tap to eth0";
    out.extend_from_slice(&sender); // to the host end
    out.extend_from_slice(&guest_mac);
    out.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
    out.extend_from_slice(marker);
    out.resize(VNET_HDR + 64, 0);
    write_all(tap_fd, &out);
    let frame = read_until(host.as_raw_fd(), 0, |f| {
        f.len() >= 14 + marker.len() && &f[14..14 + marker.len()] == marker
    });
    assert_eq!(&frame[6..12], &guest_mac);
}

#[test]
fn joins_the_cni_interface_to_a_tap_and_tears_it_down() {
    skip_unless_able!();
    let ns = TestNetns::with_eth0();
    let network = PodNetwork::setup(&ns.path()).unwrap();
    let config = network.guest_config();

    // Exactly what the namespace has.
    assert_eq!(config.interfaces.len(), 1, "{config:?}");
    let eth0 = &config.interfaces[0];
    assert_eq!(eth0.name, "eth0");
    assert_eq!(eth0.mtu, 1400);
    assert_eq!(format_mac(&eth0.mac), ns.mac("eth0"));
    assert_eq!(network.interfaces()[0].mac(), eth0.mac);
    assert_eq!(
        eth0.addresses,
        vec![
            IpAddress {
                address: "10.77.0.2".parse().unwrap(),
                prefix_len: 24
            },
            IpAddress {
                address: "fd00:77::2".parse().unwrap(),
                prefix_len: 64
            }
        ]
    );
    let route = |destination: Option<(&str, u8)>, gateway: &str| RouteConfig {
        destination: destination.map(|(address, prefix_len)| IpAddress {
            address: address.parse().unwrap(),
            prefix_len,
        }),
        gateway: Some(gateway.parse().unwrap()),
        device: "eth0".into(),
        source: None,
        scope: 0,
        family: IpFamily::V4,
    };
    let mut routes = config.routes.clone();
    routes.sort_by_key(|r| (r.family == IpFamily::V6, r.destination_cidr()));
    assert_eq!(
        routes,
        vec![
            route(None, "10.77.0.1"),
            route(Some(("10.78.0.0", 16)), "10.77.0.254"),
            RouteConfig {
                family: IpFamily::V6,
                ..route(None, "fd00:77::1")
            }
        ]
    );
    assert_eq!(routes[1].destination_cidr(), "10.78.0.0/16");
    assert_eq!(
        config.neighbors,
        vec![NeighborConfig {
            ip: "10.77.0.1".parse().unwrap(),
            mac: [2, 0, 0, 0, 0, 1],
            device: "eth0".into(),
        }]
    );

    // The tap, up with the interface's MTU, and the tc plumbing.
    let tap = &network.interfaces()[0];
    assert_eq!(tap.tap_name, "tap0_runv");
    let tap_link = ns.ip(&["-o", "link", "show", "tap0_runv"]);
    assert!(tap_link.contains("mtu 1400"), "{tap_link}");
    assert!(tap_link.contains(",UP"), "{tap_link}");
    for (from, to) in [("eth0", "tap0_runv"), ("tap0_runv", "eth0")] {
        let qdiscs = ns.tc(&["qdisc", "show", "dev", from, "ingress"]);
        assert!(qdiscs.contains("qdisc ingress ffff:"), "{from}: {qdiscs}");
        let filters = ns.tc(&["filter", "show", "dev", from, "ingress"]);
        assert!(
            filters.contains("protocol all pref 49152 u32"),
            "{from}: {filters}"
        );
        assert!(
            filters.contains(&format!("Egress Redirect to device {to}")),
            "{from}: {filters}"
        );
    }

    assert_traffic_passes(&ns, &network);

    // Teardown leaves the interface as CNI made it.
    network.teardown().unwrap();
    let links = ns.links();
    assert!(!links.contains("_runv"), "{links}");
    let qdiscs = ns.tc(&["qdisc", "show", "dev", "eth0"]);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
    let filters = ns.tc(&["filter", "show", "dev", "eth0", "ingress"]);
    assert!(filters.trim().is_empty(), "{filters}");
    assert!(ns
        .ip(&["-o", "addr", "show", "eth0"])
        .contains("10.77.0.2/24"));
}

#[test]
fn namespace_with_only_lo_gives_an_empty_network() {
    skip_unless_able!();
    let ns = TestNetns::bare();
    let network = PodNetwork::setup(&ns.path()).unwrap();
    assert!(network.is_empty());
    assert_eq!(network.guest_config(), Default::default());
    network.teardown().unwrap();
    assert!(!ns.links().contains("_runv"));
}

/// With VFs passed through, an interface that is no PCI function (a
/// veth) is joined all the same, and nothing in sysfs is looked at beyond it.
#[test]
fn vf_passthrough_joins_interfaces_that_are_no_vf() {
    skip_unless_able!();
    let ns = TestNetns::with_eth0();
    let sysfs = runv_network::Sysfs::at("/nonexistent/sys", "/nonexistent/dev/vfio");
    let network = PodNetwork::setup_with_vfs(
        &ns.path(),
        Interconnect::TcMirred,
        &runv_network::VfPolicy::PassThrough,
        sysfs,
    )
    .unwrap();
    assert_eq!(network.interfaces().len(), 1);
    assert!(network.passthrough_functions().is_empty());
    assert_eq!(network.guest_config().interfaces[0].name, "eth0");
    network.teardown().unwrap();
    assert!(!ns.links().contains("_runv"));
}

/// CNI may delete the interface or the namespace's path before runv tears
/// down; dropping without teardown tears down too.
#[test]
fn teardown_after_cni_cleaned_up_and_on_drop() {
    skip_unless_able!();
    let ns = TestNetns::with_eth0();
    let network = PodNetwork::setup(&ns.path()).unwrap();
    ns.ip(&["link", "del", "eth0"]);
    run("ip", &["netns", "del", &ns.name]);
    network.teardown().unwrap();

    let ns = TestNetns::with_eth0();
    let network = PodNetwork::setup(&ns.path()).unwrap();
    assert!(ns.links().contains("tap0_runv"));
    drop(network);
    assert!(!ns.links().contains("_runv"));
    let qdiscs = ns.tc(&["qdisc", "show", "dev", "eth0"]);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
}

/// A tap fd still held elsewhere (a hypervisor) does not keep the tap.
#[test]
fn teardown_deletes_a_tap_still_open_elsewhere() {
    skip_unless_able!();
    let ns = TestNetns::with_eth0();
    let network = PodNetwork::setup(&ns.path()).unwrap();
    let held = network.interfaces()[0].tap.clone();
    network.teardown().unwrap();
    let links = ns.links();
    assert!(!links.contains("_runv"), "{links}");
    drop(held);
}

/// The bridge mode: a bridge holds the CNI interface (with a new MAC: the
/// guest has its own) and the tap; teardown puts everything back.
#[test]
fn bridge_mode_joins_through_a_bridge_and_puts_everything_back() {
    skip_unless_able!();
    let ns = TestNetns::with_eth0();
    let cni_mac = ns.mac("eth0");
    let network = PodNetwork::setup_with(&ns.path(), Interconnect::Bridge).unwrap();
    let config = network.guest_config();
    assert_eq!(config.interfaces.len(), 1, "{config:?}");
    assert_eq!(format_mac(&config.interfaces[0].mac), cni_mac);
    assert_eq!(config.interfaces[0].mtu, 1400);
    assert_eq!(config.routes.len(), 3, "{config:?}");
    let eth0 = ns.ip(&["-o", "link", "show", "eth0"]);
    assert!(eth0.contains("master br0_runv"), "{eth0}");
    assert_ne!(
        ns.mac("eth0"),
        cni_mac,
        "the bridge port has a MAC of its own"
    );
    let tap = ns.ip(&["-o", "link", "show", "tap0_runv"]);
    assert!(
        tap.contains("master br0_runv") && tap.contains("mtu 1400"),
        "{tap}"
    );
    let bridge = ns.ip(&["-o", "link", "show", "br0_runv"]);
    assert!(bridge.contains(",UP"), "{bridge}");
    assert!(!ns.tc(&["qdisc", "show", "dev", "eth0"]).contains("ingress"));

    assert_traffic_passes(&ns, &network);

    network.teardown().unwrap();
    let links = ns.links();
    assert!(!links.contains("_runv"), "{links}");
    let eth0 = ns.ip(&["-o", "link", "show", "eth0"]);
    assert!(!eth0.contains("master"), "{eth0}");
    assert_eq!(ns.mac("eth0"), cni_mac);
}

/// The name and flags of a tap or macvtap queue, by `TUNGETIFF`.
fn tun_get_iff(fd: RawFd) -> (String, i32) {
    // SAFETY: an all-zero ifreq is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF fills the ifreq.
    let rc = unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut request) };
    assert_eq!(rc, 0, "TUNGETIFF: {}", io::Error::last_os_error());
    let name = request
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8 as char)
        .collect();
    // SAFETY: TUNGETIFF set the flags.
    (name, i32::from(unsafe { request.ifr_ifru.ifru_flags }))
}

/// Runs `cat path` in the namespace, which `ip netns exec` gives a sysfs
/// of its own.
fn cat_in(ns: &TestNetns, path: &str) -> String {
    run("ip", &["netns", "exec", &ns.name, "cat", path])
        .trim()
        .to_owned()
}

/// No device node of macvtap `tap<index>` (numbers `dev`, `major:minor`)
/// is left: not the host's `/dev` one, nor a private directory of runv's.
fn assert_no_macvtap_node(index: &str, dev: &str) {
    let (major, minor) = dev.split_once(':').unwrap();
    let rdev = libc::makedev(major.parse().unwrap(), minor.parse().unwrap());
    let node = format!("/dev/tap{index}");
    if let Ok(metadata) = std::fs::metadata(&node) {
        assert!(
            !metadata.file_type().is_char_device() || metadata.rdev() != rdev,
            "{node} ({dev}) is still there"
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("runv-macvtap-"))
        .collect();
    assert!(leftovers.is_empty(), "left in the temp dir: {leftovers:?}");
}

/// The macvtap mode: a passthru macvtap on the CNI interface, with its
/// MAC, MTU and the CNI configuration unchanged, and a queue of it as the
/// tap; teardown (or drop, or CNI deleting the interface first) leaves no
/// macvtap, no device node and the interface as CNI made it.
#[test]
fn macvtap_mode_hands_a_passthru_macvtap_queue_and_tears_it_down() {
    skip_unless_able!();
    let ns = TestNetns::with_eth0();
    if let Some(reason) = macvtap_skip_reason(&ns) {
        println!("SKIPPED: {reason}");
        return;
    }
    let cni_mac = ns.mac("eth0");
    let network = PodNetwork::setup_with(&ns.path(), Interconnect::Macvtap).unwrap();
    let config = network.guest_config();
    assert_eq!(config.interfaces.len(), 1, "{config:?}");
    let eth0 = &config.interfaces[0];
    assert_eq!(eth0.name, "eth0");
    assert_eq!(eth0.mtu, 1400);
    assert_eq!(format_mac(&eth0.mac), cni_mac);
    assert_eq!(eth0.addresses.len(), 2, "{config:?}");
    assert_eq!(config.routes.len(), 3, "{config:?}");
    assert_eq!(config.neighbors.len(), 1, "{config:?}");

    // The macvtap: passthru on eth0, with eth0's MAC and MTU, up.
    let interface = &network.interfaces()[0];
    assert_eq!(interface.tap_name, "mvtap0_runv");
    let link = ns.ip(&["-d", "-o", "link", "show", "mvtap0_runv"]);
    assert!(link.contains("mvtap0_runv@eth0"), "{link}");
    assert!(link.contains("macvtap mode passthru"), "{link}");
    assert!(link.contains("mtu 1400") && link.contains(",UP"), "{link}");
    assert!(link.contains(&format!("link/ether {cni_mac}")), "{link}");
    // eth0 as CNI made it (promiscuous, for passthru).
    assert_eq!(ns.mac("eth0"), cni_mac);
    assert!(ns
        .ip(&["-o", "addr", "show", "eth0"])
        .contains("10.77.0.2/24"));
    assert!(!ns.links().contains(" tap0_runv"));
    assert!(!ns.tc(&["qdisc", "show", "dev", "eth0"]).contains("ingress"));

    // The fd is a queue of it, with the flags the hypervisors want.
    let (name, flags) = tun_get_iff(interface.tap.as_raw_fd());
    assert_eq!(name, "mvtap0_runv");
    let wanted = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    assert_eq!(flags & wanted, wanted, "{flags:#x}");
    assert_eq!(flags & libc::IFF_TUN, 0, "{flags:#x}");
    let index = cat_in(&ns, "/sys/class/net/mvtap0_runv/ifindex");
    let dev = cat_in(
        &ns,
        &format!("/sys/class/net/mvtap0_runv/macvtap/tap{index}/dev"),
    );

    assert_traffic_passes(&ns, &network);

    network.teardown().unwrap();
    let links = ns.links();
    assert!(!links.contains("_runv"), "{links}");
    let eth0 = ns.ip(&["-o", "link", "show", "eth0"]);
    assert!(!eth0.contains("PROMISC"), "{eth0}");
    assert_eq!(ns.mac("eth0"), cni_mac);
    assert!(ns
        .ip(&["-o", "addr", "show", "eth0"])
        .contains("10.77.0.2/24"));
    assert_no_macvtap_node(&index, &dev);

    // Dropped without teardown, with a copy of the fd held elsewhere.
    let network = PodNetwork::setup_with(&ns.path(), Interconnect::Macvtap).unwrap();
    let held = network.interfaces()[0].tap.clone();
    assert!(ns.links().contains("mvtap0_runv"));
    drop(network);
    let links = ns.links();
    assert!(!links.contains("_runv"), "{links}");
    drop(held);

    // CNI deleted the interface (and with it the macvtap) and the
    // namespace's path first.
    let network = PodNetwork::setup_with(&ns.path(), Interconnect::Macvtap).unwrap();
    ns.ip(&["link", "del", "eth0"]);
    run("ip", &["netns", "del", &ns.name]);
    network.teardown().unwrap();
}

/// A passthru macvtap cannot share its interface with a macvlan: setup
/// fails naming the interface, the operation and the errno, and leaves
/// nothing behind.
#[test]
fn macvtap_mode_error_names_the_interface_and_leaves_nothing() {
    skip_unless_able!();
    let ns = TestNetns::with_eth0();
    if let Some(reason) = macvtap_skip_reason(&ns) {
        println!("SKIPPED: {reason}");
        return;
    }
    ns.ip(&[
        "link", "add", "link", "eth0", "name", "mvl0", "type", "macvlan",
    ]);
    let err = PodNetwork::setup_with(&ns.path(), Interconnect::Macvtap)
        .unwrap_err()
        .to_string();
    println!("{err}");
    assert!(
        err.contains(", interface eth0: cannot create passthru macvtap mvtap0_runv on it: ")
            && err.contains("os error")
            && err.contains("no macvlan or macvtap on it yet"),
        "{err}"
    );
    let links = ns.links();
    assert!(!links.contains("_runv"), "{links}");
}
