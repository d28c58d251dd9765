//! The per-VM event loop: one thread waits on every device's file
//! descriptors (epoll, through rust-vmm's event-manager) and calls the
//! device that owns each ready one. Devices get no thread of their own, so
//! a VM costs one host thread for its vsock, block and net I/O; a virtio-fs
//! share is the exception, served by a loop of its own whose thread has the
//! share as its file system root (virtio/fs/worker.rs). Each loop thread
//! installs its seccomp filter before it serves anything (crate::seccomp).
//!
//! Subscribers can be added and removed from any thread while the loop runs
//! (hot-plug); the calls travel to the loop thread through event-manager's
//! remote endpoint and wait for it. They must therefore not be made from a
//! subscriber itself, which runs on the loop thread.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
};

use event_manager::{EventManager, MutEventSubscriber, RemoteEndpoint};

pub use event_manager::SubscriberId;

use crate::{
    seccomp::{self, ThreadKind},
    VmmError,
};

/// A device as the loop holds it: shared with whoever else drives the
/// device (a virtio transport on a vCPU thread, for one).
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The running loop; dropping it stops and joins the thread.
pub struct EventLoop {
    endpoint: RemoteEndpoint<Subscriber>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// Starts the loop on a thread called `name`, under the event loop's
    /// seccomp filter.
    pub fn spawn(name: &str) -> Result<EventLoop, VmmError> {
        Self::spawn_confined(name, ThreadKind::EventLoop, || Ok(()))
    }

    /// Starts the loop on a thread called `name` that runs `setup`, then
    /// installs `kind`'s seccomp filter, before it serves anything.
    pub(crate) fn spawn_confined(
        name: &str,
        kind: ThreadKind,
        setup: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> Result<EventLoop, VmmError> {
        let mut manager =
            EventManager::<Subscriber>::new().map_err(manager_error("creating the event loop"))?;
        let endpoint = manager.remote_endpoint();
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = seccomp::spawn_confined(name, kind, setup, {
            let stopping = stopping.clone();
            move || {
                while !stopping.load(Ordering::Acquire) {
                    if let Err(e) = manager.run() {
                        tracing::error!(error = %e, "event loop failed; device I/O stops");
                        break;
                    }
                }
            }
        })?;
        Ok(EventLoop {
            endpoint,
            stopping,
            thread: Some(thread),
        })
    }

    /// Registers `subscriber`: its `init` runs on the loop thread before
    /// this returns.
    pub fn add_subscriber(&self, subscriber: Subscriber) -> Result<SubscriberId, VmmError> {
        self.endpoint
            .call_blocking(move |ops| Ok(ops.add_subscriber(subscriber)))
            .map_err(manager_error("adding a subscriber"))
    }

    /// Unregisters a subscriber and all its file descriptors; the loop holds
    /// no reference to it once this returns.
    pub fn remove_subscriber(&self, id: SubscriberId) -> Result<(), VmmError> {
        self.endpoint
            .call_blocking(move |ops| ops.remove_subscriber(id).map(drop))
            .map_err(manager_error("removing a subscriber"))
    }

    /// Ends the loop and joins its thread; subscribers still registered are
    /// dropped with it.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stopping.store(true, Ordering::Release);
        if let Err(e) = self.endpoint.kick() {
            // Without the wake-up the join below would never return.
            tracing::error!(error = %e, "cannot wake the event loop to stop it; leaving it running");
            return;
        }
        if thread.join().is_err() {
            tracing::error!("the event loop thread panicked");
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.shut_down();
    }
}

fn manager_error(what: &'static str) -> impl FnOnce(event_manager::Error) -> VmmError {
    move |e| VmmError::Device(format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use std::{
        sync::mpsc::{channel, Sender},
        time::Duration,
    };

    use event_manager::{EventOps, EventSet, Events};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    /// Reports the value of each wake-up of its eventfd.
    struct Counter {
        event: EventFd,
        seen: Sender<u64>,
    }

    impl MutEventSubscriber for Counter {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.event, EventSet::IN)).unwrap();
        }

        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            self.seen.send(self.event.read().unwrap()).unwrap();
        }
    }

    /// A counter subscriber, the eventfd that wakes it and what it reports.
    fn counter() -> (Arc<Mutex<Counter>>, EventFd, std::sync::mpsc::Receiver<u64>) {
        let event = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let trigger = event.try_clone().unwrap();
        let (seen, reports) = channel();
        (
            Arc::new(Mutex::new(Counter { event, seen })),
            trigger,
            reports,
        )
    }

    /// Whether a thread called `name` runs in this process, once it had a
    /// moment to become `expected`: a new thread names itself after it
    /// starts, and a joined one lingers in /proc while the kernel finishes
    /// its exit.
    fn thread_exists(name: &str, expected: bool) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            let listed = listed_in_proc(name);
            if listed == expected || std::time::Instant::now() > deadline {
                return listed;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn listed_in_proc(name: &str) -> bool {
        std::fs::read_dir("/proc/self/task").unwrap().any(|task| {
            std::fs::read_to_string(task.unwrap().path().join("comm"))
                .is_ok_and(|comm| comm.trim_end() == name)
        })
    }

    #[test]
    fn a_subscriber_gets_its_events() {
        let event_loop = EventLoop::spawn("evl-events").unwrap();
        let (subscriber, trigger, reports) = counter();
        event_loop.add_subscriber(subscriber).unwrap();
        trigger.write(3).unwrap();
        assert_eq!(reports.recv_timeout(WAIT).unwrap(), 3);
        trigger.write(4).unwrap();
        assert_eq!(reports.recv_timeout(WAIT).unwrap(), 4);
    }

    #[test]
    fn subscribers_come_and_go_from_other_threads_while_it_runs() {
        let event_loop = Arc::new(EventLoop::spawn("evl-hotplug").unwrap());
        let (first, first_trigger, first_reports) = counter();
        event_loop.add_subscriber(first).unwrap();
        first_trigger.write(1).unwrap();
        assert_eq!(first_reports.recv_timeout(WAIT).unwrap(), 1);

        let (second, second_trigger, second_reports) = counter();
        let held = second.clone();
        let id = std::thread::spawn({
            let event_loop = event_loop.clone();
            move || event_loop.add_subscriber(second).unwrap()
        })
        .join()
        .unwrap();
        second_trigger.write(2).unwrap();
        assert_eq!(second_reports.recv_timeout(WAIT).unwrap(), 2);

        std::thread::spawn({
            let event_loop = event_loop.clone();
            move || event_loop.remove_subscriber(id).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(Arc::strong_count(&held), 1, "the loop let go of it");
        assert!(event_loop.remove_subscriber(id).is_err(), "already gone");
        // The first one still works.
        first_trigger.write(5).unwrap();
        assert_eq!(first_reports.recv_timeout(WAIT).unwrap(), 5);
    }

    #[test]
    fn stop_joins_the_thread_and_drops_subscribers() {
        let event_loop = EventLoop::spawn("evl-stop").unwrap();
        let (subscriber, _trigger, _reports) = counter();
        let held = subscriber.clone();
        event_loop.add_subscriber(subscriber).unwrap();
        assert!(thread_exists("evl-stop", true));
        event_loop.stop();
        assert!(!thread_exists("evl-stop", false));
        assert_eq!(Arc::strong_count(&held), 1);

        let dropped = EventLoop::spawn("evl-drop").unwrap();
        assert!(thread_exists("evl-drop", true));
        drop(dropped);
        assert!(!thread_exists("evl-drop", false));
    }
}
