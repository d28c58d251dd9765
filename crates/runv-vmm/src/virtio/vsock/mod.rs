//! virtio-vsock (device type 19) with the hybrid Unix-socket backend.
//!
//! The guest sees an ordinary virtio-vsock device; the host side is one
//! Unix socket, with the protocol of Firecracker's and vhost-device-vsock's
//! hybrid vsock (which `runv-agent-client` speaks):
//!
//! - a host client connects to the socket, writes `CONNECT <port>\n` and,
//!   once the guest accepts, reads `OK <host port>\n`; the stream then
//!   carries the connection. If nothing listens on the guest port, the
//!   stream is closed instead.
//! - a guest connection to host port `P` is connected to the Unix socket
//!   `<socket>_P`; if nothing listens there the guest gets a reset.
//!
//! Only stream sockets are supported, with the full connection protocol of
//! virtio spec 5.10.6: credit-based flow control, shutdown, reset.
//!
//! # Wiring it into a VM
//!
//! ```ignore
//! let vsock = Vsock::new(guest_cid, run_dir.join("vsock.sock"))?;   // Arc<Mutex<Vsock>>
//! event_loop.add_subscriber(vsock.clone())?;                          // the VM's EventLoop
//! let transport = MmioTransport::new(Box::new(vsock), memory, irq)?;  // a virtio-mmio slot
//! // register transport.queue_events() as ioeventfds, as for any device
//! ```
//!
//! The device is shared between the transport (vCPU threads: register
//! accesses, activation, reset) and the event loop (all I/O). Activation
//! and reset only record the change and wake the loop, which then watches
//! or drops the queue eventfds; every packet is handled on the loop thread.
//! A `queue_notify` from the transport (no ioeventfd) is passed on through
//! the same eventfd. Host clients that arrive before the driver has set the
//! device up are refused like a guest port nobody listens on, and retry.
//! Removing the subscriber from the loop and dropping the transport drops
//! the device, which closes every descriptor and removes the socket file.

mod connection;
mod device;
mod muxer;
mod packet;
mod unix;

#[cfg(test)]
mod tests;

pub use device::{Vsock, DEVICE_TYPE};
