//! The transport side of a device that is its own event-loop subscriber
//! because it watches more than its queues (net: the tap; vsock: the host
//! socket and its connections), shared between its transport and the loop
//! as `Arc<Mutex<_>>` like a [`QueueDevice`](super::queue_device::QueueDevice).

use std::{
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
};

use virtio_queue::{DescriptorChain, Queue, QueueT};

use super::{lock, loop_queues::LoopQueues, notify_used, Activation, Interrupt, VirtioDevice};
use crate::memory::GuestMemory;

/// What such a device does; the blanket [`VirtioDevice`] impl does the
/// checks and the bookkeeping of its [`LoopQueues`].
pub(crate) trait LoopDevice: Send + 'static {
    /// The device's name in activation errors ("virtio-net").
    const NAME: &'static str;
    /// The virtio device ID.
    const DEVICE_TYPE: u32;
    /// The largest size of each queue.
    const QUEUE_MAX_SIZES: &'static [u16];
    /// The queues as the device keeps them.
    type Queues;
    /// The features offered; VIRTIO_F_VERSION_1 is the transport's.
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Checks the features the driver accepted and takes its queues,
    /// before anything else of the activation.
    fn take_queues(features: u64, queues: Vec<Queue>) -> Result<Self::Queues, String>;
    /// Whether the device is active.
    fn is_active(&self) -> bool;
    /// On a vCPU thread: the driver set the device up.
    fn activate(
        &mut self,
        memory: GuestMemory,
        queues: Self::Queues,
        features: u64,
        interrupt: Interrupt,
    ) -> Result<(), String>;
    /// On a vCPU thread: the driver reset the device; drop the queues and
    /// return the other watched descriptors let go of.
    fn reset(&mut self) -> Vec<Box<dyn AsRawFd + Send>>;
    /// The queue eventfds the loop watches for the device.
    fn loop_queues(&mut self) -> &mut LoopQueues;
}

/// The transport holds the device through the same lock as the event loop.
impl<D: LoopDevice> VirtioDevice for Arc<Mutex<D>> {
    fn device_type(&self) -> u32 {
        D::DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        D::QUEUE_MAX_SIZES
    }

    fn features(&self) -> u64 {
        lock(self).features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        lock(self).read_config(offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), String> {
        let Activation {
            memory,
            queues,
            queue_events,
            features,
            interrupt,
        } = activation;
        let queues = D::take_queues(features, queues)?;
        if queue_events.len() != D::QUEUE_MAX_SIZES.len() {
            return Err(format!("{} needs one eventfd per queue", D::NAME));
        }
        let mut device = lock(self);
        if device.is_active() {
            return Err(format!("{} is already active", D::NAME));
        }
        device.activate(memory, queues, features, interrupt)?;
        device.loop_queues().activate(queue_events);
        Ok(())
    }

    fn queue_notify(&mut self, queue: u16) {
        lock(self).loop_queues().notify(queue);
    }

    fn reset(&mut self) {
        let mut device = lock(self);
        let dropped = device.reset();
        device.loop_queues().reset(dropped);
    }
}

/// Takes every chain the driver made available on a transmit `queue`,
/// hands it to `send` and returns it with nothing written, then interrupts
/// the driver once if any came back. `device` names it in a warning.
pub(crate) fn drain_tx(
    device: &str,
    queue: &mut Queue,
    memory: &GuestMemory,
    interrupt: &Interrupt,
    mut send: impl FnMut(DescriptorChain<&GuestMemory>),
) {
    let mut returned = false;
    while let Some(chain) = queue.pop_descriptor_chain(memory) {
        let head = chain.head_index();
        send(chain);
        // Nothing written: the used length of a tx chain is 0.
        if let Err(e) = queue.add_used(memory, head, 0) {
            tracing::warn!(error = %e, "cannot return a {device} tx chain");
        }
        returned = true;
    }
    if returned {
        notify_used(queue, memory, interrupt);
    }
}
