//! A device's queue notifications on the VM's event loop.
//!
//! A device is shared between its transport (vCPU threads: activation,
//! reset, register-path notifications) and the event loop (all I/O). Only
//! the loop thread may change what epoll watches, so activation and reset
//! just record the new queue eventfds and write a wake-up eventfd; the loop
//! then watches the new eventfds and forgets the old ones.

use std::os::fd::{AsRawFd, RawFd};

use event_manager::{EventOps, EventSet, Events};
use vmm_sys_util::eventfd::EventFd;

/// What woke the loop, as far as the queues are concerned.
pub(crate) enum Wakeup {
    /// The queues of a new activation are watched from now on. Buffers the
    /// driver made available before may have come without a kick the loop
    /// saw: look at every queue.
    Watching,
    /// The driver kicked this queue.
    Kicked(usize),
    /// A wake-up with nothing new to watch, handled.
    Handled,
    /// Not one of these descriptors.
    Other,
}

pub(crate) struct LoopQueues {
    /// Written on a vCPU thread when the device is activated or reset.
    wake: EventFd,
    /// The queues' notification eventfds while the device is active.
    events: Vec<EventFd>,
    watching: bool,
    /// Descriptors dropped on a vCPU thread, for the loop to unregister
    /// before closing them. Closing first would leave epoll watching the
    /// transport's duplicate of a queue eventfd under a number we no
    /// longer own.
    retired: Vec<Box<dyn AsRawFd + Send>>,
}

impl LoopQueues {
    pub(crate) fn new() -> std::io::Result<LoopQueues> {
        Ok(LoopQueues {
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            events: Vec::new(),
            watching: false,
            retired: Vec::new(),
        })
    }

    /// From the subscriber's `init`. An activation before registration
    /// wrote the wake-up eventfd, which this watch then reports.
    pub(crate) fn init(&self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.wake, EventSet::IN)) {
            tracing::error!(error = %e, "cannot watch a device's wake-up eventfd");
        }
    }

    /// On a vCPU thread: the driver activated the device with these queue
    /// eventfds.
    pub(crate) fn activate(&mut self, events: Vec<EventFd>) {
        self.retire_queue_events();
        self.events = events;
        self.watching = false;
        self.wake_loop();
    }

    /// On a vCPU thread: the driver reset the device; `dropped` are other
    /// watched descriptors the device let go of.
    pub(crate) fn reset(&mut self, dropped: impl IntoIterator<Item = Box<dyn AsRawFd + Send>>) {
        self.retire_queue_events();
        self.retired.extend(dropped);
        self.watching = false;
        self.wake_loop();
    }

    /// On a vCPU thread, for a notification that came through the
    /// transport's register instead of an ioeventfd: handled on the loop
    /// exactly like one.
    pub(crate) fn notify(&self, queue: u16) {
        if let Some(event) = self.events.get(usize::from(queue)) {
            if let Err(e) = event.write(1) {
                tracing::warn!(queue, error = %e, "cannot pass a queue notification on");
            }
        }
    }

    /// On the loop thread, for every ready descriptor of the device.
    pub(crate) fn process(&mut self, fd: RawFd, ops: &mut EventOps) -> Wakeup {
        if fd == self.wake.as_raw_fd() {
            let _ = self.wake.read();
            return self.refresh(ops);
        }
        if !self.watching {
            return Wakeup::Other;
        }
        match self.events.iter().position(|e| e.as_raw_fd() == fd) {
            Some(queue) => {
                let _ = self.events[queue].read();
                Wakeup::Kicked(queue)
            }
            None => Wakeup::Other,
        }
    }

    fn refresh(&mut self, ops: &mut EventOps) -> Wakeup {
        for fd in self.retired.drain(..) {
            // Not watched yet if the reset came before the loop saw the
            // activation.
            let _ = ops.remove(Events::empty_raw(fd.as_raw_fd()));
        }
        if self.events.is_empty() || self.watching {
            return Wakeup::Handled;
        }
        for event in &self.events {
            if let Err(e) = ops.add(Events::new(event, EventSet::IN)) {
                tracing::error!(error = %e, "cannot watch a device queue");
            }
        }
        self.watching = true;
        Wakeup::Watching
    }

    fn retire_queue_events(&mut self) {
        let events = std::mem::take(&mut self.events);
        self.retired.extend(
            events
                .into_iter()
                .map(|event| Box::new(event) as Box<dyn AsRawFd + Send>),
        );
    }

    fn wake_loop(&self) {
        if let Err(e) = self.wake.write(1) {
            tracing::error!(error = %e, "cannot wake the event loop for a device");
        }
    }
}
