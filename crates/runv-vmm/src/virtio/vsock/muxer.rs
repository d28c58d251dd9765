//! The connection table: routes guest packets to connections, opens
//! connections both ways, picks the next packet for the guest fairly, and
//! tears connections down (unregistering their streams from the event loop
//! before closing them).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    ops::Bound,
    os::{fd::AsRawFd, fd::RawFd, unix::net::UnixStream},
    path::PathBuf,
};

use event_manager::{EventOps, EventSet, Events};

use super::{
    connection::{ConnKey, Connection, Outgoing, Verdict},
    packet::{Header, Op, TxPacket, HOST_CID, TYPE_STREAM},
    unix::{connect_nonblocking, guest_listener_path},
};

/// The most connections one VM may hold open at once.
pub const MAX_CONNECTIONS: usize = 512;
/// The most RSTs waiting for rx buffers; beyond it (a guest that sends but
/// never gives rx buffers) they are dropped rather than piling up.
const MAX_PENDING_RESETS: usize = 1024;
/// Host ports for host-initiated connections come from here up, as in
/// Firecracker and vhost-device-vsock; guest-initiated ones use the port
/// the guest dialed.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    connections: BTreeMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    /// RSTs for connections that no longer (or never) existed.
    resets: VecDeque<ConnKey>,
    next_local_port: u32,
    /// The connection that sent last, for round-robin.
    last_sender: Option<ConnKey>,
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Muxer {
        Muxer {
            guest_cid,
            uds_path,
            connections: BTreeMap::new(),
            by_fd: HashMap::new(),
            resets: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            last_sender: None,
        }
    }

    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// A host client asked for `guest_port`; its stream is not registered
    /// with the event loop.
    pub fn connect_from_host(
        &mut self,
        stream: UnixStream,
        guest_port: u32,
        ops: &mut EventOps,
    ) -> Result<(), String> {
        if self.connections.len() >= MAX_CONNECTIONS {
            return Err("too many vsock connections".into());
        }
        let key = ConnKey {
            local_port: self.allocate_local_port(guest_port),
            peer_port: guest_port,
        };
        self.insert(Connection::host_initiated(key, self.guest_cid, stream), ops)
    }

    /// Handles a packet from the guest's tx queue.
    pub fn handle_guest_packet(&mut self, packet: TxPacket, ops: &mut EventOps) {
        let TxPacket {
            header,
            mut payload,
        } = packet;
        if header.src_cid != self.guest_cid || header.dst_cid != HOST_CID {
            tracing::debug!(?header, "vsock packet with foreign addresses dropped");
            return;
        }
        let key = ConnKey {
            local_port: header.dst_port,
            peer_port: header.src_port,
        };
        let op = header.op();
        if header.socket_type != TYPE_STREAM {
            if op != Some(Op::Rst) {
                self.queue_reset(key);
            }
            return;
        }
        if let Some(connection) = self.connections.get_mut(&key) {
            let verdict = connection.handle_guest_packet(&header, &mut payload);
            self.apply(key, verdict, ops);
            return;
        }
        match op {
            Some(Op::Request) => self.connect_from_guest(key, &header, ops),
            // Never answer an RST with one.
            Some(Op::Rst) => {}
            _ => self.queue_reset(key),
        }
    }

    /// Handles readiness of a connection's stream; false if `fd` is not one.
    pub fn handle_host_event(&mut self, fd: RawFd, events: EventSet, ops: &mut EventOps) -> bool {
        let Some(&key) = self.by_fd.get(&fd) else {
            return false;
        };
        if let Some(connection) = self.connections.get_mut(&key) {
            let verdict = connection.handle_host_event(events);
            self.apply(key, verdict, ops);
        }
        true
    }

    /// Whether [`Self::next_packet`] may have something now.
    pub fn has_packet_for_guest(&self) -> bool {
        !self.resets.is_empty() || self.connections.values().any(Connection::wants_to_send)
    }

    /// The next packet for the guest, with at most `room` payload bytes in
    /// `scratch`. Pending RSTs go first, then connections take turns.
    pub fn next_packet(
        &mut self,
        room: usize,
        scratch: &mut [u8],
        ops: &mut EventOps,
    ) -> Option<Header> {
        loop {
            if let Some(key) = self.resets.pop_front() {
                return Some(self.reset_header(key));
            }
            let candidates = self.turn_order();
            if candidates.is_empty() {
                return None;
            }
            for key in candidates {
                let Some(connection) = self.connections.get_mut(&key) else {
                    continue;
                };
                match connection.next_packet(room, scratch) {
                    Outgoing::Packet(header) => {
                        self.last_sender = Some(key);
                        if connection.is_finished() {
                            self.remove(key, true, ops);
                        }
                        return Some(header);
                    }
                    Outgoing::Nothing => {}
                    Outgoing::Reset => self.remove(key, true, ops),
                }
            }
            if self.resets.is_empty() {
                return None;
            }
        }
    }

    /// Drops every connection without the event loop (the device is being
    /// reset on a vCPU thread): returns their streams, shut down so their
    /// clients see the end at once, for the loop to unregister and close.
    pub fn drop_all(&mut self) -> Vec<UnixStream> {
        self.by_fd.clear();
        self.resets.clear();
        self.last_sender = None;
        std::mem::take(&mut self.connections)
            .into_values()
            .map(|connection| {
                let stream = connection.into_stream();
                let _ = stream.shutdown(std::net::Shutdown::Both);
                stream
            })
            .collect()
    }

    /// Connections wanting to send, starting after the last one that sent.
    fn turn_order(&self) -> Vec<ConnKey> {
        let wants =
            |(key, connection): (&ConnKey, &Connection)| connection.wants_to_send().then_some(*key);
        match self.last_sender {
            Some(last) => self
                .connections
                .range((Bound::Excluded(last), Bound::Unbounded))
                .chain(self.connections.range(..=last))
                .filter_map(wants)
                .collect(),
            None => self.connections.iter().filter_map(wants).collect(),
        }
    }

    fn connect_from_guest(&mut self, key: ConnKey, header: &Header, ops: &mut EventOps) {
        if self.connections.len() >= MAX_CONNECTIONS {
            tracing::warn!(?key, "too many vsock connections; refusing the guest's");
            self.queue_reset(key);
            return;
        }
        let path = guest_listener_path(&self.uds_path, key.local_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let connection = Connection::guest_initiated(key, self.guest_cid, stream, header);
                if let Err(e) = self.insert(connection, ops) {
                    tracing::warn!(?key, error = %e, "cannot watch a vsock connection");
                    self.queue_reset(key);
                }
            }
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "guest vsock connection refused");
                self.queue_reset(key);
            }
        }
    }

    fn insert(&mut self, connection: Connection, ops: &mut EventOps) -> Result<(), String> {
        // Edge-triggered: the connection remembers readability itself and
        // reads only when the guest can take the bytes.
        let interest =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        ops.add(Events::new(connection.stream(), interest))
            .map_err(|e| e.to_string())?;
        let key = connection.key();
        self.by_fd.insert(connection.stream().as_raw_fd(), key);
        self.connections.insert(key, connection);
        Ok(())
    }

    fn apply(&mut self, key: ConnKey, verdict: Verdict, ops: &mut EventOps) {
        match verdict {
            Verdict::Keep => {}
            Verdict::Reset => self.remove(key, true, ops),
            Verdict::Close => self.remove(key, false, ops),
        }
    }

    fn remove(&mut self, key: ConnKey, reset_guest: bool, ops: &mut EventOps) {
        let Some(connection) = self.connections.remove(&key) else {
            return;
        };
        self.by_fd.remove(&connection.stream().as_raw_fd());
        if let Err(e) = ops.remove(Events::empty(connection.stream())) {
            tracing::debug!(?key, error = %e, "vsock stream was not watched");
        }
        if reset_guest && connection.guest_knows() {
            self.queue_reset(key);
        }
    }

    fn queue_reset(&mut self, key: ConnKey) {
        if self.resets.len() >= MAX_PENDING_RESETS {
            tracing::warn!(
                ?key,
                "too many vsock RSTs waiting for rx buffers; dropping one"
            );
            return;
        }
        self.resets.push_back(key);
    }

    fn reset_header(&self, key: ConnKey) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            socket_type: TYPE_STREAM,
            op: Op::Rst as u16,
            ..Header::default()
        }
    }

    /// A host port no connection to `guest_port` uses.
    fn allocate_local_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            let key = ConnKey {
                local_port: port,
                peer_port: guest_port,
            };
            // At most MAX_CONNECTIONS ports are taken, so this ends.
            if !self.connections.contains_key(&key) {
                return port;
            }
        }
    }
}
