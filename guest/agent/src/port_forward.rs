//! Port-forwarding, guest side: the listener on vsock port
//! PORT_FORWARD_VSOCK_PORT. Each host connection names a TCP port; the
//! agent connects to it where a pod's server listens and relays bytes
//! both ways (see runv_protocol::port_forward).
//!
//! The pod's containers share the guest's network namespace (the VM is the
//! pod's network boundary), the agent's own, so the agent connects from
//! where it is: to the loopback first, as containerd does for runc pods,
//! then to the guest's other addresses, so that a server bound only to the
//! pod IP answers too.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use runv_protocol::{
    port_forward::{parse_request, reply_line, MAX_REQUEST_LEN},
    PORT_FORWARD_VSOCK_PORT,
};
use tokio::{
    io::{AsyncRead, AsyncWriteExt},
    net::TcpStream,
};
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};

use crate::{host_only, request_line};

/// A host that connects but never names its port is dropped after this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the connects to all addresses may take together: under the
/// 30 s the host waits for the answer, so that the host hears why.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

pub fn listen() -> io::Result<VsockListener> {
    VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, PORT_FORWARD_VSOCK_PORT))
}

/// Serves every port-forward connection of the host.
pub async fn serve(listener: VsockListener) {
    loop {
        let connection = match host_only::accept(&listener).await {
            Ok(connection) => connection,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a port-forward connection");
                continue;
            }
        };
        tokio::spawn(forward(connection));
    }
}

async fn forward(mut host: tokio_vsock::VsockStream) {
    let port = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut host)).await {
        Ok(Ok(port)) => port,
        Ok(Err(why)) => {
            tracing::warn!("refused a port-forward connection: {why}");
            let _ = host.write_all(reply_line(&Err(why)).as_bytes()).await;
            return;
        }
        Err(_) => {
            tracing::warn!("a port-forward connection named no port within {REQUEST_TIMEOUT:?}");
            return;
        }
    };
    let server = connect(port).await;
    let reply = reply_line(&server.as_ref().map(|_| ()).map_err(String::clone));
    if host.write_all(reply.as_bytes()).await.is_err() {
        return;
    }
    let Ok(server) = server else {
        return;
    };
    match relay(host, server).await {
        Ok(to_host) => tracing::debug!(port, to_host, "port-forward connection ended"),
        Err(e) => tracing::debug!(port, error = %e, "port-forward connection broke"),
    }
}

/// Relays bytes both ways until the server has sent everything, then
/// closes the host's connection whole: a hybrid vsock backend need not
/// pass a half-close on to the host, which would then wait for an end
/// that never comes. The host's end of input reaches the server as a
/// half-close. Returns the bytes sent to the host.
async fn relay(host: tokio_vsock::VsockStream, server: TcpStream) -> io::Result<u64> {
    let (mut host_read, mut host_write) = tokio::io::split(host);
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async {
        let _ = tokio::io::copy(&mut host_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
        std::future::pending::<()>().await
    };
    let downstream = tokio::io::copy(&mut server_read, &mut host_write);
    tokio::select! {
        sent = downstream => sent,
        () = upstream => unreachable!("the upstream copy never ends the relay"),
    }
}

async fn read_request(host: &mut (impl AsyncRead + Unpin)) -> Result<u16, String> {
    let line = request_line::read(host, MAX_REQUEST_LEN, "port-forward request").await?;
    parse_request(&line)
}

/// Connects to `port` on the loopback, else on the guest's own addresses.
async fn connect(port: u16) -> Result<TcpStream, String> {
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let mut tried = Vec::new();
    for ip in candidates() {
        let address = SocketAddr::new(ip, port);
        match tokio::time::timeout_at(deadline, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => tried.push(format!("{address}: {e}")),
            Err(_) => {
                tried.push(format!(
                    "{address}: no answer within {CONNECT_TIMEOUT:?} in all"
                ));
                break;
            }
        }
    }
    Err(format!(
        "nothing in the pod accepts TCP port {port} ({})",
        tried.join("; ")
    ))
}

/// 127.0.0.1 and ::1, then every address of the guest's interfaces.
fn candidates() -> Vec<IpAddr> {
    let mut addresses = vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    let own = nix::ifaddrs::getifaddrs().into_iter().flatten();
    for ip in own.filter_map(|interface| interface_ip(&interface)) {
        if !addresses.contains(&ip) {
            addresses.push(ip);
        }
    }
    addresses
}

fn interface_ip(interface: &nix::ifaddrs::InterfaceAddress) -> Option<IpAddr> {
    let address = interface.address.as_ref()?;
    if let Some(v4) = address.as_sockaddr_in() {
        return Some(IpAddr::V4(v4.ip()));
    }
    // Link-local IPv6 needs a scope the relay does not carry.
    let v6 = address.as_sockaddr_in6()?.ip();
    (!v6.is_unicast_link_local()).then_some(IpAddr::V6(v6))
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn reads_one_request_line() {
        let mut request: &[u8] = b"8080\nGET / HTTP/1.0\r\n";
        assert_eq!(read_request(&mut request).await, Ok(8080));
        assert_eq!(
            request, b"GET / HTTP/1.0\r\n",
            "the stream's bytes stay unread"
        );
        let mut long: &[u8] = b"1234567\n";
        assert!(read_request(&mut long)
            .await
            .unwrap_err()
            .contains("exceeds"));
        let mut cut: &[u8] = b"80";
        assert!(read_request(&mut cut).await.is_err());
    }

    #[tokio::test]
    async fn connects_to_a_server_on_the_loopback_or_says_why_not() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        assert!(connect(port).await.is_ok());
        drop(server);
        let why = connect(port).await.unwrap_err();
        assert!(
            why.contains(&format!("nothing in the pod accepts TCP port {port}"))
                && why.contains(&format!("127.0.0.1:{port}")),
            "{why}"
        );
    }

    #[test]
    fn the_loopback_comes_first() {
        let candidates = candidates();
        assert_eq!(candidates[0], IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(candidates[1], IpAddr::V6(Ipv6Addr::LOCALHOST));
    }
}
