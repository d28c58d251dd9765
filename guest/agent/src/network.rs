//! Pod networking: ConfigureNetwork through rtnetlink, and the network
//! part of ContainerStats from /sys/class/net.
//!
//! The host gives the guest one virtio-net NIC per CNI interface, with the
//! CNI interface's MAC address; the request names each NIC by that MAC.
//! A VF passed through whole is named by its PCI address instead (its
//! driver may have made up a MAC), and gets the requested MAC.
//! The request is checked whole ([`plan`]) before anything changes; then
//! [`configure`] applies it. Netlink goes through netlink-packet-route and
//! netlink-sys directly (the OCI runtime already links them), over a
//! blocking socket: the kernel answers rtnetlink requests synchronously.

use std::{
    collections::HashSet,
    fmt, fs, io,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::{
    address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage},
    link::{LinkAttribute, LinkFlags, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use nix::errno::Errno;
use runv_protocol::agent;

/// How long ConfigureNetwork waits, in all, for the NICs to appear.
pub const NIC_WAIT: Duration = Duration::from_secs(5);
const NIC_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Where the guest's NICs show in sysfs: each NIC backed by a device has a
/// `device` link, named after a PCI function's address for a PCI NIC.
const SYS_CLASS_NET: &str = "/sys/class/net";

/// The longest interface name the kernel takes (IFNAMSIZ - 1).
const MAX_NAME_LEN: usize = 15;

const AF_INET: u32 = libc::AF_INET as u32;
const AF_INET6: u32 = libc::AF_INET6 as u32;

/// One ConfigureNetwork at a time: a second would race the first's
/// renames.
static CONFIGURING: Mutex<()> = Mutex::new(());

#[derive(Debug, PartialEq, Eq)]
pub enum NetworkError {
    /// The request is malformed; nothing was changed.
    Invalid(String),
    /// A NIC the request names never appeared.
    NicNotFound(String),
    /// A netlink operation failed.
    Failed(String),
}

impl NetworkError {
    pub fn code(&self) -> ttrpc::Code {
        match self {
            NetworkError::Invalid(_) => ttrpc::Code::INVALID_ARGUMENT,
            NetworkError::NicNotFound(_) => ttrpc::Code::NOT_FOUND,
            NetworkError::Failed(_) => ttrpc::Code::INTERNAL,
        }
    }
}

impl fmt::Display for NetworkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetworkError::Invalid(m) | NetworkError::NicNotFound(m) | NetworkError::Failed(m) => {
                f.write_str(m)
            }
        }
    }
}

type Mac = [u8; 6];

/// A checked ConfigureNetworkRequest.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    interfaces: Vec<PlannedInterface>,
    routes: Vec<PlannedRoute>,
    neighbors: Vec<PlannedNeighbor>,
}

#[derive(Debug, PartialEq, Eq)]
struct PlannedInterface {
    mac: Mac,
    /// Set for a passed-through function: the NIC is found by it.
    pci_address: Option<String>,
    name: String,
    mtu: u32,
    addresses: Vec<(IpAddr, u8)>,
}

#[derive(Debug, PartialEq, Eq)]
struct PlannedRoute {
    /// For messages: the route as ip-route(8) would show it.
    description: String,
    ipv6: bool,
    destination: Option<(IpAddr, u8)>,
    gateway: Option<IpAddr>,
    device: Option<String>,
    source: Option<IpAddr>,
    scope: u8,
}

#[derive(Debug, PartialEq, Eq)]
struct PlannedNeighbor {
    ip: IpAddr,
    mac: Mac,
    device: String,
}

/// Parses "aa:bb:cc:dd:ee:ff" (either case).
pub fn parse_mac(text: &str) -> Result<Mac, String> {
    let invalid = || format!("{text:?} is not a MAC address (aa:bb:cc:dd:ee:ff)");
    let mut mac = [0; 6];
    let mut octets = text.split(':');
    for octet in &mut mac {
        let part = octets.next().ok_or_else(invalid)?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        *octet = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
    }
    if octets.next().is_some() {
        return Err(invalid());
    }
    Ok(mac)
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|octet| format!("{octet:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn max_prefix(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

fn parse_ip(text: &str, what: &str) -> Result<IpAddr, String> {
    text.parse()
        .map_err(|_| format!("{what} {text:?} is not an IP address"))
}

/// Parses a network in CIDR form, "10.88.0.0/16", whose host bits are
/// zero.
fn parse_cidr(text: &str) -> Result<(IpAddr, u8), String> {
    let invalid = || format!("destination {text:?} is not a CIDR (10.88.0.0/16, fd00::/64)");
    let (address, prefix) = text.split_once('/').ok_or_else(invalid)?;
    let ip: IpAddr = address.parse().map_err(|_| invalid())?;
    let prefix: u8 = prefix.parse().map_err(|_| invalid())?;
    if prefix > max_prefix(&ip) {
        return Err(format!(
            "destination {text:?}: prefix length {prefix} exceeds {}",
            max_prefix(&ip)
        ));
    }
    let host_bits_set = match ip {
        IpAddr::V4(v4) => u32::from(v4).checked_shl(u32::from(prefix)).unwrap_or(0) != 0,
        IpAddr::V6(v6) => u128::from(v6).checked_shl(u32::from(prefix)).unwrap_or(0) != 0,
    };
    if host_bits_set {
        return Err(format!(
            "destination {text:?} has host bits set beyond its /{prefix} prefix"
        ));
    }
    Ok((ip, prefix))
}

fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b.is_ascii_control());
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid interface name (1 to {MAX_NAME_LEN} bytes, no '/', ':' or \
             white space)"
        ))
    }
}

/// Checks the whole request and puts it into the form [`configure`] applies.
pub fn plan(request: &agent::ConfigureNetworkRequest) -> Result<Plan, NetworkError> {
    plan_inner(request).map_err(NetworkError::Invalid)
}

fn plan_inner(request: &agent::ConfigureNetworkRequest) -> Result<Plan, String> {
    let mut interfaces = Vec::new();
    let mut macs = HashSet::new();
    let mut pci_addresses = HashSet::new();
    let mut names = HashSet::from(["lo".to_owned()]);
    for interface in &request.interfaces {
        let mac = parse_mac(&interface.mac).map_err(|e| format!("interface: {e}"))?;
        check_name(&interface.name).map_err(|e| format!("interface {}: {e}", interface.mac))?;
        if !macs.insert(mac) {
            return Err(format!("MAC address {} is given twice", interface.mac));
        }
        let pci_address = match interface.pci_address.as_str() {
            "" => None,
            text => Some(
                check_pci_address(text)
                    .map_err(|e| format!("interface {}: {e}", interface.name))?,
            ),
        };
        if let Some(address) = &pci_address {
            if !pci_addresses.insert(address.clone()) {
                return Err(format!("PCI address {address} is given twice"));
            }
        }
        if !names.insert(interface.name.clone()) {
            return Err(format!(
                "interface name {} is given twice (or is lo)",
                interface.name
            ));
        }
        let mut addresses = Vec::new();
        for address in &interface.addresses {
            let ip = parse_ip(&address.address, "address")
                .map_err(|e| format!("interface {}: {e}", interface.name))?;
            if address.prefix_len > u32::from(max_prefix(&ip)) {
                return Err(format!(
                    "interface {}: address {}/{}: prefix length exceeds {}",
                    interface.name,
                    address.address,
                    address.prefix_len,
                    max_prefix(&ip)
                ));
            }
            addresses.push((ip, address.prefix_len as u8));
        }
        interfaces.push(PlannedInterface {
            mac,
            pci_address,
            name: interface.name.clone(),
            mtu: interface.mtu,
            addresses,
        });
    }

    let known_device = |device: &str, what: &str| {
        if names.contains(device) {
            Ok(())
        } else {
            let mut known: Vec<_> = names.iter().map(String::as_str).collect();
            known.sort_unstable();
            Err(format!(
                "{what}: device {device:?} is none of the configured interfaces ({})",
                known.join(", ")
            ))
        }
    };

    let mut routes = Vec::new();
    for route in &request.routes {
        let description = describe_route(route);
        let context = |e: String| format!("route {description}: {e}");
        let destination = if route.destination.is_empty() {
            None
        } else {
            Some(parse_cidr(&route.destination).map_err(context)?)
        };
        let gateway = if route.gateway.is_empty() {
            None
        } else {
            Some(parse_ip(&route.gateway, "gateway").map_err(context)?)
        };
        let source = if route.source.is_empty() {
            None
        } else {
            Some(parse_ip(&route.source, "source").map_err(context)?)
        };
        let device = if route.device.is_empty() {
            if gateway.is_none() {
                return Err(context("a route without a gateway needs a device".into()));
            }
            None
        } else {
            known_device(&route.device, &format!("route {description}"))?;
            Some(route.device.clone())
        };
        let scope = u8::try_from(route.scope)
            .map_err(|_| context(format!("scope {} is not an rtnetlink scope", route.scope)))?;
        // The family: given, or that of the addresses; all must agree.
        let mut family = match route.family {
            0 => None,
            AF_INET => Some(false),
            AF_INET6 => Some(true),
            other => {
                return Err(context(format!(
                    "family {other} is neither 2 (IPv4) nor 10 (IPv6)"
                )))
            }
        };
        for ip in destination
            .iter()
            .map(|(ip, _)| ip)
            .chain(gateway.iter())
            .chain(source.iter())
        {
            match family {
                None => family = Some(ip.is_ipv6()),
                Some(ipv6) if ipv6 != ip.is_ipv6() => {
                    return Err(context(
                        "mixes IPv4 and IPv6 (family, destination, gateway, source)".into(),
                    ))
                }
                Some(_) => {}
            }
        }
        let ipv6 = family.ok_or_else(|| {
            context("the family is needed: no destination, gateway or source tells it".into())
        })?;
        routes.push(PlannedRoute {
            description,
            ipv6,
            destination,
            gateway,
            device,
            source,
            scope,
        });
    }

    let mut neighbors = Vec::new();
    for neighbor in &request.neighbors {
        let context = |e: String| format!("neighbour {} on {}: {e}", neighbor.ip, neighbor.device);
        let ip = parse_ip(&neighbor.ip, "address").map_err(context)?;
        let mac = parse_mac(&neighbor.mac).map_err(context)?;
        known_device(
            &neighbor.device,
            &format!("neighbour {} on {}", neighbor.ip, neighbor.device),
        )?;
        neighbors.push(PlannedNeighbor {
            ip,
            mac,
            device: neighbor.device.clone(),
        });
    }

    Ok(Plan {
        interfaces,
        routes,
        neighbors,
    })
}

/// A route as ip-route(8) writes it: "default via 10.88.0.1 dev eth0".
fn describe_route(route: &agent::Route) -> String {
    let mut text = if route.destination.is_empty() {
        "default".to_owned()
    } else {
        route.destination.clone()
    };
    if !route.gateway.is_empty() {
        text += &format!(" via {}", route.gateway);
    }
    if !route.device.is_empty() {
        text += &format!(" dev {}", route.device);
    }
    if !route.source.is_empty() {
        text += &format!(" src {}", route.source);
    }
    match route.scope {
        0 => {}
        253 => text += " scope link",
        254 => text += " scope host",
        other => text += &format!(" scope {other}"),
    }
    text
}

/// `0000:00:01.0` (domain:bus:device.function, lower-case hex), as sysfs
/// names a PCI function.
fn check_pci_address(text: &str) -> Result<String, String> {
    let invalid = || format!("PCI address {text:?} is not of the form 0000:00:01.0");
    let (domain, rest) = text.split_once(':').ok_or_else(invalid)?;
    let (bus, rest) = rest.split_once(':').ok_or_else(invalid)?;
    let (device, function) = rest.split_once('.').ok_or_else(invalid)?;
    let hex =
        |part: &str, len: usize| part.len() == len && part.bytes().all(|b| b.is_ascii_hexdigit());
    if !(hex(domain, 4) && hex(bus, 2) && hex(device, 2) && hex(function, 1)) {
        return Err(invalid());
    }
    Ok(text.to_ascii_lowercase())
}

/// A network interface of the guest, as netlink reports it, with the PCI
/// function behind it (from sysfs, read only when a plan names NICs by it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Link {
    index: u32,
    name: String,
    mac: Vec<u8>,
    mtu: u32,
    pci_address: Option<String>,
}

impl PlannedInterface {
    fn is(&self, link: &Link) -> bool {
        match &self.pci_address {
            Some(address) => link.pci_address.as_ref() == Some(address),
            None => link.mac == self.mac,
        }
    }

    /// How the request names it, for messages.
    fn key(&self) -> String {
        match &self.pci_address {
            Some(address) => format!("PCI address {address}"),
            None => format!("MAC address {}", format_mac(&self.mac)),
        }
    }
}

/// The PCI function behind NIC `name`: the name of its `device` link when
/// that is a PCI address (virtio-net's is `virtioN`).
fn nic_pci_address(sys_class_net: &Path, name: &str) -> Option<String> {
    let device = fs::read_link(sys_class_net.join(name).join("device")).ok()?;
    let device = device.file_name()?.to_str()?;
    check_pci_address(device).ok()
}

/// The link of each planned interface, in order, or the error that names
/// the MACs not found and the NICs the guest has.
fn match_nics<'a>(
    interfaces: &[PlannedInterface],
    links: &'a [Link],
) -> Result<Vec<&'a Link>, String> {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for interface in interfaces {
        match links.iter().find(|link| interface.is(link)) {
            Some(link) => found.push(link),
            None => missing.push(interface.key()),
        }
    }
    if missing.is_empty() {
        return Ok(found);
    }
    let seen: Vec<String> = links
        .iter()
        .filter(|link| link.name != "lo" && link.mac.len() == 6)
        .map(|link| format!("{} ({})", link.name, format_mac(&link.mac)))
        .collect();
    Err(format!(
        "no NIC with {} (the guest has {})",
        missing.join(", "),
        if seen.is_empty() {
            "no Ethernet NIC".to_owned()
        } else {
            seen.join(", ")
        }
    ))
}

/// Applies `plan` to the guest: loopback up, then each NIC (found by MAC,
/// waiting up to `wait` for them to appear) renamed, given its MTU and
/// addresses and brought up, then the routes and the neighbour entries.
pub fn configure(plan: &Plan, wait: Duration) -> Result<(), NetworkError> {
    let _one_at_a_time = CONFIGURING.lock().unwrap_or_else(|e| e.into_inner());
    let failed = NetworkError::Failed;
    let mut netlink =
        Netlink::open().map_err(|e| failed(format!("opening a netlink socket: {e}")))?;
    let listing = |e: Errno| failed(format!("listing the network interfaces: {e}"));

    let links = netlink.links().map_err(listing)?;
    let lo = links
        .iter()
        .find(|link| link.name == "lo")
        .ok_or_else(|| failed("the guest has no loopback interface lo".into()))?;
    netlink
        .set_link(lo.index, Some(true), None, None)
        .map_err(|e| failed(format!("bringing up lo: {e}")))?;

    let start = Instant::now();
    // Only a passed function's NIC is looked up by PCI address: the other
    // NICs' sysfs is left unread.
    let by_pci = plan.interfaces.iter().any(|i| i.pci_address.is_some());
    let links = loop {
        let mut links = netlink.links().map_err(listing)?;
        if by_pci {
            for link in &mut links {
                link.pci_address = nic_pci_address(Path::new(SYS_CLASS_NET), &link.name);
            }
        }
        match match_nics(&plan.interfaces, &links) {
            Ok(_) => break links,
            Err(message) if start.elapsed() >= wait => {
                return Err(NetworkError::NicNotFound(format!(
                    "{message} after {:?}",
                    start.elapsed()
                )))
            }
            Err(_) => thread::sleep(NIC_POLL_INTERVAL),
        }
    };
    let nics = match_nics(&plan.interfaces, &links).map_err(NetworkError::NicNotFound)?;

    // Renaming takes the NIC down. Every NIC to rename first gets a
    // temporary name, so that NICs may swap names (the kernel's eth0 may
    // be the pod's eth1).
    let renames: Vec<(&PlannedInterface, &Link)> = plan
        .interfaces
        .iter()
        .zip(&nics)
        .filter(|(interface, link)| link.name != interface.name)
        .map(|(interface, link)| (interface, *link))
        .collect();
    for (interface, link) in &renames {
        let temporary = format!("runvtmp{}", link.index);
        netlink
            .set_link(link.index, Some(false), Some(&temporary), None)
            .map_err(|e| {
                failed(format!(
                    "interface {} (MAC {}): bringing {} down and renaming it: {e}",
                    interface.name,
                    format_mac(&interface.mac),
                    link.name
                ))
            })?;
    }
    for (interface, link) in plan.interfaces.iter().zip(&nics) {
        if link.mac != interface.mac {
            // Only a passed function's NIC is found other than by MAC.
            netlink
                .set_link(link.index, Some(false), None, None)
                .and_then(|()| netlink.set_mac(link.index, &interface.mac))
                .map_err(|e| {
                    failed(format!(
                        "interface {} ({}): giving {} the MAC {}: {e}",
                        interface.name,
                        interface.key(),
                        link.name,
                        format_mac(&interface.mac)
                    ))
                })?;
        }
    }
    for (interface, link) in &renames {
        netlink
            .set_link(link.index, None, Some(&interface.name), None)
            .map_err(|e| {
                failed(format!(
                    "interface {} (MAC {}): renaming {} to {}: {e}",
                    interface.name,
                    format_mac(&interface.mac),
                    link.name,
                    interface.name
                ))
            })?;
    }

    for (interface, link) in plan.interfaces.iter().zip(&nics) {
        let context = |what: String, e: Errno| {
            failed(format!(
                "interface {} (MAC {}): {what}: {e}",
                interface.name,
                format_mac(&interface.mac)
            ))
        };
        if interface.mtu != 0 && interface.mtu != link.mtu {
            netlink
                .set_link(link.index, None, None, Some(interface.mtu))
                .map_err(|e| context(format!("setting the MTU to {}", interface.mtu), e))?;
        }
        for &(ip, prefix_len) in &interface.addresses {
            match netlink.add_address(link.index, ip, prefix_len) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(context(format!("adding address {ip}/{prefix_len}"), e)),
            }
        }
        netlink
            .set_link(link.index, Some(true), None, None)
            .map_err(|e| context("bringing it up".into(), e))?;
        tracing::info!(
            interface = %interface.name,
            mac = %format_mac(&interface.mac),
            addresses = interface.addresses.len(),
            "network interface configured"
        );
    }

    let links = netlink.links().map_err(listing)?;
    let index_of = |name: &str| {
        links
            .iter()
            .find(|link| link.name == name)
            .map(|link| link.index)
            .ok_or_else(|| failed(format!("interface {name} vanished")))
    };
    for route in &plan.routes {
        let oif = route.device.as_deref().map(index_of).transpose()?;
        match netlink.add_route(route, oif) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(failed(format!("route {}: {e}", route.description))),
        }
    }
    for neighbor in &plan.neighbors {
        let index = index_of(&neighbor.device)?;
        netlink.add_neighbor(neighbor, index).map_err(|e| {
            failed(format!(
                "neighbour {} ({}) on {}: {e}",
                neighbor.ip,
                format_mac(&neighbor.mac),
                neighbor.device
            ))
        })?;
    }
    tracing::info!(
        interfaces = plan.interfaces.len(),
        routes = plan.routes.len(),
        neighbors = plan.neighbors.len(),
        "network configured"
    );
    Ok(())
}

/// A blocking rtnetlink socket.
struct Netlink {
    socket: Socket,
    sequence: u32,
}

impl Netlink {
    fn open() -> io::Result<Netlink> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Netlink {
            socket,
            sequence: 0,
        })
    }

    /// Sends a request and returns its sequence number.
    fn send(&mut self, message: RouteNetlinkMessage, flags: u16) -> Result<u32, Errno> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut packet = NetlinkMessage::new(NetlinkHeader::default(), message.into());
        packet.header.flags = NLM_F_REQUEST | flags;
        packet.header.sequence_number = self.sequence;
        packet.finalize();
        let mut buffer = vec![0; packet.buffer_len()];
        packet.serialize(&mut buffer);
        self.socket.send(&buffer, 0).map_err(io_errno)?;
        Ok(self.sequence)
    }

    /// The messages of the next datagram that answer `sequence`.
    fn receive(
        &mut self,
        sequence: u32,
    ) -> Result<Vec<NetlinkMessage<RouteNetlinkMessage>>, Errno> {
        let (buffer, _) = self.socket.recv_from_full().map_err(io_errno)?;
        let mut messages = Vec::new();
        let mut offset = 0;
        while offset < buffer.len() {
            let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buffer[offset..])
                .map_err(|e| {
                    tracing::warn!(error = %e, "undecodable netlink message");
                    Errno::EBADMSG
                })?;
            let length = message.header.length as usize;
            if length == 0 {
                break;
            }
            // Messages in a datagram are 4-byte aligned.
            offset += (length + 3) & !3;
            if message.header.sequence_number == sequence {
                messages.push(message);
            }
        }
        Ok(messages)
    }

    /// A request the kernel acknowledges: Ok, or the errno it answered.
    fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> Result<(), Errno> {
        let sequence = self.send(message, flags | NLM_F_ACK)?;
        loop {
            for message in self.receive(sequence)? {
                if let NetlinkPayload::Error(error) = message.payload {
                    return match error.code {
                        None => Ok(()),
                        Some(code) => Err(Errno::from_raw(-code.get())),
                    };
                }
            }
        }
    }

    /// A dump request's answers.
    fn dump(&mut self, message: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>, Errno> {
        let sequence = self.send(message, NLM_F_DUMP)?;
        let mut answers = Vec::new();
        loop {
            for message in self.receive(sequence)? {
                match message.payload {
                    NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(error) => {
                        return Err(error.code.map_or(Errno::EIO, |c| Errno::from_raw(-c.get())))
                    }
                    _ => {}
                }
            }
        }
    }

    fn links(&mut self) -> Result<Vec<Link>, Errno> {
        let answers = self.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
        let mut links = Vec::new();
        for answer in answers {
            let RouteNetlinkMessage::NewLink(message) = answer else {
                continue;
            };
            let mut link = Link {
                index: message.header.index,
                name: String::new(),
                mac: Vec::new(),
                mtu: 0,
                pci_address: None,
            };
            for attribute in message.attributes {
                match attribute {
                    LinkAttribute::IfName(name) => link.name = name,
                    LinkAttribute::Address(mac) => link.mac = mac,
                    LinkAttribute::Mtu(mtu) => link.mtu = mtu,
                    _ => {}
                }
            }
            links.push(link);
        }
        Ok(links)
    }

    /// Changes what is given of a link: up or down, name, MTU.
    fn set_link(
        &mut self,
        index: u32,
        up: Option<bool>,
        name: Option<&str>,
        mtu: Option<u32>,
    ) -> Result<(), Errno> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        if let Some(up) = up {
            message.header.change_mask = LinkFlags::Up;
            if up {
                message.header.flags = LinkFlags::Up;
            }
        }
        if let Some(name) = name {
            message
                .attributes
                .push(LinkAttribute::IfName(name.to_owned()));
        }
        if let Some(mtu) = mtu {
            message.attributes.push(LinkAttribute::Mtu(mtu));
        }
        self.request(RouteNetlinkMessage::SetLink(message), 0)
    }

    /// Gives a link (which must be down) its MAC address.
    fn set_mac(&mut self, index: u32, mac: &Mac) -> Result<(), Errno> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        message
            .attributes
            .push(LinkAttribute::Address(mac.to_vec()));
        self.request(RouteNetlinkMessage::SetLink(message), 0)
    }

    fn add_address(&mut self, index: u32, ip: IpAddr, prefix_len: u8) -> Result<(), Errno> {
        let mut message = AddressMessage::default();
        message.header.family = family(&ip);
        message.header.prefix_len = prefix_len;
        message.header.index = index;
        message.attributes.push(AddressAttribute::Local(ip));
        message.attributes.push(AddressAttribute::Address(ip));
        match ip {
            IpAddr::V4(v4) => {
                if prefix_len < 31 {
                    let host_mask = u32::MAX >> prefix_len;
                    let broadcast = Ipv4Addr::from(u32::from(v4) | host_mask);
                    message
                        .attributes
                        .push(AddressAttribute::Broadcast(broadcast));
                }
            }
            IpAddr::V6(_) => {
                // The pod's address is the CNI's: usable at once, with no
                // duplicate address detection holding it tentative.
                message.header.flags = AddressHeaderFlags::Nodad;
                message
                    .attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
        }
        self.request(
            RouteNetlinkMessage::NewAddress(message),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    fn add_route(&mut self, route: &PlannedRoute, oif: Option<u32>) -> Result<(), Errno> {
        let mut message = RouteMessage::default();
        message.header.address_family = if route.ipv6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        message.header.table = RouteHeader::RT_TABLE_MAIN;
        message.header.protocol = RouteProtocol::Boot;
        message.header.scope = route.scope.into();
        message.header.kind = RouteType::Unicast;
        if let Some((ip, prefix_len)) = route.destination {
            message.header.destination_prefix_length = prefix_len;
            message
                .attributes
                .push(RouteAttribute::Destination(RouteAddress::from(ip)));
        }
        if let Some(gateway) = route.gateway {
            message
                .attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(gateway)));
        }
        if let Some(source) = route.source {
            message
                .attributes
                .push(RouteAttribute::PrefSource(RouteAddress::from(source)));
        }
        if let Some(oif) = oif {
            message.attributes.push(RouteAttribute::Oif(oif));
        }
        self.request(
            RouteNetlinkMessage::NewRoute(message),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    fn add_neighbor(&mut self, neighbor: &PlannedNeighbor, index: u32) -> Result<(), Errno> {
        let mut message = NeighbourMessage::default();
        message.header.family = family(&neighbor.ip);
        message.header.ifindex = index;
        message.header.state = NeighbourState::Permanent;
        message.header.kind = RouteType::Unicast;
        let destination = match neighbor.ip {
            IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
            IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
        };
        message
            .attributes
            .push(NeighbourAttribute::Destination(destination));
        message
            .attributes
            .push(NeighbourAttribute::LinkLayerAddress(neighbor.mac.to_vec()));
        self.request(
            RouteNetlinkMessage::NewNeighbour(message),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }
}

fn family(ip: &IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn io_errno(e: io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// The counters of the pod's interfaces: the guest's NICs. Containers
/// share the VM's network namespace, as runc's containers share the pod's.
pub fn pod_interface_stats() -> io::Result<Vec<agent::NetworkInterfaceStats>> {
    interface_stats(Path::new(SYS_CLASS_NET))
}

/// The counters of the NICs under `sys_class_net` (/sys/class/net), sorted
/// by name: the interfaces backed by a device (`device` link), which
/// leaves out lo and the kernel's virtual ones such as sit0. An interface
/// that goes away while being read is left out.
pub fn interface_stats(sys_class_net: &Path) -> io::Result<Vec<agent::NetworkInterfaceStats>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(sys_class_net)? {
        let entry = entry?;
        if entry.path().join("device").exists() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    let mut all = Vec::new();
    for name in names {
        let dir = sys_class_net.join(&name).join("statistics");
        match read_counters(&dir, name) {
            Ok(stats) => all.push(stats),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
        }
    }
    Ok(all)
}

fn read_counters(dir: &Path, name: String) -> io::Result<agent::NetworkInterfaceStats> {
    let read = |file: &str| -> io::Result<u64> {
        let text = fs::read_to_string(dir.join(file))?;
        text.trim().parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{file}: {:?} is not a counter", text.trim()),
            )
        })
    };
    Ok(agent::NetworkInterfaceStats {
        name,
        rx_bytes: read("rx_bytes")?,
        rx_packets: read("rx_packets")?,
        rx_errors: read("rx_errors")?,
        rx_dropped: read("rx_dropped")?,
        tx_bytes: read("tx_bytes")?,
        tx_packets: read("tx_packets")?,
        tx_errors: read("tx_errors")?,
        tx_dropped: read("tx_dropped")?,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interface(mac: &str, name: &str, addresses: &[(&str, u32)]) -> agent::NetworkInterface {
        agent::NetworkInterface {
            mac: mac.into(),
            name: name.into(),
            mtu: 1500,
            addresses: addresses
                .iter()
                .map(|(address, prefix_len)| agent::IpAddress {
                    address: (*address).into(),
                    prefix_len: *prefix_len,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn route(destination: &str, gateway: &str, device: &str, scope: u32) -> agent::Route {
        agent::Route {
            destination: destination.into(),
            gateway: gateway.into(),
            device: device.into(),
            scope,
            ..Default::default()
        }
    }

    fn request(
        interfaces: Vec<agent::NetworkInterface>,
        routes: Vec<agent::Route>,
    ) -> agent::ConfigureNetworkRequest {
        agent::ConfigureNetworkRequest {
            interfaces,
            routes,
            ..Default::default()
        }
    }

    fn invalid(request: &agent::ConfigureNetworkRequest) -> String {
        match plan(request) {
            Err(NetworkError::Invalid(message)) => message,
            other => panic!("expected an invalid request, got {other:?}"),
        }
    }

    #[test]
    fn parses_and_formats_macs() {
        let mac = parse_mac("0A:58:0a:58:00:05").unwrap();
        assert_eq!(mac, [0x0a, 0x58, 0x0a, 0x58, 0x00, 0x05]);
        assert_eq!(format_mac(&mac), "0a:58:0a:58:00:05");
        for bad in [
            "",
            "0a:58:0a:58:00",
            "0a:58:0a:58:00:05:06",
            "0a-58-0a-58-00-05",
            "a:58:0a:58:00:05:",
            "0g:58:0a:58:00:05",
            "+a:58:0a:58:00:05",
        ] {
            let e = parse_mac(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn parses_cidrs() {
        assert_eq!(
            parse_cidr("10.88.0.0/16").unwrap(),
            ("10.88.0.0".parse().unwrap(), 16)
        );
        assert_eq!(
            parse_cidr("0.0.0.0/0").unwrap(),
            ("0.0.0.0".parse().unwrap(), 0)
        );
        assert_eq!(
            parse_cidr("fd00::/64").unwrap(),
            ("fd00::".parse().unwrap(), 64)
        );
        assert_eq!(
            parse_cidr("10.88.0.5/32").unwrap(),
            ("10.88.0.5".parse().unwrap(), 32)
        );
        assert!(parse_cidr("10.88.0.0").unwrap_err().contains("not a CIDR"));
        assert!(parse_cidr("10.88.0/16").unwrap_err().contains("not a CIDR"));
        assert!(parse_cidr("10.88.0.0/33")
            .unwrap_err()
            .contains("exceeds 32"));
        assert!(parse_cidr("fd00::/129")
            .unwrap_err()
            .contains("exceeds 128"));
        assert!(parse_cidr("10.88.0.5/16")
            .unwrap_err()
            .contains("host bits"));
        assert!(parse_cidr("fd00::1/64").unwrap_err().contains("host bits"));
    }

    #[test]
    fn plans_a_typical_pod() {
        let request = request(
            vec![interface(
                "0a:58:0a:58:00:05",
                "eth0",
                &[("10.88.0.5", 16), ("fd00::5", 64)],
            )],
            vec![
                route("10.88.0.0/16", "", "eth0", 253),
                route("", "10.88.0.1", "eth0", 0),
                route("", "fd00::1", "eth0", 0),
            ],
        );
        let plan = plan(&request).unwrap();
        assert_eq!(plan.interfaces[0].name, "eth0");
        assert_eq!(
            plan.interfaces[0].addresses,
            [
                ("10.88.0.5".parse().unwrap(), 16),
                ("fd00::5".parse().unwrap(), 64)
            ]
        );
        // In the order given.
        let described: Vec<_> = plan.routes.iter().map(|r| r.description.as_str()).collect();
        assert_eq!(
            described,
            [
                "10.88.0.0/16 dev eth0 scope link",
                "default via 10.88.0.1 dev eth0",
                "default via fd00::1 dev eth0"
            ]
        );
        assert!(!plan.routes[0].ipv6 && !plan.routes[1].ipv6 && plan.routes[2].ipv6);
        assert_eq!(plan.routes[0].scope, 253);
        assert_eq!(plan.routes[1].destination, None);
    }

    #[test]
    fn an_empty_request_plans_nothing() {
        let plan = plan(&agent::ConfigureNetworkRequest::new()).unwrap();
        assert!(plan.interfaces.is_empty() && plan.routes.is_empty());
    }

    #[test]
    fn names_what_is_malformed() {
        let bad_mac = request(vec![interface("0a:58:0a:58:00", "eth0", &[])], vec![]);
        assert!(invalid(&bad_mac).contains("\"0a:58:0a:58:00\" is not a MAC"));

        let bad_name = request(
            vec![interface("0a:58:0a:58:00:05", "a-very-long-name0", &[])],
            vec![],
        );
        let e = invalid(&bad_name);
        assert!(
            e.contains("0a:58:0a:58:00:05") && e.contains("a-very-long-name0"),
            "{e}"
        );

        let bad_address = request(
            vec![interface(
                "0a:58:0a:58:00:05",
                "eth0",
                &[("10.88.0.500", 16)],
            )],
            vec![],
        );
        let e = invalid(&bad_address);
        assert!(e.contains("eth0") && e.contains("\"10.88.0.500\""), "{e}");

        let bad_prefix = request(
            vec![interface("0a:58:0a:58:00:05", "eth0", &[("10.88.0.5", 33)])],
            vec![],
        );
        let e = invalid(&bad_prefix);
        assert!(
            e.contains("10.88.0.5/33") && e.contains("exceeds 32"),
            "{e}"
        );

        let twice = request(
            vec![
                interface("0a:58:0a:58:00:05", "eth0", &[]),
                interface("0A:58:0A:58:00:05", "eth1", &[]),
            ],
            vec![],
        );
        assert!(invalid(&twice).contains("given twice"));
        let same_name = request(
            vec![
                interface("0a:58:0a:58:00:05", "eth0", &[]),
                interface("0a:58:0a:58:00:06", "eth0", &[]),
            ],
            vec![],
        );
        assert!(invalid(&same_name).contains("eth0 is given twice"));
    }

    #[test]
    fn names_the_malformed_route() {
        let nic = || vec![interface("0a:58:0a:58:00:05", "eth0", &[("10.88.0.5", 16)])];
        let cases = [
            (
                route("10.88.0.0/33", "", "eth0", 253),
                "route 10.88.0.0/33 dev eth0 scope link",
            ),
            (
                route("10.1.0.0/16", "10.88.0.x", "eth0", 0),
                "\"10.88.0.x\"",
            ),
            (
                route("", "10.88.0.1", "eth9", 0),
                "device \"eth9\" is none of",
            ),
            (route("10.1.0.0/16", "", "", 0), "needs a device"),
            (
                route("10.1.0.0/16", "fd00::1", "eth0", 0),
                "mixes IPv4 and IPv6",
            ),
            (route("", "10.88.0.1", "eth0", 300), "scope 300"),
            (route("", "", "eth0", 0), "the family is needed"),
        ];
        for (route, expected) in cases {
            let e = invalid(&request(nic(), vec![route]));
            assert!(e.contains(expected), "{e:?} lacks {expected:?}");
        }
        let mut wrong_family = route("10.1.0.0/16", "", "eth0", 0);
        wrong_family.family = 10;
        assert!(invalid(&request(nic(), vec![wrong_family])).contains("mixes"));
        let mut unknown_family = route("10.1.0.0/16", "", "eth0", 0);
        unknown_family.family = 7;
        assert!(invalid(&request(nic(), vec![unknown_family])).contains("family 7"));
        // A default route on-link, with its family given, is fine.
        let mut on_link_default = route("", "", "eth0", 253);
        on_link_default.family = 2;
        assert!(plan(&request(nic(), vec![on_link_default])).is_ok());
        // So is a route through lo.
        assert!(plan(&request(nic(), vec![route("127.0.0.0/8", "", "lo", 254)])).is_ok());
    }

    #[test]
    fn names_the_malformed_neighbour() {
        let mut request = request(
            vec![interface("0a:58:0a:58:00:05", "eth0", &[("10.88.0.5", 16)])],
            vec![],
        );
        request.neighbors.push(agent::Neighbor {
            ip: "10.88.0.1".into(),
            mac: "zz:58:0a:58:00:01".into(),
            device: "eth0".into(),
            ..Default::default()
        });
        let e = invalid(&request);
        assert!(
            e.contains("10.88.0.1 on eth0") && e.contains("zz:58"),
            "{e}"
        );
        request.neighbors[0].mac = "0a:58:0a:58:00:01".into();
        assert_eq!(plan(&request).unwrap().neighbors[0].mac[5], 1);
        request.neighbors[0].device = "eth1".into();
        assert!(invalid(&request).contains("\"eth1\""));
    }

    #[test]
    fn finds_nics_by_mac_or_names_those_it_sees() {
        let link = |index, name: &str, mac: &str| Link {
            index,
            name: name.into(),
            mac: parse_mac(mac).unwrap().to_vec(),
            mtu: 1500,
            pci_address: None,
        };
        let links = [
            link(1, "lo", "00:00:00:00:00:00"),
            link(2, "eth0", "0a:58:0a:58:00:06"),
            link(3, "eth1", "0a:58:0a:58:00:05"),
        ];
        let plan = plan(&request(
            vec![
                interface("0a:58:0a:58:00:05", "eth0", &[]),
                interface("0a:58:0a:58:00:06", "eth1", &[]),
            ],
            vec![],
        ))
        .unwrap();
        let found = match_nics(&plan.interfaces, &links).unwrap();
        assert_eq!(found.iter().map(|l| l.index).collect::<Vec<_>>(), [3, 2]);

        let e = match_nics(&plan.interfaces, &links[..2]).unwrap_err();
        assert_eq!(
            e,
            "no NIC with MAC address 0a:58:0a:58:00:05 (the guest has eth0 (0a:58:0a:58:00:06))"
        );
        let e = match_nics(&plan.interfaces, &links[..1]).unwrap_err();
        assert!(e.ends_with("(the guest has no Ethernet NIC)"), "{e}");
    }

    #[test]
    fn finds_a_passed_function_by_pci_address_whatever_its_mac() {
        let vf = Link {
            index: 4,
            name: "eth1".into(),
            mac: parse_mac("02:11:22:33:44:55").unwrap().to_vec(),
            mtu: 1500,
            pci_address: Some("0000:00:01.0".into()),
        };
        let tap_nic = Link {
            index: 3,
            name: "eth0".into(),
            // The VF's own MAC, on the wrong NIC: not how a VF is found.
            mac: parse_mac("0a:58:0a:59:00:05").unwrap().to_vec(),
            mtu: 1500,
            pci_address: None,
        };
        let mut passed = interface("0a:58:0a:59:00:05", "net1", &[]);
        passed.pci_address = "0000:00:01.0".into();
        let plan = plan(&request(vec![passed.clone()], vec![])).unwrap();
        let links = [tap_nic.clone(), vf];
        let found = match_nics(&plan.interfaces, &links).unwrap();
        assert_eq!(found[0].index, 4);
        let e = match_nics(&plan.interfaces, &[tap_nic]).unwrap_err();
        assert!(
            e.starts_with("no NIC with PCI address 0000:00:01.0 (the guest has eth0"),
            "{e}"
        );

        let mut twice = passed.clone();
        twice.mac = "0a:58:0a:59:00:06".into();
        twice.name = "net2".into();
        assert!(invalid(&request(vec![passed.clone(), twice], vec![]))
            .contains("PCI address 0000:00:01.0 is given twice"));
        passed.pci_address = "00:01.0".into();
        assert!(invalid(&request(vec![passed], vec![]))
            .contains("\"00:01.0\" is not of the form 0000:00:01.0"));
    }

    #[test]
    fn reads_a_nics_pci_address_from_its_device_link() {
        let dir = tempfile::tempdir().unwrap();
        for (name, device) in [
            ("eth0", "../../devices/platform/virtio-mmio.1/virtio1"),
            ("eth1", "../../devices/pci0000:00/0000:00:01.0"),
        ] {
            fs::create_dir(dir.path().join(name)).unwrap();
            std::os::unix::fs::symlink(device, dir.path().join(name).join("device")).unwrap();
        }
        fs::create_dir(dir.path().join("lo")).unwrap();
        assert_eq!(nic_pci_address(dir.path(), "eth0"), None);
        assert_eq!(
            nic_pci_address(dir.path(), "eth1").as_deref(),
            Some("0000:00:01.0")
        );
        assert_eq!(nic_pci_address(dir.path(), "lo"), None);
    }

    #[test]
    fn reads_the_counters_of_nics_only() {
        let dir = tempfile::tempdir().unwrap();
        for (name, base) in [("lo", 100), ("sit0", 200), ("eth1", 20), ("eth0", 10)] {
            let statistics = dir.path().join(name).join("statistics");
            fs::create_dir_all(&statistics).unwrap();
            if name.starts_with("eth") {
                fs::create_dir(dir.path().join(name).join("device")).unwrap();
            }
            for (i, file) in [
                "rx_bytes",
                "rx_packets",
                "rx_errors",
                "rx_dropped",
                "tx_bytes",
                "tx_packets",
                "tx_errors",
                "tx_dropped",
            ]
            .iter()
            .enumerate()
            {
                fs::write(statistics.join(file), format!("{}\n", base + i)).unwrap();
            }
        }
        // Gone while listed: left out.
        fs::create_dir_all(dir.path().join("eth2/device")).unwrap();
        let stats = interface_stats(dir.path()).unwrap();
        let names: Vec<_> = stats.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["eth0", "eth1"]);
        let eth0 = &stats[0];
        assert_eq!(
            [
                eth0.rx_bytes,
                eth0.rx_packets,
                eth0.rx_errors,
                eth0.rx_dropped,
                eth0.tx_bytes,
                eth0.tx_packets,
                eth0.tx_errors,
                eth0.tx_dropped
            ],
            [10, 11, 12, 13, 14, 15, 16, 17]
        );

        fs::write(dir.path().join("eth1/statistics/tx_dropped"), "many\n").unwrap();
        let e = interface_stats(dir.path()).unwrap_err();
        assert!(e.to_string().contains("tx_dropped: \"many\""), "{e}");
    }

    /// Runs `test` on a thread of its own network namespace (the
    /// namespace is per thread), with a veth pair v0 (MAC
    /// 0a:58:0a:58:00:05) and v1 (0a:58:0a:58:00:06) made by ip(8).
    fn in_network_namespace(test: impl FnOnce() + Send + 'static) {
        thread::spawn(|| {
            if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                println!("SKIPPED: a network namespace of its own needs root: unshare: {e}");
                return;
            }
            ip(&[
                "link",
                "add",
                "v0",
                "address",
                "0a:58:0a:58:00:05",
                "type",
                "veth",
                "peer",
                "name",
                "v1",
                "address",
                "0a:58:0a:58:00:06",
            ]);
            test()
        })
        .join()
        .unwrap();
    }

    /// ip(8) in the calling thread's network namespace.
    fn ip(args: &[&str]) -> String {
        let output = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "ip {args:?}: {output:?}");
        String::from_utf8(output.stdout).unwrap()
    }

    #[test]
    fn configures_nics_routes_and_neighbours() {
        in_network_namespace(|| {
            let mut request = request(
                vec![
                    // Swapped names: v1 becomes eth0, v0 eth1.
                    interface(
                        "0a:58:0a:58:00:06",
                        "eth0",
                        &[("10.88.0.5", 16), ("fd00::5", 64)],
                    ),
                    interface("0A:58:0A:58:00:05", "eth1", &[("192.168.7.2", 24)]),
                ],
                vec![
                    route("10.99.0.0/16", "", "eth0", 253),
                    route("", "10.88.0.1", "eth0", 0),
                    route("10.100.0.0/16", "10.99.0.1", "eth0", 0),
                    route("fd01::/64", "fd00::1", "eth0", 0),
                ],
            );
            request.interfaces[0].mtu = 1400;
            request.neighbors.push(agent::Neighbor {
                ip: "10.88.0.1".into(),
                mac: "0a:58:0a:58:00:01".into(),
                device: "eth0".into(),
                ..Default::default()
            });
            let plan = plan(&request).unwrap();
            // Twice: the second finds it all done.
            for _ in 0..2 {
                configure(&plan, Duration::from_millis(100)).unwrap();
            }
            let links = ip(&["-o", "link"]);
            assert!(
                links.contains("eth0@eth1: <BROADCAST,MULTICAST,UP"),
                "{links}"
            );
            assert!(links.contains("mtu 1400"), "{links}");
            assert!(links.contains("lo: <LOOPBACK,UP"), "{links}");
            let eth0 = ip(&["-o", "link", "show", "eth0"]);
            assert!(eth0.contains("0a:58:0a:58:00:06"), "{eth0}");
            let addresses = ip(&["-o", "addr"]);
            for expected in [
                "eth0    inet 10.88.0.5/16 brd 10.88.255.255",
                "eth0    inet6 fd00::5/64",
                "eth1    inet 192.168.7.2/24 brd 192.168.7.255",
                "lo    inet 127.0.0.1/8",
            ] {
                assert!(
                    addresses.contains(expected),
                    "{expected:?} not in {addresses}"
                );
            }
            let routes = ip(&["route"]);
            for expected in [
                "default via 10.88.0.1 dev eth0",
                "10.99.0.0/16 dev eth0 scope link",
                "10.100.0.0/16 via 10.99.0.1 dev eth0",
            ] {
                assert!(routes.contains(expected), "{expected:?} not in {routes}");
            }
            let routes6 = ip(&["-6", "route"]);
            assert!(
                routes6.contains("fd01::/64 via fd00::1 dev eth0"),
                "{routes6}"
            );
            let neighbours = ip(&["neigh"]);
            assert!(
                neighbours.contains("10.88.0.1 dev eth0 lladdr 0a:58:0a:58:00:01 PERMANENT"),
                "{neighbours}"
            );
        });
    }

    #[test]
    fn names_the_missing_nic_and_the_failing_route() {
        in_network_namespace(|| {
            let missing = plan(&request(
                vec![interface("0a:58:0a:58:00:07", "eth0", &[])],
                vec![],
            ))
            .unwrap();
            let start = Instant::now();
            let e = configure(&missing, Duration::from_millis(200)).unwrap_err();
            assert!(start.elapsed() >= Duration::from_millis(200));
            assert_eq!(e.code(), ttrpc::Code::NOT_FOUND);
            let message = e.to_string();
            assert!(
                message.starts_with(
                    "no NIC with MAC address 0a:58:0a:58:00:07 (the guest has v1 \
                     (0a:58:0a:58:00:06), v0 (0a:58:0a:58:00:05)) after"
                ),
                "{message}"
            );
            // Still, lo is up.
            assert!(ip(&["-o", "link"]).contains("lo: <LOOPBACK,UP"));

            // A gateway that no route reaches.
            let unreachable = plan(&request(
                vec![interface("0a:58:0a:58:00:05", "eth0", &[("10.88.0.5", 16)])],
                vec![route("", "10.77.0.1", "eth0", 0)],
            ))
            .unwrap();
            let e = configure(&unreachable, Duration::ZERO).unwrap_err();
            assert_eq!(e.code(), ttrpc::Code::INTERNAL);
            assert_eq!(
                e.to_string(),
                "route default via 10.77.0.1 dev eth0: ENETUNREACH: Network is unreachable"
            );
        });
    }
}
