//! Virtio devices and their transport.

pub mod balloon;
pub mod block;
pub mod fs;
mod loop_device;
mod loop_queues;
pub mod mmio;
pub mod net;
pub mod pmem;
pub mod queue_device;
#[cfg(test)]
mod test_driver;
pub mod vsock;

use std::sync::{
    atomic::{AtomicU32, Ordering},
    Arc, Mutex, MutexGuard,
};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

/// A device's way to interrupt the guest: it records why in the
/// transport's interrupt status, then signals the irqfd.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    irq: Arc<EventFd>,
}

impl Interrupt {
    fn signal(&self, why: u32) {
        self.status.fetch_or(why, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            tracing::warn!(error = %e, "cannot raise a virtio interrupt");
        }
    }

    /// The device put buffers in a used ring.
    pub fn signal_used_queue(&self) {
        self.signal(VIRTIO_MMIO_INT_VRING);
    }

    /// The device's configuration space changed.
    pub fn signal_config_change(&self) {
        self.signal(VIRTIO_MMIO_INT_CONFIG);
    }
}

/// What a device gets when the driver has set it up.
pub struct Activation {
    pub memory: GuestMemory,
    /// One queue per entry of `queue_max_sizes`, validated against memory.
    pub queues: Vec<Queue>,
    /// One eventfd per queue, signalled when the driver notifies that queue.
    /// Wherever the transport's window is registered with KVM as ioeventfds
    /// (the device manager does it), notifications arrive only here, with no
    /// exit to the vCPU thread; `VirtioDevice::queue_notify` is then not called.
    pub queue_events: Vec<EventFd>,
    /// The features the driver accepted.
    pub features: u64,
    pub interrupt: Interrupt,
}

/// A virtio device, behind any transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (3 for console, 19 for vsock, ...).
    fn device_type(&self) -> u32;
    /// The largest size of each of the device's queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features the device offers; VIRTIO_F_VERSION_1 is added by the
    /// transport.
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver finished setting up the device: start working.
    fn activate(&mut self, activation: Activation) -> Result<(), String>;
    /// The driver made buffers available on `queue`.
    fn queue_notify(&mut self, queue: u16);
    /// The driver reset the device: drop queues and state.
    fn reset(&mut self);
}

/// Copies the part of a device's configuration space at `offset` into
/// `data`; bytes past its end read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    if let Some(bytes) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) {
        let len = bytes.len().min(data.len());
        data[..len].copy_from_slice(&bytes[..len]);
    }
}

/// Locks a device shared with the event loop. A panic on the loop thread
/// must not take the vCPUs down with it.
pub(crate) fn lock<T: ?Sized>(device: &Mutex<T>) -> MutexGuard<'_, T> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Interrupts the guest for buffers just put in `queue`'s used ring, unless
/// the driver asked not to be.
pub(crate) fn notify_used(queue: &mut Queue, memory: &GuestMemory, interrupt: &Interrupt) {
    if queue.needs_notification(memory).unwrap_or(true) {
        interrupt.signal_used_queue();
    }
}
