//! The host side of pod networking: the interfaces CNI made in a pod's
//! network namespace, each joined to a tap that the VM's virtio-net device
//! uses, and the configuration the guest gives its own interfaces.
//!
//! The join is tc's mirred action (docs/networking.md): an ingress qdisc
//! on the CNI interface and on the tap, and on each a match-all u32 filter
//! that redirects every frame to the other's egress. Nothing is added to
//! the host's own namespace, the guest NIC keeps the CNI interface's MAC,
//! and frames keep their offload metadata (the tap has a `virtio_net_hdr`).
//! The `bridge` mode puts the interface and the tap in a bridge of their
//! own instead; the `macvtap` mode makes a passthru macvtap on the
//! interface and hands its queue to the VM in the tap's place.
//!
//! An SR-IOV VF is passed to the VM whole instead, where the caller asks
//! for it ([`VfPolicy`]): its PCI function is bound to vfio-pci (module
//! `vfio`) and the guest's driver for it makes the NIC.
//!
//! All netlink work runs on a short-lived thread that enters the pod's
//! namespace with `setns` (which changes only that thread): the netlink
//! socket and the tap fd opened there belong to that namespace.

pub mod loopback;
mod macvtap;
mod netns;
mod tap;
mod vfio;

use std::{
    collections::BTreeMap,
    fmt,
    fs::File,
    io,
    net::IpAddr,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures_util::stream::TryStreamExt;
use rtnetlink::{
    packet_core::{NetlinkMessage, NLM_F_ACK, NLM_F_REQUEST},
    packet_route::{
        address::{AddressAttribute, AddressScope},
        link::{LinkAttribute, LinkFlags, LinkMessage, MacVtapMode},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteProtocol, RouteType},
        tc::{TcHandle, TcMessage},
        AddressFamily, RouteNetlinkMessage,
    },
    Handle, LinkBridge, LinkMacVtap, LinkUnspec, RouteMessageBuilder,
};
pub use runv_config::NetworkInterconnect as Interconnect;
pub use vfio::{HostNetdev, PassedFunction, Sysfs, VfioError, VFIO_PCI};

/// Every tap runv makes is named `tap<N>_runv`; an interface whose name
/// ends so is never taken for one of CNI's.
pub const TAP_SUFFIX: &str = "_runv";
/// The preference of runv's tc filters.
const FILTER_PRIORITY: u16 = 0xc000;
/// The ingress qdisc's handle, `ffff:`, which is its filters' parent.
const INGRESS_PARENT: u32 = 0xffff_0000;
/// `RT_TABLE_MAIN`.
const MAIN_TABLE: u32 = 254;
/// How long a VF given back may take to be a netdev again: its host
/// driver's probe (mlx5 takes about a second).
const NETDEV_RETURN_TIMEOUT: Duration = Duration::from_secs(10);

/// An error, naming the namespace, the interface where there is one, the
/// operation, the system's reason (with its errno) and the fix where there
/// is one.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("pod network namespace {netns}: cannot {operation}: {detail}")]
    Namespace {
        netns: PathBuf,
        operation: String,
        detail: String,
    },
    #[error("pod network namespace {netns}, interface {interface}: cannot {operation}: {detail}")]
    Interface {
        netns: PathBuf,
        interface: String,
        operation: String,
        detail: String,
    },
    #[error("pod network namespace {netns}, interface {interface} (an SR-IOV VF): {source}")]
    Passthrough {
        netns: PathBuf,
        interface: String,
        source: VfioError,
    },
}

/// What becomes of an SR-IOV VF found in the pod's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VfPolicy {
    /// Its PCI function is bound to vfio-pci and passed to the VM.
    PassThrough,
    /// It is joined to a tap like any interface; `reason` (why it is not
    /// passed through) goes to the log.
    Join { reason: String },
}

/// An IP address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct IpAddress {
    pub address: IpAddr,
    pub prefix_len: u8,
}

impl fmt::Display for IpAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpFamily {
    V4,
    V6,
}

/// One guest interface, as the guest agent's `ConfigureNetworkRequest`
/// takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    /// The CNI interface's MAC, which the guest NIC gets (so that peers'
    /// ARP/NDP entries stay valid); the guest finds its NIC by it.
    pub mac: [u8; 6],
    /// The CNI interface's name, which the guest gives its NIC.
    pub name: String,
    pub mtu: u32,
    /// IPv4 and global IPv6 addresses; IPv6 link-local ones are left to
    /// the guest, which derives the same from the same MAC.
    pub addresses: Vec<IpAddress>,
    /// For a VF passed through whole: its index in
    /// [`PodNetwork::passthrough_functions`]. The guest's driver may not
    /// know the MAC above (a VF the PF gave none makes one up), so the
    /// guest finds this NIC by its PCI address instead, and sets the MAC.
    pub passed_function: Option<usize>,
}

/// A route of the pod's namespace through one of its interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// None: the default route.
    pub destination: Option<IpAddress>,
    pub gateway: Option<IpAddr>,
    /// The interface's name.
    pub device: String,
    /// The preferred source address.
    pub source: Option<IpAddr>,
    /// `RT_SCOPE_*`: 0 universe, 253 link, 254 host.
    pub scope: u8,
    pub family: IpFamily,
}

impl RouteConfig {
    /// The destination as CIDR text, empty for the default route.
    pub fn destination_cidr(&self) -> String {
        self.destination.map(|d| d.to_string()).unwrap_or_default()
    }
}

/// A permanent or reachable ARP/NDP entry of the pod's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighborConfig {
    pub ip: IpAddr,
    pub mac: [u8; 6],
    /// The interface's name.
    pub device: String,
}

/// What the guest needs to configure its network, in the shape of the
/// guest agent's `ConfigureNetworkRequest`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestNetworkConfig {
    pub interfaces: Vec<InterfaceConfig>,
    pub routes: Vec<RouteConfig>,
    pub neighbors: Vec<NeighborConfig>,
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A CNI interface joined to its tap.
#[derive(Debug)]
pub struct PodInterface {
    /// What the guest gives the NIC backed by `tap`.
    pub config: InterfaceConfig,
    /// The tap (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), for the VM's
    /// virtio-net device. The tap lives while any copy of the fd does. In
    /// macvtap mode, a queue of the macvtap, with the same flags: the
    /// macvtap itself lives until teardown.
    pub tap: Arc<OwnedFd>,
    /// The tap's name (`tap<N>_runv`), or the macvtap's (`mvtap<N>_runv`).
    pub tap_name: String,
    index: u32,
    tap_index: u32,
    joint: Joint,
}

/// How a CNI interface and its tap are joined, as teardown undoes it.
#[derive(Debug, Clone)]
enum Joint {
    /// tc mirred redirects. `own_qdisc`: runv added the CNI interface's
    /// ingress qdisc (else it was there already, and only runv's filter
    /// is removed).
    Mirred { own_qdisc: bool },
    /// A bridge holding both; the CNI interface got a new MAC (its own is
    /// the guest's), put back at teardown.
    Bridge {
        name: String,
        index: u32,
        mac_changed: bool,
    },
    /// A passthru macvtap on the CNI interface (the tap is the macvtap):
    /// deleting it gives the interface back as it was.
    Macvtap,
}

impl PodInterface {
    /// The MAC to give the guest NIC: the CNI interface's.
    pub fn mac(&self) -> [u8; 6] {
        self.config.mac
    }
}

/// A VF of the pod's namespace whose function the VM gets.
#[derive(Debug)]
struct PassedVf {
    /// What the guest gives the NIC its driver makes (found by MAC).
    config: InterfaceConfig,
    /// The interface's alias, which CNI's host-device plugin keeps the
    /// host name in: the driver's new netdev at give-back has none.
    alias: Option<String>,
    function: PassedFunction,
}

/// A pod's network, joined to taps and VFs passed through; undone by
/// [`PodNetwork::teardown`] or on drop.
#[derive(Debug)]
pub struct PodNetwork {
    netns: Option<PathBuf>,
    /// Kept open so that teardown works in the same namespace, even once
    /// its path is unmounted.
    ns: Option<File>,
    interfaces: Vec<PodInterface>,
    passed: Vec<PassedVf>,
    sysfs: Sysfs,
    routes: Vec<RouteConfig>,
    neighbors: Vec<NeighborConfig>,
    done: bool,
}

impl PodNetwork {
    /// No network: a host-network pod, or a namespace with only `lo`.
    pub fn empty() -> PodNetwork {
        PodNetwork {
            netns: None,
            ns: None,
            interfaces: Vec::new(),
            passed: Vec::new(),
            sysfs: Sysfs::default(),
            routes: Vec::new(),
            neighbors: Vec::new(),
            done: true,
        }
    }

    /// Joins every interface CNI made in the network namespace at
    /// `netns_path` to a new tap, with tc mirred. Blocks for a few
    /// milliseconds (a thread in the namespace does the work): call it
    /// from a blocking context. On error nothing is left behind.
    pub fn setup(netns_path: &Path) -> Result<PodNetwork, NetworkError> {
        Self::setup_with(netns_path, Interconnect::TcMirred)
    }

    /// [`PodNetwork::setup`] with the interconnect `mode`: tc mirred, a
    /// bridge per interface, or a macvtap per interface. VFs are joined too.
    pub fn setup_with(netns_path: &Path, mode: Interconnect) -> Result<PodNetwork, NetworkError> {
        let policy = VfPolicy::Join {
            reason: "the caller does not pass VFs through".into(),
        };
        Self::setup_with_vfs(netns_path, mode, &policy, Sysfs::default())
    }

    /// [`PodNetwork::setup_with`], with the VFs (an interface whose device
    /// is a PCI function with a `physfn`, in `sysfs`) passed through or
    /// joined as `policy` says. A VF passed through leaves the namespace:
    /// its netdev goes with its host driver.
    pub fn setup_with_vfs(
        netns_path: &Path,
        mode: Interconnect,
        policy: &VfPolicy,
        sysfs: Sysfs,
    ) -> Result<PodNetwork, NetworkError> {
        let netns = netns_path.to_owned();
        let ns = File::open(netns_path).map_err(|e| NetworkError::Namespace {
            netns: netns.clone(),
            operation: "open the namespace".into(),
            detail: io_detail(&e),
        })?;
        let path = netns.clone();
        let (pass, join_sysfs) = (policy.clone(), sysfs.clone());
        let (interfaces, vfs, routes, neighbors) = netns::run(&netns, &ns, move |handle| {
            setup_in_netns(handle, path, mode, pass, join_sysfs)
        })?;
        let mut network = PodNetwork {
            netns: Some(netns.clone()),
            ns: Some(ns),
            interfaces,
            passed: Vec::new(),
            sysfs,
            routes,
            neighbors,
            done: false,
        };
        // On error, dropping `network` gives back what is bound already
        // and removes the taps.
        for vf in vfs {
            let passthrough_error = |source| NetworkError::Passthrough {
                netns: netns.clone(),
                interface: vf.config.name.clone(),
                source,
            };
            let sysfs = &network.sysfs;
            let function = sysfs.check_passable(&vf.bdf).map_err(passthrough_error)?;
            sysfs
                .unbind_host_driver(&function)
                .map_err(passthrough_error)?;
            if let Err(e) = sysfs.bind_vfio(&function) {
                // Back on its host driver: its netdev is in the host's namespace.
                let ns = network.ns.as_ref().expect("set above");
                if let Err(undo) = return_netdev(
                    sysfs,
                    &netns,
                    ns,
                    &vf.bdf,
                    &vf.config.name,
                    vf.alias.clone(),
                ) {
                    tracing::warn!(error = %undo, "cannot put a VF back after a failed bind");
                }
                return Err(passthrough_error(e));
            }
            tracing::info!(netns = %netns.display(), interface = %vf.config.name,
                function = %function, "passing an SR-IOV VF through to the VM");
            network.passed.push(PassedVf {
                config: vf.config,
                alias: vf.alias,
                function,
            });
        }
        if network.is_empty() {
            network.done = true;
            network.ns = None;
        }
        Ok(network)
    }

    /// The joined interfaces, in the guest's order (its first NIC first).
    pub fn interfaces(&self) -> &[PodInterface] {
        &self.interfaces
    }

    pub fn is_empty(&self) -> bool {
        self.interfaces.is_empty() && self.passed.is_empty()
    }

    /// The sysfs paths (`/sys/bus/pci/devices/<BDF>`) of the functions
    /// bound to vfio-pci for the VM.
    pub fn passthrough_functions(&self) -> Vec<PathBuf> {
        self.passed
            .iter()
            .map(|vf| vf.function.sysfs_path.clone())
            .collect()
    }

    /// Leaves the passed functions bound to vfio-pci at teardown: a VM
    /// that may still run holds them, and unbinding would wait for it.
    pub fn keep_functions_bound(&mut self, why: &str) {
        for vf in self.passed.drain(..) {
            tracing::error!(function = %vf.function, interface = %vf.config.name, why,
                "leaving the VF bound to vfio-pci; give it back by hand: echo {bdf} > \
                 /sys/bus/pci/drivers/vfio-pci/unbind; echo > \
                 /sys/bus/pci/devices/{bdf}/driver_override; echo {bdf} > \
                 /sys/bus/pci/drivers_probe", bdf = vf.function.bdf);
        }
    }

    /// The namespace, None for [`PodNetwork::empty`].
    pub fn netns(&self) -> Option<&Path> {
        self.netns.as_deref()
    }

    /// The configuration the guest agent applies: the NICs on taps first,
    /// then the VFs' (the guest finds each by its MAC).
    pub fn guest_config(&self) -> GuestNetworkConfig {
        GuestNetworkConfig {
            interfaces: self
                .interfaces
                .iter()
                .map(|i| i.config.clone())
                .chain(
                    self.passed
                        .iter()
                        .enumerate()
                        .map(|(index, vf)| InterfaceConfig {
                            passed_function: Some(index),
                            ..vf.config.clone()
                        }),
                )
                .collect(),
            routes: self.routes.clone(),
            neighbors: self.neighbors.clone(),
        }
    }

    /// Removes the taps (or macvtaps), and the qdiscs and filters runv
    /// added to the CNI interfaces. An interface or namespace that is already gone is fine.
    /// Copies of a tap fd held elsewhere (a hypervisor that still runs) do
    /// not keep the tap: it is deleted all the same. Gives each passed
    /// function back to its host driver and its netdev back to the pod's
    /// namespace under its name, for CNI's DEL: the VM must be gone.
    pub fn teardown(mut self) -> Result<(), NetworkError> {
        self.release()
    }

    fn release(&mut self) -> Result<(), NetworkError> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let (Some(netns), Some(ns)) = (self.netns.clone(), self.ns.take()) else {
            return Ok(());
        };
        let joined: Vec<Joined> = self.interfaces.iter().map(Joined::of).collect();
        // runv's copies of the fds first: a tap whose last fd closes goes.
        self.interfaces.clear();
        let path = netns.clone();
        let mut first_error = netns::run(&netns, &ns, move |handle| async move {
            let mut first_error = None;
            for joined in &joined {
                if let Err(e) = unjoin(&handle, &path, joined).await {
                    tracing::warn!(error = %e, "pod network teardown");
                    first_error.get_or_insert(e);
                }
            }
            first_error.map_or(Ok(()), Err)
        })
        .err();
        for vf in std::mem::take(&mut self.passed) {
            if let Err(e) = give_back(&self.sysfs, &netns, &ns, vf) {
                tracing::warn!(error = %e, "pod network teardown");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::warn!(error = %e, "cannot tear the pod network down");
        }
    }
}

/// What teardown needs of a joined interface.
struct Joined {
    name: String,
    index: u32,
    tap_name: String,
    tap_index: u32,
    joint: Joint,
    /// The CNI interface's own MAC.
    mac: [u8; 6],
}

impl Joined {
    fn of(interface: &PodInterface) -> Joined {
        Joined {
            name: interface.config.name.clone(),
            index: interface.index,
            tap_name: interface.tap_name.clone(),
            tap_index: interface.tap_index,
            joint: interface.joint.clone(),
            mac: interface.config.mac,
        }
    }
}

/// A CNI interface as found in the namespace.
struct Found {
    index: u32,
    name: String,
    mac: [u8; 6],
    mtu: u32,
    up: bool,
    addresses: Vec<IpAddress>,
    /// The PCI function (BDF) whose netdev it is, if any.
    pci: Option<String>,
    alias: Option<String>,
}

impl Found {
    fn config(&self) -> InterfaceConfig {
        InterfaceConfig {
            mac: self.mac,
            name: self.name.clone(),
            mtu: self.mtu,
            addresses: self.addresses.clone(),
            passed_function: None,
        }
    }
}

/// A VF to pass through, as found in the namespace.
struct FoundVf {
    bdf: String,
    config: InterfaceConfig,
    alias: Option<String>,
}

type Inspected = (
    Vec<PodInterface>,
    Vec<FoundVf>,
    Vec<RouteConfig>,
    Vec<NeighborConfig>,
);

async fn setup_in_netns(
    handle: Handle,
    netns: PathBuf,
    mode: Interconnect,
    policy: VfPolicy,
    sysfs: Sysfs,
) -> Result<Inspected, NetworkError> {
    let ns_error = |operation: &str, e: rtnetlink::Error| NetworkError::Namespace {
        netns: netns.clone(),
        operation: operation.into(),
        detail: netlink_detail(&e),
    };
    let mut found = BTreeMap::new();
    let mut links = handle.link().get().execute();
    while let Some(link) = links
        .try_next()
        .await
        .map_err(|e| ns_error("list the interfaces", e))?
    {
        if link.header.flags.contains(LinkFlags::Loopback) {
            continue;
        }
        let mut name = None;
        let mut mac = None;
        let mut mtu = 1500;
        let (mut parent, mut parent_bus, mut alias) = (None, None, None);
        for attribute in &link.attributes {
            match attribute {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
                LinkAttribute::Mtu(m) => mtu = *m,
                // The device behind the netdev (Linux 5.16+): sysfs's
                // /sys/class/net shows the shim's namespace, not the pod's.
                LinkAttribute::ParentDevName(n) => parent = Some(n.clone()),
                LinkAttribute::ParentDevBusName(b) => parent_bus = Some(b.clone()),
                LinkAttribute::IfAlias(a) => alias = Some(a.clone()),
                _ => {}
            }
        }
        let Some(name) = name else { continue };
        if name.ends_with(TAP_SUFFIX) {
            continue;
        }
        let Some(mac) = mac else {
            tracing::debug!(netns = %netns.display(), interface = %name,
                "skipping an interface without an Ethernet address");
            continue;
        };
        let index = link.header.index;
        let up = link.header.flags.contains(LinkFlags::Up);
        found.insert(
            index,
            Found {
                index,
                name,
                mac,
                mtu,
                up,
                addresses: Vec::new(),
                pci: parent.filter(|_| parent_bus.as_deref() == Some("pci")),
                alias,
            },
        );
    }
    let mut addresses = handle.address().get().execute();
    while let Some(message) = addresses
        .try_next()
        .await
        .map_err(|e| ns_error("list the addresses", e))?
    {
        let Some(interface) = found.get_mut(&message.header.index) else {
            continue;
        };
        // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the
        // peer's on a point-to-point link); IPv6 has only IFA_ADDRESS.
        let local = message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let address = local.or_else(|| {
            message.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        });
        let Some(address) = address else { continue };
        if message.header.family == AddressFamily::Inet6
            && message.header.scope == AddressScope::Link
        {
            continue;
        }
        interface.addresses.push(IpAddress {
            address,
            prefix_len: message.header.prefix_len,
        });
    }
    // Interfaces that are up or have an address; lo is already out.
    found.retain(|_, f| f.up || !f.addresses.is_empty());
    if found.is_empty() {
        return Ok((Vec::new(), Vec::new(), Vec::new(), Vec::new()));
    }
    let routes = list_routes(&handle, &found)
        .await
        .map_err(|e| ns_error("list the routes", e))?;
    let neighbors = list_neighbors(&handle, &found)
        .await
        .map_err(|e| ns_error("list the neighbours", e))?;
    let mut vfs = Vec::new();
    let mut to_join = Vec::new();
    for found in found.into_values() {
        match found.pci.as_deref().filter(|bdf| sysfs.is_vf(bdf)) {
            Some(bdf) if policy == VfPolicy::PassThrough => vfs.push(FoundVf {
                bdf: bdf.to_owned(),
                config: found.config(),
                alias: found.alias,
            }),
            Some(bdf) => {
                if let VfPolicy::Join { reason } = &policy {
                    tracing::info!(netns = %netns.display(), interface = %found.name,
                        function = bdf, reason = %reason,
                        "joining an SR-IOV VF with a tap instead of passing it through");
                }
                to_join.push(found);
            }
            None => to_join.push(found),
        }
    }
    let mut interfaces = Vec::new();
    for (n, found) in to_join.into_iter().enumerate() {
        match join(&handle, &netns, mode, n, found).await {
            Ok(interface) => interfaces.push(interface),
            Err(e) => {
                for done in &interfaces {
                    if let Err(undo) = unjoin(&handle, &netns, &Joined::of(done)).await {
                        tracing::warn!(error = %undo, "cannot undo a partial pod network setup");
                    }
                }
                return Err(e);
            }
        }
    }
    Ok((interfaces, vfs, routes, neighbors))
}

/// The main table's unicast routes through the interfaces, less those the
/// kernel made for an address (the guest's kernel makes them too when the
/// address is added).
async fn list_routes(
    handle: &Handle,
    found: &BTreeMap<u32, Found>,
) -> Result<Vec<RouteConfig>, rtnetlink::Error> {
    let mut routes = Vec::new();
    let requests = [
        (
            IpFamily::V4,
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        ),
        (
            IpFamily::V6,
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ),
    ];
    for (family, request) in requests {
        let mut stream = handle.route().get(request).execute();
        while let Some(route) = stream.try_next().await? {
            let table = route
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(route.header.table));
            if table != MAIN_TABLE
                || route.header.kind != RouteType::Unicast
                || route.header.protocol == RouteProtocol::Kernel
            {
                continue;
            }
            let mut oif = None;
            let mut destination = None;
            let mut gateway = None;
            let mut source = None;
            for attribute in &route.attributes {
                match attribute {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Destination(a) => destination = route_ip(a),
                    RouteAttribute::Gateway(a) => gateway = route_ip(a),
                    RouteAttribute::PrefSource(a) => source = route_ip(a),
                    RouteAttribute::MultiPath(_) => {
                        tracing::warn!(?route, "skipping a multipath route");
                    }
                    _ => {}
                }
            }
            let Some(device) = oif.and_then(|i| found.get(&i)) else {
                continue;
            };
            let prefix_len = route.header.destination_prefix_length;
            routes.push(RouteConfig {
                destination: destination
                    .filter(|_| prefix_len > 0)
                    .map(|address| IpAddress {
                        address,
                        prefix_len,
                    }),
                gateway,
                device: device.name.clone(),
                source,
                scope: u8::from(route.header.scope),
                family,
            });
        }
    }
    Ok(routes)
}

fn route_ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

/// Permanent and reachable ARP/NDP entries on the interfaces.
async fn list_neighbors(
    handle: &Handle,
    found: &BTreeMap<u32, Found>,
) -> Result<Vec<NeighborConfig>, rtnetlink::Error> {
    let mut neighbors = Vec::new();
    let mut stream = handle.neighbours().get().execute();
    while let Some(entry) = stream.try_next().await? {
        if !matches!(
            entry.header.state,
            NeighbourState::Permanent | NeighbourState::Reachable
        ) {
            continue;
        }
        let Some(device) = found.get(&entry.header.ifindex) else {
            continue;
        };
        let mut ip = None;
        let mut mac = None;
        for attribute in &entry.attributes {
            match attribute {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                    ip = Some(IpAddr::V4(*a))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                    ip = Some(IpAddr::V6(*a))
                }
                NeighbourAttribute::LinkLayerAddress(a) => {
                    mac = <[u8; 6]>::try_from(a.as_slice()).ok()
                }
                _ => {}
            }
        }
        if let (Some(ip), Some(mac)) = (ip, mac) {
            neighbors.push(NeighborConfig {
                ip,
                mac,
                device: device.name.clone(),
            });
        }
    }
    Ok(neighbors)
}

/// Makes tap `tap<n>_runv` and joins it to `found` as `mode` says; on
/// error undoes what it did.
async fn join(
    handle: &Handle,
    netns: &Path,
    mode: Interconnect,
    n: usize,
    found: Found,
) -> Result<PodInterface, NetworkError> {
    let error = |interface: &str, operation: String, detail: String| NetworkError::Interface {
        netns: netns.to_owned(),
        interface: interface.to_owned(),
        operation,
        detail,
    };
    if mode == Interconnect::Macvtap {
        return join_macvtap(handle, netns, n, found, &error).await;
    }
    let tap_name = format!("tap{n}{TAP_SUFFIX}");
    let tap = tap::create(&tap_name).map_err(|e| match e {
        tap::TapError::Open(e) => error(
            &tap_name,
            format!("open {}", tap::TUN_DEVICE),
            match e.kind() {
                io::ErrorKind::NotFound => format!(
                    "{}; load the tun module (`modprobe tun`) on the host",
                    io_detail(&e)
                ),
                _ => io_detail(&e),
            },
        ),
        tap::TapError::SetIff(e) => error(
            &tap_name,
            "create the tap (TUNSETIFF)".into(),
            match e.raw_os_error() {
                Some(libc::EBUSY) => format!(
                    "{}; a tap of that name is still in use (another runv VM of this pod?)",
                    io_detail(&e)
                ),
                _ => io_detail(&e),
            },
        ),
    })?;
    let mut interface = PodInterface {
        config: found.config(),
        tap: Arc::new(tap),
        tap_name: tap_name.clone(),
        index: found.index,
        tap_index: 0,
        joint: Joint::Mirred { own_qdisc: false },
    };
    let result = async {
        let tap_link = find_new_link(handle, &tap_name, "tap", &error).await?;
        interface.tap_index = tap_link.header.index;
        set_link(
            handle,
            LinkUnspec::new_with_index(interface.tap_index)
                .mtu(found.mtu)
                .up()
                .build(),
            &tap_name,
            || format!("set MTU {} and bring the tap up", found.mtu),
            &error,
        )
        .await?;
        if mode == Interconnect::Bridge {
            return bridge(handle, n, &found, &mut interface, &error).await;
        }
        match add_ingress_qdisc(handle, found.index).await {
            Ok(()) => interface.joint = Joint::Mirred { own_qdisc: true },
            Err(e) if netlink_errno(&e) == Some(libc::EEXIST) => {
                tracing::info!(interface = %found.name,
                    "the interface has an ingress qdisc already; adding runv's filter to it");
            }
            Err(e) => {
                return Err(error(
                    &found.name,
                    "add an ingress qdisc".into(),
                    netlink_detail(&e),
                ))
            }
        }
        add_ingress_qdisc(handle, interface.tap_index)
            .await
            .map_err(|e| error(&tap_name, "add an ingress qdisc".into(), netlink_detail(&e)))?;
        add_redirect(handle, found.index, interface.tap_index)
            .await
            .map_err(|e| {
                error(
                    &found.name,
                    format!("add a tc filter redirecting to {tap_name}"),
                    netlink_detail(&e),
                )
            })?;
        add_redirect(handle, interface.tap_index, found.index)
            .await
            .map_err(|e| {
                error(
                    &tap_name,
                    format!("add a tc filter redirecting to {}", found.name),
                    netlink_detail(&e),
                )
            })?;
        Ok(())
    }
    .await;
    match result {
        Ok(()) => Ok(interface),
        Err(e) => {
            let joined = Joined::of(&interface);
            drop(interface);
            if let Err(undo) = unjoin(handle, netns, &joined).await {
                tracing::warn!(error = %undo, "cannot undo a partial join");
            }
            Err(e)
        }
    }
}

/// Joins `found` and its tap with bridge `br<n>_runv`. The CNI interface
/// gets a new random MAC: its own is the guest's now, and a bridge keeps
/// its ports' MACs for itself.
async fn bridge(
    handle: &Handle,
    n: usize,
    found: &Found,
    interface: &mut PodInterface,
    error: &impl Fn(&str, String, String) -> NetworkError,
) -> Result<(), NetworkError> {
    let name = format!("br{n}{TAP_SUFFIX}");
    handle
        .link()
        .add(LinkBridge::new(&name).mtu(found.mtu).build())
        .execute()
        .await
        .map_err(|e| error(&name, "create the bridge".into(), netlink_detail(&e)))?;
    let index = find_new_link(handle, &name, "bridge", error)
        .await?
        .header
        .index;
    interface.joint = Joint::Bridge {
        name: name.clone(),
        index,
        mac_changed: false,
    };
    let mac =
        random_mac().map_err(|e| error(&found.name, "make a MAC address".into(), io_detail(&e)))?;
    set_link(
        handle,
        LinkUnspec::new_with_index(found.index)
            .address(mac.to_vec())
            .build(),
        &found.name,
        || format!("change the MAC address to {}", format_mac(&mac)),
        error,
    )
    .await?;
    interface.joint = Joint::Bridge {
        name: name.clone(),
        index,
        mac_changed: true,
    };
    for (port, port_index) in [
        (&found.name, found.index),
        (&interface.tap_name, interface.tap_index),
    ] {
        set_link(
            handle,
            LinkUnspec::new_with_index(port_index)
                .controller(index)
                .build(),
            port,
            || format!("add it to bridge {name}"),
            error,
        )
        .await?;
    }
    set_link(
        handle,
        LinkUnspec::new_with_index(index).up().build(),
        &name,
        || "bring the bridge up".into(),
        error,
    )
    .await?;
    Ok(())
}

/// Makes macvtap `mvtap<n>_runv` on `found`, brings it up and opens a
/// queue of it for the VM; on error undoes what it did.
///
/// The mode is passthru, not bridge. The guest NIC must use the macvtap's
/// MAC, and peers must keep reaching the CNI interface's MAC:
/// - In bridge (or vepa, private) mode the macvtap needs a MAC of its own,
///   different from its lower device's, so Kata's macvtap model moves the
///   CNI interface's MAC to the macvtap, gives the interface a random one
///   and deletes the interface's addresses: broadcasts such as ARP
///   requests reach both the macvtap and the namespace's own stack, which
///   would otherwise answer for the pod's address with the interface's new
///   MAC. That changes what CNI made (its CHECK and DEL see other MACs and
///   no addresses) and has to be put back at teardown.
/// - In passthru mode the macvtap inherits the interface's MAC and every
///   unicast frame that arrives on the interface goes to the macvtap (the
///   interface is put in promiscuous mode), so the guest gets the CNI MAC
///   and all its traffic with nothing changed on the interface. Broadcasts
///   and multicasts reach the namespace's stack too, which may answer ARP
///   or NDP for the pod's address with the very same MAC: harmless. Passthru
///   allows one macvtap per lower device, which is all runv needs, and
///   deleting the macvtap gives the interface its promiscuity (and MAC)
///   back.
async fn join_macvtap(
    handle: &Handle,
    netns: &Path,
    n: usize,
    found: Found,
    error: &impl Fn(&str, String, String) -> NetworkError,
) -> Result<PodInterface, NetworkError> {
    let name = format!("mvtap{n}{TAP_SUFFIX}");
    handle
        .link()
        .add(
            LinkMacVtap::new(&name, found.index, MacVtapMode::Passthrough)
                .mtu(found.mtu)
                .build(),
        )
        .execute()
        .await
        .map_err(|e| {
            error(
                &found.name,
                format!("create passthru macvtap {name} on it"),
                macvtap_detail(&e),
            )
        })?;
    let link = find_new_link(handle, &name, "macvtap", error).await?;
    let index = link.header.index;
    let joined = Joined {
        name: found.name.clone(),
        index: found.index,
        tap_name: name.clone(),
        tap_index: index,
        joint: Joint::Macvtap,
        mac: found.mac,
    };
    let result = async {
        let mac = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(a) => <[u8; 6]>::try_from(a.as_slice()).ok(),
            _ => None,
        });
        if mac != Some(found.mac) {
            return Err(error(
                &name,
                "take over the MAC of its lower device".into(),
                format!(
                    "its MAC is {}, not {}'s {}",
                    mac.map_or_else(|| "missing".into(), |m| format_mac(&m)),
                    found.name,
                    format_mac(&found.mac)
                ),
            ));
        }
        set_link(
            handle,
            LinkUnspec::new_with_index(index).up().build(),
            &name,
            || "bring the macvtap up".into(),
            error,
        )
        .await?;
        macvtap::open(&name, index).map_err(|f| {
            let mut detail = io_detail(&f.error);
            if let Some(hint) = f.hint {
                detail.push_str("; ");
                detail.push_str(hint);
            }
            error(&name, f.operation, detail)
        })
    }
    .await;
    match result {
        Ok(fd) => Ok(PodInterface {
            config: found.config(),
            tap: Arc::new(fd),
            tap_name: name,
            index: found.index,
            tap_index: index,
            joint: Joint::Macvtap,
        }),
        Err(e) => {
            if let Err(undo) = unjoin(handle, netns, &joined).await {
                tracing::warn!(error = %undo, "cannot undo a partial join");
            }
            Err(e)
        }
    }
}

/// The link named `name` that a join has just made, a `kind` ("tap",
/// "bridge", "macvtap"); an error names the step "find the new <kind>".
async fn find_new_link(
    handle: &Handle,
    name: &str,
    kind: &str,
    error: &impl Fn(&str, String, String) -> NetworkError,
) -> Result<LinkMessage, NetworkError> {
    let operation = format!("find the new {kind}");
    handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
        .map_err(|e| error(name, operation.clone(), netlink_detail(&e)))?
        .ok_or_else(|| error(name, operation, "it is not there".into()))
}

/// Sets `message` on a link; an error is `error(interface, operation(), …)`.
async fn set_link(
    handle: &Handle,
    message: LinkMessage,
    interface: &str,
    operation: impl FnOnce() -> String,
    error: &impl Fn(&str, String, String) -> NetworkError,
) -> Result<(), NetworkError> {
    handle
        .link()
        .set(message)
        .execute()
        .await
        .map_err(|e| error(interface, operation(), netlink_detail(&e)))
}

/// A netlink error of macvtap creation in words, with its errno and fix.
fn macvtap_detail(e: &rtnetlink::Error) -> String {
    let errno = netlink_errno(e);
    let mut detail = match errno {
        Some(errno) => io_detail(&io::Error::from_raw_os_error(errno)),
        None => return e.to_string(),
    };
    match errno {
        Some(libc::EOPNOTSUPP | libc::ENOENT) => detail.push_str(
            "; the host kernel lacks macvtap: build it with CONFIG_MACVTAP or load it \
             (`modprobe macvtap`), or use network.interconnect = \"tc-mirred\"",
        ),
        Some(libc::EPERM) => detail.push_str("; runv needs CAP_NET_ADMIN"),
        Some(libc::EBUSY | libc::EINVAL) => detail.push_str(
            "; a passthru macvtap needs an Ethernet interface that has no macvlan or \
             macvtap on it yet",
        ),
        Some(libc::EEXIST) => {
            detail.push_str("; a link of that name is there already (another runv VM of this pod?)")
        }
        _ => {}
    }
    detail
}

/// A random locally administered unicast MAC.
fn random_mac() -> io::Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    std::io::Read::read_exact(&mut File::open("/dev/urandom")?, &mut mac)?;
    mac[0] = (mac[0] & 0xfe) | 0x02;
    Ok(mac)
}

async fn add_ingress_qdisc(handle: &Handle, index: u32) -> Result<(), rtnetlink::Error> {
    handle.qdisc().add(index as i32).ingress().execute().await
}

/// `tc filter add dev <from> parent ffff: prio 49152 protocol all u32
/// match u8 0 0 action mirred egress redirect dev <to>`.
async fn add_redirect(handle: &Handle, from: u32, to: u32) -> Result<(), rtnetlink::Error> {
    handle
        .traffic_filter(from as i32)
        .add()
        .parent(INGRESS_PARENT)
        .priority(FILTER_PRIORITY)
        .protocol(eth_p_all())
        .redirect(to)?
        .execute()
        .await
}

/// `ETH_P_ALL` as tc's protocol field holds it: in network byte order.
fn eth_p_all() -> u16 {
    (libc::ETH_P_ALL as u16).to_be()
}

/// Removes what [`join`] added; what is already gone is fine.
async fn unjoin(handle: &Handle, netns: &Path, joined: &Joined) -> Result<(), NetworkError> {
    // The result, with an error that says the thing is gone already as Ok.
    let unless_gone = |result: Result<(), rtnetlink::Error>| {
        result.or_else(|e| match netlink_errno(&e) {
            Some(libc::ENODEV | libc::ENOENT | libc::EINVAL) => Ok(()),
            _ => Err(e),
        })
    };
    let error = |interface: &str, operation: &str, e: &rtnetlink::Error| NetworkError::Interface {
        netns: netns.to_owned(),
        interface: interface.to_owned(),
        operation: operation.into(),
        detail: netlink_detail(e),
    };
    // The CNI interface: only if it is still the one runv joined (an index
    // can be reused once the interface is deleted).
    let cni_there = link_name(handle, joined.index).await.as_deref() == Some(joined.name.as_str());
    if let Joint::Bridge {
        name,
        index,
        mac_changed,
    } = &joined.joint
    {
        if cni_there {
            let mut link = LinkUnspec::new_with_index(joined.index).nocontroller();
            if *mac_changed {
                link = link.address(joined.mac.to_vec());
            }
            unless_gone(handle.link().set(link.build()).execute().await).map_err(|e| {
                error(
                    &joined.name,
                    "take it out of runv's bridge and give its MAC back",
                    &e,
                )
            })?;
        }
        if link_name(handle, *index).await.as_deref() == Some(name.as_str()) {
            unless_gone(handle.link().del(*index).execute().await)
                .map_err(|e| error(name, "delete the bridge", &e))?;
        }
    }
    if let (true, Joint::Mirred { own_qdisc }) = (cni_there, &joined.joint) {
        let result = if *own_qdisc {
            // Its filters go with it.
            let mut request = handle.qdisc().del(joined.index as i32);
            request.message_mut().header.parent = TcHandle::INGRESS;
            request.message_mut().header.handle = TcHandle::from(INGRESS_PARENT);
            request.execute().await
        } else {
            delete_filter(handle, joined.index).await
        };
        unless_gone(result)
            .map_err(|e| error(&joined.name, "remove runv's ingress qdisc and filter", &e))?;
    }
    if joined.tap_index != 0
        && link_name(handle, joined.tap_index).await.as_deref() == Some(joined.tap_name.as_str())
    {
        match unless_gone(handle.link().del(joined.tap_index).execute().await) {
            Err(e) if netlink_errno(&e) != Some(libc::EOPNOTSUPP) => {
                let what = match joined.joint {
                    Joint::Macvtap => "delete the macvtap",
                    _ => "delete the tap",
                };
                return Err(error(&joined.tap_name, what, &e));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Gives `vf`'s function back to its host driver, then moves the netdev
/// that driver makes (in the host's namespace) into the pod's namespace
/// `ns` with the name and alias it had there, for CNI's DEL to find.
fn give_back(sysfs: &Sysfs, netns: &Path, ns: &File, vf: PassedVf) -> Result<(), NetworkError> {
    let passthrough_error = |source| NetworkError::Passthrough {
        netns: netns.to_owned(),
        interface: vf.config.name.clone(),
        source,
    };
    // A step that failed (logged by give_back) leaves the rest to do: the
    // reprobe may have worked.
    let given = sysfs.give_back(&vf.function);
    return_netdev(
        sysfs,
        netns,
        ns,
        &vf.function.bdf,
        &vf.config.name,
        vf.alias.clone(),
    )?;
    given.map_err(passthrough_error)
}

/// Waits for the netdev that the host driver of `bdf` makes (in the host's
/// namespace) and moves it into the pod's namespace `ns` as `name`, with
/// `alias`.
fn return_netdev(
    sysfs: &Sysfs,
    netns: &Path,
    ns: &File,
    bdf: &str,
    name: &str,
    alias: Option<String>,
) -> Result<(), NetworkError> {
    let netdev = sysfs
        .wait_for_netdev(bdf, NETDEV_RETURN_TIMEOUT)
        .map_err(|source| NetworkError::Passthrough {
            netns: netns.to_owned(),
            interface: name.to_owned(),
            source,
        })?;
    let host_ns = Path::new("/proc/self/ns/net");
    let host = File::open(host_ns).map_err(|e| NetworkError::Namespace {
        netns: host_ns.to_owned(),
        operation: "open the host's namespace".into(),
        detail: io_detail(&e),
    })?;
    let pod_ns = ns.try_clone().map_err(|e| NetworkError::Namespace {
        netns: netns.to_owned(),
        operation: "duplicate the namespace fd".into(),
        detail: io_detail(&e),
    })?;
    let name = name.to_owned();
    let pod_path = netns.to_owned();
    netns::run(host_ns, &host, move |handle| async move {
        let mut link = LinkUnspec::new_with_index(netdev.index)
            .setns_by_fd(pod_ns.as_raw_fd())
            .name(name.clone());
        if let Some(alias) = alias {
            link = link.append_extra_attribute(LinkAttribute::IfAlias(alias));
        }
        handle
            .link()
            .set(link.build())
            .execute()
            .await
            .map_err(|e| NetworkError::Interface {
                netns: pod_path,
                interface: name,
                operation: format!(
                    "move it back from the host's namespace (where it is {})",
                    netdev.name
                ),
                detail: netlink_detail(&e),
            })
    })
}

/// The name of the link with index `index`, None if there is none.
async fn link_name(handle: &Handle, index: u32) -> Option<String> {
    let link = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .ok()??;
    link.attributes.into_iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name),
        _ => None,
    })
}

/// `tc filter del dev <index> parent ffff: prio 49152 protocol all`.
async fn delete_filter(handle: &Handle, index: u32) -> Result<(), rtnetlink::Error> {
    let mut message = TcMessage::with_index(index as i32);
    message.header.parent = TcHandle::from(INGRESS_PARENT);
    message.header.info = (u32::from(FILTER_PRIORITY) << 16) | u32::from(eth_p_all());
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::DelTrafficFilter(message));
    request.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut response = handle.clone().request(request)?;
    while let Some(message) = futures_util::StreamExt::next(&mut response).await {
        if let rtnetlink::packet_core::NetlinkPayload::Error(e) = message.payload {
            if e.code.is_some() {
                return Err(rtnetlink::Error::NetlinkError(e));
            }
        }
    }
    Ok(())
}

/// The errno of a netlink error.
fn netlink_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(message) => message.code.map(|c| -c.get()),
        _ => None,
    }
}

/// A netlink error in words, with its errno.
fn netlink_detail(e: &rtnetlink::Error) -> String {
    match netlink_errno(e) {
        Some(errno) => {
            let mut detail = io_detail(&io::Error::from_raw_os_error(errno));
            if errno == libc::EPERM {
                detail.push_str("; runv needs CAP_NET_ADMIN");
            } else if errno == libc::ENOENT || errno == libc::EOPNOTSUPP {
                detail.push_str(
                    "; the host kernel may lack tc's ingress qdisc, u32 filter or mirred action \
                     (modprobe sch_ingress cls_u32 act_mirred)",
                );
            }
            detail
        }
        None => e.to_string(),
    }
}

/// An I/O error with its errno name: "No such file or directory (ENOENT, os error 2)".
fn io_detail(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(errno) => format!(
            "{} ({:?}, os error {errno})",
            nix::errno::Errno::from_raw(errno).desc(),
            nix::errno::Errno::from_raw(errno)
        ),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(
            format_mac(&[0x02, 0x42, 0xac, 0x11, 0, 0x0a]),
            "02:42:ac:11:00:0a"
        );
        let route = RouteConfig {
            destination: None,
            gateway: Some("10.1.0.1".parse().unwrap()),
            device: "eth0".into(),
            source: None,
            scope: 0,
            family: IpFamily::V4,
        };
        assert_eq!(route.destination_cidr(), "");
        let route = RouteConfig {
            destination: Some(IpAddress {
                address: "10.2.0.0".parse().unwrap(),
                prefix_len: 16,
            }),
            ..route
        };
        assert_eq!(route.destination_cidr(), "10.2.0.0/16");
        assert_eq!(eth_p_all(), 0x0300);
        let detail = io_detail(&io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(detail, "No such file or directory (ENOENT, os error 2)");
    }

    #[test]
    fn macvtap_errors_say_the_fix() {
        let error = |errno: i32| {
            let mut message = rtnetlink::packet_core::ErrorMessage::default();
            message.code = std::num::NonZeroI32::new(-errno);
            macvtap_detail(&rtnetlink::Error::NetlinkError(message))
        };
        let detail = error(libc::EOPNOTSUPP);
        assert!(
            detail.contains("(EOPNOTSUPP, os error 95); the host kernel lacks macvtap")
                && detail.contains("CONFIG_MACVTAP")
                && detail.contains("modprobe macvtap"),
            "{detail}"
        );
        assert!(error(libc::EPERM).contains("CAP_NET_ADMIN"));
    }

    #[test]
    fn missing_namespace_is_named() {
        let err = PodNetwork::setup(Path::new("/nonexistent/netns"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "pod network namespace /nonexistent/netns: cannot open the namespace: No such file \
             or directory (ENOENT, os error 2)"
        );
    }
}
