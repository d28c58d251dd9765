//! The wiring of a device whose only work is answering its queues (block,
//! fs): shared between its transport and the VM's event loop as
//! `Arc<Mutex<QueueDevice<_>>>`, every request handled on the loop thread.
//!
//! ```ignore
//! let device = Block::new(config)?;                 // Arc<Mutex<QueueDevice<Block>>>
//! event_loop.add_subscriber(device.clone())?;       // the VM's EventLoop
//! device_manager.attach(&vm, Box::new(device))?;    // a virtio-mmio slot
//! ```
//!
//! Removing the subscriber and emptying the slot drops the device.

use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::Queue;

use super::{
    lock,
    loop_queues::{LoopQueues, Wakeup},
    read_config_bytes, Activation, Interrupt, VirtioDevice,
};
use crate::{memory::GuestMemory, VmmError};

/// What a queue-only device does; [`QueueDevice`] does the sharing.
pub trait QueueHandler: Send + 'static {
    /// The virtio device ID.
    const DEVICE_TYPE: u32;
    /// The largest size of each queue.
    const QUEUE_MAX_SIZES: &'static [u16];
    /// The features offered; VIRTIO_F_VERSION_1 is the transport's.
    fn features(&self) -> u64 {
        0
    }
    /// The device-specific configuration space.
    fn config_space(&self) -> &[u8];
    /// On a vCPU thread: the driver set the device up. `queues` has one
    /// queue per entry of `QUEUE_MAX_SIZES`.
    fn activate(
        &mut self,
        memory: GuestMemory,
        queues: Vec<Queue>,
        features: u64,
        interrupt: Interrupt,
    ) -> Result<(), String>;
    /// On the loop thread: answer what the driver made available on `queue`.
    fn process_queue(&mut self, queue: usize);
    /// On a vCPU thread: the driver reset the device; drop the queues.
    fn reset(&mut self);
}

/// A [`QueueHandler`] with the queue eventfds the loop watches for it.
pub struct QueueDevice<H> {
    handler: H,
    queues: LoopQueues,
}

impl<H: QueueHandler> QueueDevice<H> {
    /// Shares `handler` between a transport and an event loop.
    pub(crate) fn shared(handler: H) -> Result<Arc<Mutex<QueueDevice<H>>>, VmmError> {
        let queues = LoopQueues::new()
            .map_err(|e| VmmError::Device(format!("creating a device's wake-up eventfd: {e}")))?;
        Ok(Arc::new(Mutex::new(QueueDevice { handler, queues })))
    }
}

impl<H: QueueHandler> MutEventSubscriber for QueueDevice<H> {
    fn init(&mut self, ops: &mut EventOps) {
        self.queues.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.queues.process(events.fd(), ops) {
            Wakeup::Watching => {
                for queue in 0..H::QUEUE_MAX_SIZES.len() {
                    self.handler.process_queue(queue);
                }
            }
            Wakeup::Kicked(queue) => self.handler.process_queue(queue),
            Wakeup::Handled => {}
            Wakeup::Other => {
                tracing::debug!(fd = events.fd(), "event for a descriptor no longer watched")
            }
        }
    }
}

/// The transport holds the device through the same lock as the event loop.
impl<H: QueueHandler> VirtioDevice for Arc<Mutex<QueueDevice<H>>> {
    fn device_type(&self) -> u32 {
        H::DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        H::QUEUE_MAX_SIZES
    }

    fn features(&self) -> u64 {
        lock(self).handler.features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(lock(self).handler.config_space(), offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), String> {
        let Activation {
            memory,
            queues,
            queue_events,
            features,
            interrupt,
        } = activation;
        if queues.len() != H::QUEUE_MAX_SIZES.len() || queue_events.len() != queues.len() {
            return Err("one queue and one eventfd per queue are needed".into());
        }
        let mut device = lock(self);
        device
            .handler
            .activate(memory, queues, features, interrupt)?;
        device.queues.activate(queue_events);
        Ok(())
    }

    fn queue_notify(&mut self, queue: u16) {
        lock(self).queues.notify(queue);
    }

    fn reset(&mut self) {
        let mut device = lock(self);
        device.handler.reset();
        device.queues.reset([]);
    }
}
