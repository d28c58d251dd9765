//! virtio-vsock's packets and its connection state machine
//! (crates/runv-vmm/src/virtio/vsock: device, muxer, connection, hybrid
//! Unix-socket handshake) with a hostile driver. The host side: a server
//! listening on host port 1024 (where guest REQUESTs can connect) and
//! clients of the hybrid socket. Host actions: 0 a new client that sends
//! the bytes (`CONNECT <port>\n`...), 1 the newest host stream sends the
//! bytes, 2 the server accepts and every host stream is drained, 3 the
//! oldest host stream closes.
#![no_main]

use std::{
    fs,
    os::unix::net::{UnixListener, UnixStream},
};

use libfuzzer_sys::fuzz_target;
use runv_fuzz::{host, scratch, virtio::HostileDriver};
use runv_vmm::virtio::vsock::Vsock;

const GUEST_CID: u64 = 3;
/// The host port a guest may connect to.
const HOST_PORT: u32 = 1024;

fuzz_target!(|input: &[u8]| {
    let socket = scratch::dir().join("vsock.sock");
    let server_path = scratch::dir().join(format!("vsock.sock_{HOST_PORT}"));
    let _ = fs::remove_file(&server_path);
    let server = UnixListener::bind(&server_path).expect("the host server");
    server.set_nonblocking(true).expect("a non-blocking server");
    let device = Vsock::new(GUEST_CID, socket.clone()).expect("a vsock device");
    let mut streams: Vec<UnixStream> = Vec::new();
    HostileDriver::for_shared(device).run(input, |action, bytes| match action % 4 {
        0 => {
            if let Ok(mut client) = UnixStream::connect(&socket) {
                client.set_nonblocking(true).expect("a non-blocking client");
                host::send(&mut client, bytes);
                streams.push(client);
            }
        }
        1 => {
            if let Some(stream) = streams.last_mut() {
                host::send(stream, bytes);
            }
        }
        2 => {
            while let Ok((stream, _)) = server.accept() {
                stream.set_nonblocking(true).expect("a non-blocking stream");
                streams.push(stream);
            }
            streams.iter_mut().for_each(host::drain);
        }
        _ => {
            if !streams.is_empty() {
                streams.remove(0);
            }
        }
    });
});
