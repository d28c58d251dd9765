//! virtio-net (device type 1) with a tap backend: one receive and one
//! transmit queue, no control queue.
//!
//! The caller opens the tap (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, in the
//! pod's network namespace) and hands over a descriptor of it. Frames
//! cross between the guest and the tap with their `virtio_net_hdr_v1`
//! (12 bytes, the tap's header size is set to match), so checksum and
//! segmentation offloads need no work here: the guest's transmit chains
//! are written to the tap as they are (one `writev`, no copy), and frames
//! read from the tap go into receive buffers with `num_buffers` filled in.
//! The features offered, and why, are in `device.rs`.
//!
//! Receive: the tap is watched by the event loop only while the driver
//! has receive buffers. With none left, the device stops reading (a frame
//! already read waits in the device), the tap's own queue holds what
//! arrives, and the driver's next receive kick starts the reading again.
//!
//! # Wiring it into a VM
//!
//! ```ignore
//! let net = Net::new(NetConfig { tap, mac })?;                      // Arc<Mutex<Net>>
//! event_loop.add_subscriber(net.clone())?;                           // the VM's EventLoop
//! device_manager.attach(&vm, Box::new(net))?;                        // a virtio-mmio slot
//! ```
//!
//! `MicroVm` does this for the devices of `MicroVmConfig::net_devices` at
//! boot and for `MicroVm::attach_net`; `MicroVm::detach` removes one.

mod device;
#[cfg(feature = "fuzzing")]
mod socket;
mod tap;

#[cfg(test)]
mod tests;

pub use device::{Net, NetConfig, DEVICE_TYPE};
