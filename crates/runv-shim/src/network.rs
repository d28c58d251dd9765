//! The pod's network: the network namespace CRI made for the pod (named in
//! the sandbox's spec) holds the interfaces CNI created; each gets a tap
//! joined to it (runv-network) and a virtio-net NIC in the VM with its
//! MAC, and the agent gives the guest NIC the interface's addresses,
//! routes and neighbours. An SR-IOV VF there is passed to the VM whole
//! (bound to vfio-pci) where the config and the hypervisor allow, and the
//! guest's driver for it makes the NIC. A pod without a namespace path
//! (host network, `ctr run`) gets no NIC.

use std::path::{Path, PathBuf};

use runv_config::{Config, HypervisorKind};
use runv_network::{format_mac, GuestNetworkConfig, IpFamily, PodNetwork, Sysfs, VfPolicy};
use runv_protocol::agent::{ConfigureNetworkRequest, IpAddress, Neighbor, NetworkInterface, Route};
use runv_sandbox::NetDevice;
use serde_json::Value;

use crate::error::{Result, ShimError};

/// AF_INET and AF_INET6, as the agent's routes name their family.
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// The network namespace the spec names for the pod, if any: a path means
/// one made beforehand (CRI's, with CNI's interfaces in it).
pub fn netns_path(spec: &Value) -> Option<PathBuf> {
    spec.pointer("/linux/namespaces")?
        .as_array()?
        .iter()
        .find(|ns| ns.get("type").and_then(Value::as_str) == Some("network"))?
        .get("path")?
        .as_str()
        .filter(|path| !path.is_empty())
        .map(PathBuf::from)
}

/// Joins the interfaces of `netns` to taps the way the config's
/// interconnect says, and binds its VFs to vfio-pci where [`vf_policy`]
/// says so, off the async runtime (it enters the namespace on a thread of
/// its own). Must run before the VM starts: the VM takes the VFs at boot.
pub async fn setup(netns: Option<PathBuf>, config: &Config) -> Result<PodNetwork> {
    let Some(netns) = netns else {
        return Ok(PodNetwork::empty());
    };
    let interconnect = config.network.interconnect;
    let policy = vf_policy(
        config.network.vf_passthrough,
        config.hypervisor,
        runv_sandbox::vfio_support(config.hypervisor),
    );
    tokio::task::spawn_blocking(move || {
        PodNetwork::setup_with_vfs(&netns, interconnect, &policy, Sysfs::default())
    })
    .await
    .map_err(|e| ShimError::Internal(format!("the network setup thread failed: {e}")))?
    .map_err(|e| ShimError::Internal(format!("cannot set up the pod's network: {e}")))
}

/// Whether VFs are passed through: the config must want it and the
/// hypervisor (`support`, from `runv_sandbox::vfio_support`) be able to;
/// else the reason, which runv-network logs for each VF it joins instead.
fn vf_policy(
    wanted: bool,
    hypervisor: HypervisorKind,
    support: std::result::Result<(), &str>,
) -> VfPolicy {
    match (wanted, support) {
        (false, _) => VfPolicy::Join {
            reason: "network.vf_passthrough = false in the runv config".into(),
        },
        (true, Err(why)) => VfPolicy::Join {
            reason: format!("hypervisor {hypervisor}: {why}"),
        },
        (true, Ok(())) => VfPolicy::PassThrough,
    }
}

/// Removes the taps, qdiscs and filters runv made, and gives passed VFs
/// back to the host and the pod's namespace, off the async runtime. The VM
/// must be gone: a VFIO function cannot be taken from a running VM.
pub async fn teardown(network: PodNetwork) {
    let netns = network.netns().map(Path::to_owned);
    match tokio::task::spawn_blocking(move || network.teardown()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(netns = ?netns, error = %e, "network teardown incomplete"),
        Err(e) => tracing::warn!(netns = ?netns, error = %e, "network teardown thread failed"),
    }
}

/// The VM's NICs, one per joined interface, in order.
pub fn net_devices(network: &PodNetwork) -> Vec<NetDevice> {
    network
        .interfaces()
        .iter()
        .map(|interface| NetDevice {
            tap: interface.tap.clone(),
            mac: interface.mac(),
        })
        .collect()
}

/// The agent's request that configures the guest as `config` says.
pub fn guest_request(config: &GuestNetworkConfig) -> ConfigureNetworkRequest {
    let family = |family: IpFamily| match family {
        IpFamily::V4 => AF_INET,
        IpFamily::V6 => AF_INET6,
    };
    let text = |ip: Option<std::net::IpAddr>| ip.map(|ip| ip.to_string()).unwrap_or_default();
    ConfigureNetworkRequest {
        interfaces: config
            .interfaces
            .iter()
            .map(|interface| NetworkInterface {
                mac: format_mac(&interface.mac),
                name: interface.name.clone(),
                mtu: interface.mtu,
                pci_address: interface
                    .passed_function
                    .map(runv_sandbox::guest_pci_address)
                    .unwrap_or_default(),
                addresses: interface
                    .addresses
                    .iter()
                    .map(|address| IpAddress {
                        address: address.address.to_string(),
                        prefix_len: address.prefix_len.into(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        routes: config
            .routes
            .iter()
            .map(|route| Route {
                destination: route.destination_cidr(),
                gateway: text(route.gateway),
                device: route.device.clone(),
                source: text(route.source),
                scope: route.scope.into(),
                family: family(route.family),
                ..Default::default()
            })
            .collect(),
        neighbors: config
            .neighbors
            .iter()
            .map(|neighbor| Neighbor {
                ip: neighbor.ip.to_string(),
                mac: format_mac(&neighbor.mac),
                device: neighbor.device.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use runv_network::{InterfaceConfig, NeighborConfig, RouteConfig};
    use serde_json::json;

    use super::*;

    #[test]
    fn the_pods_namespace_comes_from_the_spec() {
        let cri = json!({"linux": {"namespaces": [
            {"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]}});
        assert_eq!(netns_path(&cri), Some("/var/run/netns/cni-1".into()));
        let fresh = json!({"linux": {"namespaces": [{"type": "network"}]}});
        assert_eq!(netns_path(&fresh), None);
        assert_eq!(netns_path(&json!({})), None);
    }

    #[test]
    fn vfs_pass_through_only_where_wanted_and_possible() {
        assert_eq!(
            vf_policy(true, HypervisorKind::Builtin, Ok(())),
            VfPolicy::PassThrough
        );
        let VfPolicy::Join { reason } = vf_policy(false, HypervisorKind::Builtin, Ok(())) else {
            panic!("joined when not wanted");
        };
        assert_eq!(reason, "network.vf_passthrough = false in the runv config");
        let why = runv_sandbox::vfio_support(HypervisorKind::Qemu).unwrap_err();
        let VfPolicy::Join { reason } = vf_policy(true, HypervisorKind::Qemu, Err(why)) else {
            panic!("joined when qemu cannot");
        };
        assert!(
            reason.starts_with("hypervisor qemu: the qemu hypervisor cannot pass PCI functions"),
            "{reason}"
        );
    }

    #[test]
    fn guest_request_carries_every_field() {
        let address = |text: &str, prefix_len| runv_network::IpAddress {
            address: text.parse().unwrap(),
            prefix_len,
        };
        let config = GuestNetworkConfig {
            interfaces: vec![
                InterfaceConfig {
                    mac: [0x0a, 0x58, 0x0a, 0x58, 0, 5],
                    name: "eth0".into(),
                    mtu: 1450,
                    addresses: vec![address("10.88.0.5", 16), address("fd00::5", 64)],
                    passed_function: None,
                },
                InterfaceConfig {
                    mac: [0x0a, 0x58, 0x0a, 0x59, 0, 5],
                    name: "net1".into(),
                    mtu: 1500,
                    addresses: vec![address("10.89.0.5", 16)],
                    passed_function: Some(1),
                },
            ],
            routes: vec![
                RouteConfig {
                    destination: Some(address("10.88.0.0", 16)),
                    gateway: None,
                    device: "eth0".into(),
                    source: Some("10.88.0.5".parse().unwrap()),
                    scope: 253,
                    family: IpFamily::V4,
                },
                RouteConfig {
                    destination: None,
                    gateway: Some("fd00::1".parse().unwrap()),
                    device: "eth0".into(),
                    source: None,
                    scope: 0,
                    family: IpFamily::V6,
                },
            ],
            neighbors: vec![NeighborConfig {
                ip: "10.88.0.1".parse().unwrap(),
                mac: [0xee; 6],
                device: "eth0".into(),
            }],
        };
        let request = guest_request(&config);
        let nic = &request.interfaces[0];
        assert_eq!(
            (nic.mac.as_str(), nic.name.as_str(), nic.mtu),
            ("0a:58:0a:58:00:05", "eth0", 1450)
        );
        assert_eq!(nic.addresses[1].address, "fd00::5");
        assert_eq!(nic.addresses[1].prefix_len, 64);
        assert_eq!(nic.pci_address, "", "a tap's NIC is found by MAC");
        assert_eq!(
            request.interfaces[1].pci_address, "0000:00:02.0",
            "the second passed VF is the VM's PCI device 2"
        );
        let (link, default) = (&request.routes[0], &request.routes[1]);
        assert_eq!(link.destination, "10.88.0.0/16");
        assert_eq!(
            (link.gateway.as_str(), link.scope, link.family),
            ("", 253, 2)
        );
        assert_eq!(link.source, "10.88.0.5");
        assert_eq!(default.destination, "", "the default route");
        assert_eq!((default.gateway.as_str(), default.family), ("fd00::1", 10));
        assert_eq!(request.neighbors[0].mac, "ee:ee:ee:ee:ee:ee");
    }
}
