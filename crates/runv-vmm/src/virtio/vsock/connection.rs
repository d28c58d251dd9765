//! One stream connection between a guest port and a host Unix stream: the
//! connection states of virtio spec 5.10.6.4-6, credit flow control both
//! ways, and non-blocking host I/O.
//!
//! Guest to host, bytes wait in a buffer no larger than the credit we
//! advertise ([`BUF_ALLOC`]); a guest that sends beyond it is reset. Host to
//! guest, bytes are read from the stream only when the guest has both
//! credit and an rx buffer for them, so nothing is buffered on that side.

use std::{
    collections::VecDeque,
    io::{self, IoSlice, Read, Write},
    net::Shutdown,
    num::Wrapping,
    os::unix::net::UnixStream,
};

use event_manager::EventSet;

use super::{
    packet::{Header, Op, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM},
    unix::connect_reply,
};

/// The bytes each connection buffers on their way to the host: the credit
/// the guest gets.
pub const BUF_ALLOC: u32 = 128 * 1024;
/// Tell the guest about freed buffer space once this much was freed: often
/// enough that a sender waiting for credit never stalls for long, rarely
/// enough not to double the packet count.
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

/// A connection's address: host port, guest port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

/// What the connection table must do after an event.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Tear down and tell the guest with an RST.
    Reset,
    /// Tear down silently: the guest reset it.
    Close,
}

/// The next packet for the guest, if any.
pub enum Outgoing {
    /// A packet; for RW its payload is in the scratch buffer.
    Packet(Header),
    Nothing,
    /// The connection broke; tear it down with an RST.
    Reset,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: waiting for the guest's RESPONSE.
    Requesting,
    Established,
}

pub struct Connection {
    key: ConnKey,
    guest_cid: u64,
    stream: UnixStream,
    state: State,
    /// Whether any packet of this connection reached the guest: only then
    /// does tearing it down need an RST.
    guest_knows: bool,
    request_pending: bool,
    response_pending: bool,
    credit_update_pending: bool,
    /// SHUTDOWN flags still to send to the guest.
    shutdown_pending: u32,

    // Guest to host.
    to_host: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    fwd_cnt_told: Wrapping<u32>,
    guest_stopped_sending: bool,
    host_write_shut: bool,
    host_stopped_receiving: bool,

    // Host to guest.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    tx_cnt: Wrapping<u32>,
    host_readable: bool,
    host_stopped_sending: bool,
    guest_stopped_receiving: bool,
}

impl Connection {
    /// A host client asked for guest port `key.peer_port`: a REQUEST goes out.
    pub fn host_initiated(key: ConnKey, guest_cid: u64, stream: UnixStream) -> Connection {
        let mut connection = Connection::new(key, guest_cid, stream, State::Requesting);
        connection.request_pending = true;
        connection
    }

    /// The guest's REQUEST `header` reached a host server on `stream`: a
    /// RESPONSE goes out.
    pub fn guest_initiated(
        key: ConnKey,
        guest_cid: u64,
        stream: UnixStream,
        header: &Header,
    ) -> Connection {
        let mut connection = Connection::new(key, guest_cid, stream, State::Established);
        connection.guest_knows = true;
        connection.response_pending = true;
        connection.update_peer_credit(header);
        connection
    }

    fn new(key: ConnKey, guest_cid: u64, stream: UnixStream, state: State) -> Connection {
        Connection {
            key,
            guest_cid,
            stream,
            state,
            guest_knows: false,
            request_pending: false,
            response_pending: false,
            credit_update_pending: false,
            shutdown_pending: 0,
            to_host: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            guest_stopped_sending: false,
            host_write_shut: false,
            host_stopped_receiving: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            // A new stream may hold data already; edge-triggered epoll
            // would not say so.
            host_readable: true,
            host_stopped_sending: false,
            guest_stopped_receiving: false,
        }
    }

    pub fn key(&self) -> ConnKey {
        self.key
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    pub fn guest_knows(&self) -> bool {
        self.guest_knows
    }

    /// Handles a packet the guest sent on this connection; `payload` holds
    /// exactly `header.len` bytes.
    pub fn handle_guest_packet(&mut self, header: &Header, payload: &mut impl Read) -> Verdict {
        self.update_peer_credit(header);
        let established = self.state == State::Established;
        match header.op() {
            Some(Op::Rst) => return Verdict::Close,
            Some(Op::Response) if !established => {
                if !self.greet_host() {
                    return Verdict::Reset;
                }
                self.state = State::Established;
            }
            Some(Op::Rw) if established => {
                if !self.receive_data(header.len, payload) {
                    return Verdict::Reset;
                }
            }
            Some(Op::Shutdown) if established => self.guest_shut_down(header.flags),
            Some(Op::CreditRequest) => self.credit_update_pending = true,
            Some(Op::CreditUpdate) => {}
            op => {
                tracing::debug!(?op, key = ?self.key, "vsock packet out of place; resetting");
                return Verdict::Reset;
            }
        }
        self.verdict()
    }

    /// Handles readiness of the host stream.
    pub fn handle_host_event(&mut self, events: EventSet) -> Verdict {
        let hung_up = events.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if self.state == State::Requesting && (hung_up || events.contains(EventSet::READ_HANG_UP)) {
            // The client gave up before the guest answered.
            return Verdict::Reset;
        }
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP) || hung_up {
            self.host_readable = true;
        }
        if hung_up {
            self.host_stops_receiving();
        } else if events.contains(EventSet::OUT) {
            self.flush_to_host();
        }
        self.verdict()
    }

    /// Whether [`Self::next_packet`] may have something now.
    pub fn wants_to_send(&self) -> bool {
        self.request_pending
            || self.response_pending
            || (self.state == State::Established
                && (self.credit_update_pending
                    || self.shutdown_pending != 0
                    || (self.can_read_host() && self.peer_credit() > 0)))
    }

    /// The next packet for the guest, with at most `room` payload bytes,
    /// which it reads into `scratch`.
    pub fn next_packet(&mut self, room: usize, scratch: &mut [u8]) -> Outgoing {
        if self.request_pending {
            self.request_pending = false;
            return Outgoing::Packet(self.header(Op::Request, 0, 0));
        }
        if self.response_pending {
            self.response_pending = false;
            return Outgoing::Packet(self.header(Op::Response, 0, 0));
        }
        if self.state != State::Established {
            return Outgoing::Nothing;
        }
        let want = room.min(scratch.len()).min(self.peer_credit() as usize);
        if self.can_read_host() && want > 0 {
            match self.read_host(&mut scratch[..want]) {
                Ok(Some(read)) => {
                    self.tx_cnt += read as u32;
                    return Outgoing::Packet(self.header(Op::Rw, 0, read as u32));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(key = ?self.key, error = %e, "host stream failed");
                    return Outgoing::Reset;
                }
            }
        }
        if self.shutdown_pending != 0 {
            let flags = std::mem::take(&mut self.shutdown_pending);
            return Outgoing::Packet(self.header(Op::Shutdown, flags, 0));
        }
        if self.credit_update_pending {
            return Outgoing::Packet(self.header(Op::CreditUpdate, 0, 0));
        }
        Outgoing::Nothing
    }

    /// Whether no byte can flow either way any more: time for an RST.
    pub fn is_finished(&self) -> bool {
        let to_host_done =
            self.host_stopped_receiving || (self.guest_stopped_sending && self.to_host.is_empty());
        let to_guest_done = self.guest_stopped_receiving
            || (self.host_stopped_sending && self.shutdown_pending & SHUTDOWN_SEND == 0);
        self.state == State::Established && to_host_done && to_guest_done
    }

    fn verdict(&self) -> Verdict {
        if self.is_finished() {
            Verdict::Reset
        } else {
            Verdict::Keep
        }
    }

    fn header(&mut self, op: Op, flags: u32, len: u32) -> Header {
        self.guest_knows = true;
        // Every packet carries our credit, so none is owed after it.
        self.fwd_cnt_told = self.fwd_cnt;
        self.credit_update_pending = false;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len,
            socket_type: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    fn update_peer_credit(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = Wrapping(header.fwd_cnt);
    }

    /// What the guest can still take: its buffer less what is in flight.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_read_host(&self) -> bool {
        self.host_readable && !self.host_stopped_sending && !self.guest_stopped_receiving
    }

    /// Tells the host client its connection is up. The socket is fresh and
    /// empty, so the short line goes out in one write or the client is
    /// broken.
    fn greet_host(&mut self) -> bool {
        let reply = connect_reply(self.key.local_port);
        match self.stream.write(reply.as_bytes()) {
            Ok(written) if written == reply.len() => true,
            result => {
                tracing::debug!(key = ?self.key, ?result, "cannot answer the host client");
                false
            }
        }
    }

    /// Takes `len` bytes from the guest. False when the guest overran the
    /// credit it was given.
    fn receive_data(&mut self, len: u32, payload: &mut impl Read) -> bool {
        if self.guest_stopped_sending {
            tracing::debug!(key = ?self.key, "guest sent data after shutting down its sending side");
            return false;
        }
        if self.host_stopped_receiving {
            // Nobody will read it; the guest has been told with a SHUTDOWN.
            return true;
        }
        if self.to_host.len() + len as usize > BUF_ALLOC as usize {
            tracing::warn!(key = ?self.key, len, buffered = self.to_host.len(), "guest overran its vsock credit");
            return false;
        }
        if let Err(e) = io::copy(&mut payload.take(u64::from(len)), &mut self.to_host) {
            // The payload was bounds-checked when the packet was parsed.
            tracing::warn!(key = ?self.key, error = %e, "cannot read a vsock payload");
            return false;
        }
        self.flush_to_host();
        true
    }

    /// Writes what the host can take now. A write to a closed peer fails
    /// with EPIPE rather than killing the process: Rust programs ignore
    /// SIGPIPE.
    fn flush_to_host(&mut self) {
        while !self.to_host.is_empty() && !self.host_stopped_receiving {
            let (front, back) = self.to_host.as_slices();
            match self
                .stream
                .write_vectored(&[IoSlice::new(front), IoSlice::new(back)])
            {
                Ok(written) => {
                    self.to_host.drain(..written);
                    self.fwd_cnt += written as u32;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(key = ?self.key, error = %e, "host stopped reading");
                    self.host_stops_receiving();
                }
            }
        }
        if self.guest_stopped_sending && self.to_host.is_empty() && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        if (self.fwd_cnt - self.fwd_cnt_told).0 >= CREDIT_UPDATE_THRESHOLD {
            self.credit_update_pending = true;
        }
    }

    fn host_stops_receiving(&mut self) {
        if !self.host_stopped_receiving {
            self.host_stopped_receiving = true;
            self.to_host = VecDeque::new();
            self.shutdown_pending |= SHUTDOWN_RCV;
        }
    }

    /// Reads host bytes; `None` when none are there now or the host reached
    /// its end (then a SHUTDOWN is due).
    fn read_host(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            return match self.stream.read(buf) {
                Ok(0) => {
                    self.host_stopped_sending = true;
                    self.shutdown_pending |= SHUTDOWN_SEND;
                    Ok(None)
                }
                Ok(read) => Ok(Some(read)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.host_readable = false;
                    Ok(None)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
        }
    }

    fn guest_shut_down(&mut self, flags: u32) {
        if flags & SHUTDOWN_RCV != 0 && !self.guest_stopped_receiving {
            self.guest_stopped_receiving = true;
            // The host's writes now fail instead of filling a dead socket.
            let _ = self.stream.shutdown(Shutdown::Read);
        }
        if flags & SHUTDOWN_SEND != 0 {
            self.guest_stopped_sending = true;
            self.flush_to_host();
        }
    }
}
