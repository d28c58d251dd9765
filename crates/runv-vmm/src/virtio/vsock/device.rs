//! The vsock device itself: the virtio side (queues, activation, reset,
//! config space) and the event-loop side (which fd woke us, and pumping
//! packets between the queues and the connection table).

use std::{
    collections::HashMap,
    os::fd::{AsRawFd, RawFd},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::{
    muxer::Muxer,
    packet::{read_tx_packet, RxBuffer},
    unix::{Handshake, HostListener, PendingClient},
};
use crate::{
    memory::GuestMemory,
    virtio::{
        loop_device::{drain_tx, LoopDevice},
        loop_queues::{LoopQueues, Wakeup},
        notify_used, read_config_bytes, Interrupt,
    },
    VmmError,
};

/// The virtio device ID of vsock.
pub const DEVICE_TYPE: u32 = 19;
/// rx, tx, event. The guest keeps the whole rx ring posted, a 4 KiB
/// buffer of its RAM for each entry: 64 of them (256 KiB in flight) carry
/// the agent's requests and containers' stdin, where 256 held 1 MiB of
/// every idle guest. tx buffers are only allocated as the guest sends.
const QUEUE_SIZES: &[u16] = &[64, 256, 64];
const TX: usize = 1;
/// The largest payload of one packet to the guest (Linux's own limit).
const MAX_PAYLOAD: usize = 64 * 1024;
/// Host clients that have connected but not yet sent their CONNECT line.
const MAX_PENDING_CLIENTS: usize = 64;

/// The driver's queues while the device runs.
struct Active {
    memory: GuestMemory,
    rx: Queue,
    tx: Queue,
    interrupt: Interrupt,
}

/// A virtio-vsock device with the hybrid Unix-socket backend. See the
/// module documentation for how to wire it.
pub struct Vsock {
    guest_cid: u64,
    listener: HostListener,
    active: Option<Active>,
    /// The queue eventfds, watched on the loop from each activation on.
    queues: LoopQueues,
    pending_clients: HashMap<RawFd, PendingClient>,
    muxer: Muxer,
    scratch: Vec<u8>,
}

impl Vsock {
    /// A device for the guest `guest_cid`, its host side listening at
    /// `uds_path` (a stale socket file there is replaced; the file is
    /// removed when the device is dropped).
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Arc<Mutex<Vsock>>, VmmError> {
        // 0-2 are the hypervisor, local and host; u32::MAX is "any".
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VmmError::Device(format!(
                "vsock guest CID {guest_cid} is reserved"
            )));
        }
        let listener = HostListener::bind(&uds_path)
            .map_err(|e| VmmError::Device(format!("vsock socket {}: {e}", uds_path.display())))?;
        let queues =
            LoopQueues::new().map_err(|e| VmmError::Device(format!("vsock eventfd: {e}")))?;
        Ok(Arc::new(Mutex::new(Vsock {
            guest_cid,
            listener,
            active: None,
            queues,
            pending_clients: HashMap::new(),
            muxer: Muxer::new(guest_cid, uds_path),
            scratch: vec![0; MAX_PAYLOAD],
        })))
    }

    /// The number of open guest connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    fn accept_clients(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok(Some(stream)) if self.pending_clients.len() < MAX_PENDING_CLIENTS => {
                    let client = PendingClient::new(stream);
                    match ops.add(Events::new(&client, EventSet::IN | EventSet::READ_HANG_UP)) {
                        Ok(()) => {
                            self.pending_clients.insert(client.as_raw_fd(), client);
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot watch a vsock client"),
                    }
                }
                Ok(Some(_)) => tracing::warn!("too many vsock clients mid-handshake; refusing one"),
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a vsock client");
                    return;
                }
            }
        }
    }

    fn advance_handshake(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(client) = self.pending_clients.get_mut(&fd) else {
            return;
        };
        let port = match client.read_request() {
            Handshake::Pending => return,
            Handshake::Connect(port) => Some(port),
            Handshake::Failed(why) => {
                tracing::debug!(%why, "vsock client handshake failed");
                None
            }
        };
        let client = self.pending_clients.remove(&fd).expect("looked up above");
        // The connection watches the stream with other interests.
        let _ = ops.remove(Events::empty(&client));
        let Some(port) = port else {
            return;
        };
        if self.active.is_none() {
            // Like a guest port nobody listens on: the client retries.
            tracing::debug!(port, "vsock client refused: the guest driver is not ready");
            return;
        }
        if let Err(why) = self
            .muxer
            .connect_from_host(client.into_stream(), port, ops)
        {
            tracing::warn!(port, %why, "vsock client refused");
        }
    }

    /// Takes every packet the guest queued on tx.
    fn process_tx(&mut self, ops: &mut EventOps) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let muxer = &mut self.muxer;
        let memory = &active.memory;
        drain_tx(
            "vsock",
            &mut active.tx,
            memory,
            &active.interrupt,
            |chain| match read_tx_packet(chain, memory) {
                Ok(packet) => muxer.handle_guest_packet(packet, ops),
                Err(e) => tracing::warn!(error = %e, "malformed vsock tx chain dropped"),
            },
        );
    }

    /// Fills rx buffers while there is something for the guest.
    fn process_rx(&mut self, ops: &mut EventOps) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut returned = false;
        while self.muxer.has_packet_for_guest() {
            let Some(chain) = active.rx.pop_descriptor_chain(&active.memory) else {
                break;
            };
            let head = chain.head_index();
            let used = match RxBuffer::new(chain, &active.memory) {
                Ok(buffer) => {
                    let room = buffer.payload_room().min(MAX_PAYLOAD);
                    let Some(header) = self.muxer.next_packet(room, &mut self.scratch, ops) else {
                        // Nothing after all (the host had no data): keep
                        // the buffer for later.
                        active.rx.go_to_previous_position();
                        break;
                    };
                    let payload = &self.scratch[..header.len as usize];
                    buffer.write(header, payload).unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "cannot write a vsock rx packet");
                        0
                    })
                }
                Err(e) => {
                    tracing::warn!(error = %e, "malformed vsock rx chain dropped");
                    0
                }
            };
            if let Err(e) = active.rx.add_used(&active.memory, head, used) {
                tracing::warn!(error = %e, "cannot return a vsock rx chain");
            }
            returned = true;
        }
        if returned {
            notify_used(&mut active.rx, &active.memory, &active.interrupt);
        }
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!(error = %e, "cannot watch the vsock socket");
        }
        self.queues.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        match self.queues.process(fd, ops) {
            // The event queue is only for transport resets after
            // migration, which never happen here; rx buffers are taken
            // below whenever there is something for the guest.
            Wakeup::Watching | Wakeup::Kicked(TX) => self.process_tx(ops),
            Wakeup::Kicked(_) | Wakeup::Handled => {}
            Wakeup::Other => self.process_host_event(fd, events.event_set(), ops),
        }
        self.process_rx(ops);
    }
}

impl Vsock {
    fn process_host_event(&mut self, fd: RawFd, event_set: EventSet, ops: &mut EventOps) {
        if fd == self.listener.as_raw_fd() {
            self.accept_clients(ops);
        } else if self.pending_clients.contains_key(&fd) {
            self.advance_handshake(fd, ops);
        } else if !self.muxer.handle_host_event(fd, event_set, ops) {
            tracing::debug!(fd, "vsock event for a descriptor no longer watched");
        }
    }
}

impl LoopDevice for Vsock {
    const NAME: &'static str = "vsock";
    const DEVICE_TYPE: u32 = DEVICE_TYPE;
    const QUEUE_MAX_SIZES: &'static [u16] = QUEUE_SIZES;
    /// rx and tx; the event queue is not used.
    type Queues = [Queue; 3];

    fn features(&self) -> u64 {
        // Stream sockets only (no SEQPACKET), no EVENT_IDX.
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn take_queues(_features: u64, queues: Vec<Queue>) -> Result<[Queue; 3], String> {
        <[Queue; 3]>::try_from(queues).map_err(|_| "vsock needs exactly three queues".into())
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn activate(
        &mut self,
        memory: GuestMemory,
        [rx, tx, _event]: [Queue; 3],
        _features: u64,
        interrupt: Interrupt,
    ) -> Result<(), String> {
        self.active = Some(Active {
            memory,
            rx,
            tx,
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) -> Vec<Box<dyn AsRawFd + Send>> {
        self.active = None;
        self.muxer
            .drop_all()
            .into_iter()
            .map(|stream| Box::new(stream) as Box<dyn AsRawFd + Send>)
            .collect()
    }

    fn loop_queues(&mut self) -> &mut LoopQueues {
        &mut self.queues
    }
}
