//! The device end to end: a driver plays the guest on virtio-queue's mock
//! rings, a real event loop runs the device, real Unix sockets in a
//! temporary directory are the host side.

use std::{
    collections::{HashMap, VecDeque},
    io::{ErrorKind, Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use virtio_bindings::{virtio_mmio::*, virtio_ring::VRING_DESC_F_NEXT};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{
    connection::BUF_ALLOC,
    packet::{Header, Op, HEADER_LEN, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM},
    Vsock, DEVICE_TYPE,
};
use crate::{
    bus::BusDevice,
    event_loop::EventLoop,
    memory::{create_guest_memory, GuestMemory},
    virtio::{
        mmio::MmioTransport,
        test_driver::{
            activate_directly, mmio_read, mmio_transport, mmio_write, set_up_through_mmio, Ring,
            RING_SIZE as QUEUE_SIZE, WAIT,
        },
        VirtioDevice,
    },
};

const GUEST_CID: u64 = 3;
const MEMORY_SIZE: u64 = 16 << 20;
const RX: usize = 0;
const TX: usize = 1;
/// Linux's rx buffers: 4 KiB of payload after the header.
const RX_BUFFER_LEN: u32 = 4096 + HEADER_LEN as u32;
/// Room for each tx descriptor's data.
const TX_SLOT_LEN: u64 = 0x11000;
const RING_BASES: [u64; 3] = [0x0, 0x10000, 0x20000];
const RX_BUFFERS: u64 = 0x10_0000;
const TX_BUFFERS: u64 = 0x40_0000;
/// How long the driver waits to conclude nothing more is coming.
const QUIET: Duration = Duration::from_millis(200);
/// What the test guest advertises for each connection.
const GUEST_BUF_ALLOC: u32 = 16 * 1024;

/// How the driver reaches the device.
enum Transport {
    /// Activation straight through `VirtioDevice`, kicks through eventfds.
    Direct { queue_events: Vec<EventFd> },
    /// Everything through virtio-mmio registers.
    Mmio(Box<MmioTransport>),
}

/// The guest side of the device.
struct Driver {
    memory: GuestMemory,
    rings: Vec<Ring>,
    transport: Transport,
    device: Arc<Mutex<Vsock>>,
    irq: EventFd,
    socket: PathBuf,
    _dir: tempfile::TempDir,
    event_loop: Option<EventLoop>,
    /// Our view of the device's credit per connection (by guest port):
    /// its buf_alloc and fwd_cnt, and what we sent.
    device_credit: HashMap<u32, (u32, u32, u32)>,
    /// What we consumed per connection, our fwd_cnt.
    consumed: HashMap<u32, u32>,
    /// rx buffers the device filled that we have not looked at yet.
    rx_used: VecDeque<(u16, u32)>,
}

/// The direct way, activated with rx buffers in place.
fn driver() -> Driver {
    driver_with_rx_buffers(16)
}

fn driver_with_rx_buffers(count: usize) -> Driver {
    let mut driver = Driver::unactivated();
    let (rings, queue_events) = activate_directly(
        &mut driver.device.clone(),
        &driver.memory,
        &RING_BASES,
        &driver.irq,
    );
    driver.rings = rings;
    driver.transport = Transport::Direct { queue_events };
    driver.give_rx_buffers(count);
    driver
}

impl Driver {
    fn unactivated() -> Driver {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vsock.sock");
        let device = Vsock::new(GUEST_CID, socket.clone()).unwrap();
        let event_loop = EventLoop::spawn("vsock-test").unwrap();
        event_loop.add_subscriber(device.clone()).unwrap();
        Driver {
            memory: create_guest_memory(MEMORY_SIZE).unwrap(),
            rings: Vec::new(),
            transport: Transport::Direct {
                queue_events: Vec::new(),
            },
            device,
            irq: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            socket,
            _dir: dir,
            event_loop: Some(event_loop),
            device_credit: HashMap::new(),
            consumed: HashMap::new(),
            rx_used: VecDeque::new(),
        }
    }

    fn kick(&mut self, queue: usize) {
        match &mut self.transport {
            Transport::Direct { queue_events } => queue_events[queue].write(1).unwrap(),
            Transport::Mmio(transport) => {
                // The ioeventfd path for tx, the register path for rx.
                if queue == TX {
                    transport.queue_events()[TX].write(1).unwrap();
                } else {
                    transport.write(
                        u64::from(VIRTIO_MMIO_QUEUE_NOTIFY),
                        &(queue as u32).to_le_bytes(),
                    );
                }
            }
        }
    }

    fn give_rx_buffers(&mut self, count: usize) {
        for _ in 0..count {
            self.rings[RX].add_chain_now(&self.memory, &[(RX_BUFFER_LEN, true)], rx_address);
        }
        self.kick(RX);
    }

    /// Sends a packet from guest port `src` to host port `dst`, header and
    /// payload in separate descriptors as Linux does.
    fn send(&mut self, op: Op, src: u32, dst: u32, flags: u32, payload: &[u8]) {
        let header = Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: src,
            dst_port: dst,
            len: payload.len() as u32,
            socket_type: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: self.consumed.get(&src).copied().unwrap_or(0),
        };
        self.send_raw(&header.to_bytes(), payload);
        if op == Op::Rw {
            if let Some(credit) = self.device_credit.get_mut(&src) {
                credit.2 = credit.2.wrapping_add(payload.len() as u32);
            }
        }
    }

    fn send_raw(&mut self, header: &[u8], payload: &[u8]) {
        self.reclaim_tx();
        let mut parts = vec![(header.len() as u32, false)];
        if !payload.is_empty() {
            parts.push((payload.len() as u32, false));
        }
        let indices = self.rings[TX].add_chain(&self.memory, &parts, tx_address);
        self.memory
            .write_slice(header, GuestAddress(tx_address(indices[0])))
            .unwrap();
        if let Some(&index) = indices.get(1) {
            self.memory
                .write_slice(payload, GuestAddress(tx_address(index)))
                .unwrap();
        }
        self.rings[TX].publish(&self.memory, indices[0]);
        self.kick(TX);
    }

    /// Frees the tx descriptors the device is done with, waiting for them if
    /// the ring is nearly full.
    fn reclaim_tx(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            for (head, _) in self.rings[TX].take_used(&self.memory) {
                self.rings[TX].release(head);
            }
            if self.rings[TX].free.len() >= 4 {
                return;
            }
            assert!(Instant::now() < deadline, "tx ring never drained");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits until every tx chain came back, each with length 0.
    fn wait_tx_done(&mut self) {
        let deadline = Instant::now() + WAIT;
        while self.rings[TX].free.len() < usize::from(QUEUE_SIZE) {
            for (head, len) in self.rings[TX].take_used(&self.memory) {
                assert_eq!(len, 0, "the device writes nothing into tx chains");
                self.rings[TX].release(head);
            }
            assert!(Instant::now() < deadline, "tx chains not returned");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The next packet the device put in the rx queue, within `wait`; the
    /// buffer goes straight back to the device.
    fn try_recv(&mut self, wait: Duration) -> Option<(Header, Vec<u8>)> {
        let deadline = Instant::now() + wait;
        loop {
            let used = self.rings[RX].take_used(&self.memory);
            self.rx_used.extend(used);
            if let Some((head, len)) = self.rx_used.pop_front() {
                assert!(len as usize >= HEADER_LEN, "rx packet of {len} bytes");
                let mut bytes = vec![0u8; len as usize];
                self.memory
                    .read_slice(&mut bytes, GuestAddress(rx_address(head)))
                    .unwrap();
                let header = Header::from_bytes(bytes[..HEADER_LEN].try_into().unwrap());
                let payload = bytes.split_off(HEADER_LEN);
                self.rings[RX].release(head);
                assert_eq!(header.len as usize, payload.len());
                assert_eq!((header.src_cid, header.dst_cid), (HOST_CID, GUEST_CID));
                self.device_credit.insert(
                    header.dst_port,
                    (
                        header.buf_alloc,
                        header.fwd_cnt,
                        self.device_credit
                            .get(&header.dst_port)
                            .map_or(0, |credit| credit.2),
                    ),
                );
                self.give_rx_buffers(1);
                return Some((header, payload));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn recv(&mut self) -> (Header, Vec<u8>) {
        self.try_recv(WAIT).expect("a packet for the guest")
    }

    /// Receives a packet and checks its operation and guest port.
    fn expect(&mut self, op: Op, guest_port: u32) -> (Header, Vec<u8>) {
        let (header, payload) = self.recv();
        assert_eq!(
            (header.op(), header.dst_port),
            (Some(op), guest_port),
            "{header:?}"
        );
        (header, payload)
    }

    /// A host client connects to `guest_port` and the guest accepts:
    /// returns the client's stream and the host port.
    fn host_connect(&mut self, guest_port: u32) -> (UnixStream, u32) {
        let mut client = UnixStream::connect(&self.socket).unwrap();
        client.set_read_timeout(Some(WAIT)).unwrap();
        client
            .write_all(format!("CONNECT {guest_port}\n").as_bytes())
            .unwrap();
        let (request, _) = self.expect(Op::Request, guest_port);
        assert!(request.src_port >= 1 << 30);
        assert_eq!(request.buf_alloc, BUF_ALLOC);
        self.send(Op::Response, guest_port, request.src_port, 0, &[]);
        assert_eq!(read_line(&mut client), format!("OK {}", request.src_port));
        (client, request.src_port)
    }

    /// Sends `data` on a connection, in packets no larger than the device's
    /// credit allows, waiting for credit updates when it runs out.
    fn send_respecting_credit(&mut self, guest_port: u32, host_port: u32, data: &[u8]) {
        let mut sent = 0;
        while sent < data.len() {
            let (buf_alloc, fwd_cnt, tx_cnt) = self.device_credit[&guest_port];
            let credit = buf_alloc - tx_cnt.wrapping_sub(fwd_cnt);
            if credit == 0 {
                let (header, _) = self.recv();
                assert_eq!(header.op(), Some(Op::CreditUpdate), "{header:?}");
                continue;
            }
            let chunk = (data.len() - sent).min(credit as usize).min(32 * 1024);
            self.send(Op::Rw, guest_port, host_port, 0, &data[sent..sent + chunk]);
            sent += chunk;
        }
    }

    /// Everything the device sends within QUIET of the previous packet.
    fn drain(&mut self) -> Vec<(Header, Vec<u8>)> {
        std::iter::from_fn(|| self.try_recv(QUIET)).collect()
    }

    fn connection_count(&self) -> usize {
        self.device.lock().unwrap().connection_count()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Stop the loop before the device's memory goes away under it.
        if let Some(event_loop) = self.event_loop.take() {
            event_loop.stop();
        }
    }
}

fn rx_address(index: u16) -> u64 {
    RX_BUFFERS + u64::from(index) * u64::from(RX_BUFFER_LEN)
}

fn tx_address(index: u16) -> u64 {
    TX_BUFFERS + u64::from(index) * TX_SLOT_LEN
}

fn read_line(stream: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap()
}

/// Reads until EOF; panics on a timeout.
fn read_to_eof(stream: &mut UnixStream) -> Vec<u8> {
    let mut data = Vec::new();
    match stream.read_to_end(&mut data) {
        Ok(_) => data,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => data,
        Err(e) => panic!("no EOF: {e}"),
    }
}

/// Compares long byte strings without printing them.
fn assert_same(got: &[u8], expected: &[u8]) {
    let first_difference = got.iter().zip(expected).position(|(a, b)| a != b);
    assert!(
        got.len() == expected.len() && first_difference.is_none(),
        "got {} bytes, expected {}, first difference at {first_difference:?}",
        got.len(),
        expected.len()
    );
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn identifies_itself_as_vsock_with_its_cid() {
    let driver = Driver::unactivated();
    let device = driver.device.clone();
    assert_eq!(device.device_type(), DEVICE_TYPE);
    assert_eq!(device.queue_max_sizes().len(), 3);
    assert_eq!(device.features(), 0);
    let mut config = [0xffu8; 8];
    device.read_config(0, &mut config);
    assert_eq!(config, GUEST_CID.to_le_bytes());
    let mut tail = [0xffu8; 4];
    device.read_config(6, &mut tail);
    assert_eq!(tail, [0, 0, 0, 0]);
    assert!(Vsock::new(2, driver.socket.with_extension("other")).is_err());
}

#[test]
fn host_connects_and_data_flows_both_ways() {
    let mut driver = driver();
    let (mut client, host_port) = driver.host_connect(1024);
    assert_eq!(driver.connection_count(), 1);

    driver.send(Op::Rw, 1024, host_port, 0, b"hello from the guest");
    let mut got = [0u8; 20];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello from the guest");

    client.write_all(b"hello from the host").unwrap();
    let (header, payload) = driver.expect(Op::Rw, 1024);
    assert_eq!(header.src_port, host_port);
    assert_eq!(payload, b"hello from the host");
    assert_eq!(header.fwd_cnt, 20, "the device forwarded the guest's bytes");
    driver.wait_tx_done();
}

#[test]
fn host_to_guest_stops_at_the_guests_credit() {
    let mut driver = driver();
    let (client, host_port) = driver.host_connect(1024);
    let data = pattern(4 * GUEST_BUF_ALLOC as usize + 100);
    let writer = std::thread::spawn({
        let mut client = client.try_clone().unwrap();
        let data = data.clone();
        move || client.write_all(&data).unwrap()
    });
    let mut received = Vec::new();
    while received.len() < data.len() {
        let packets = driver.drain();
        let before = received.len();
        for (header, payload) in packets {
            assert_eq!(header.op(), Some(Op::Rw), "{header:?}");
            received.extend(payload);
        }
        let window = received.len() - before;
        assert!(window > 0, "the device stalled at {} bytes", received.len());
        assert!(
            window <= GUEST_BUF_ALLOC as usize,
            "{window} bytes sent on a {GUEST_BUF_ALLOC}-byte credit"
        );
        // The guest application read it all: tell the device.
        driver.consumed.insert(1024, received.len() as u32);
        driver.send(Op::CreditUpdate, 1024, host_port, 0, &[]);
    }
    writer.join().unwrap();
    assert_same(&received, &data);
}

#[test]
fn guest_to_host_beyond_the_devices_buffer_gets_credit_updates() {
    let mut driver = driver();
    let (mut client, host_port) = driver.host_connect(1024);
    let data = pattern(3 * BUF_ALLOC as usize + 1000);
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; 3 * BUF_ALLOC as usize + 1000];
        client.read_exact(&mut got).unwrap();
        got
    });
    driver.send_respecting_credit(1024, host_port, &data);
    assert_same(&reader.join().unwrap(), &data);
}

#[test]
fn a_guest_that_overruns_its_credit_is_reset() {
    let mut driver = driver();
    let (mut client, host_port) = driver.host_connect(1024);
    // Nobody reads on the host, and the guest ignores the credit.
    let chunk = pattern(32 * 1024);
    let mut reset = None;
    for _ in 0..(BUF_ALLOC as usize / chunk.len()) * 4 + 16 {
        driver.send(Op::Rw, 1024, host_port, 0, &chunk);
        if let Some((header, _)) = driver.try_recv(Duration::from_millis(5)) {
            if header.op() == Some(Op::Rst) {
                reset = Some(header);
                break;
            }
        }
    }
    assert!(reset.is_some(), "never reset");
    assert_eq!(driver.connection_count(), 0);
    // What was delivered before the reset is a prefix of what was sent; the
    // stream then ends.
    let received = read_to_eof(&mut client);
    assert!(received.len() <= 4 * BUF_ALLOC as usize + chunk.len());
}

#[test]
fn guest_reset_closes_the_host_stream() {
    let mut driver = driver();
    let (mut client, host_port) = driver.host_connect(1024);
    driver.send(Op::Rst, 1024, host_port, 0, &[]);
    assert!(read_to_eof(&mut client).is_empty());
    driver.wait_tx_done();
    assert_eq!(driver.connection_count(), 0);
    // An RST is never answered.
    assert!(driver.drain().is_empty());
}

#[test]
fn a_guest_port_nobody_listens_on_closes_the_client() {
    let mut driver = driver();
    let mut client = UnixStream::connect(&driver.socket).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    client.write_all(b"CONNECT 5000\n").unwrap();
    let (request, _) = driver.expect(Op::Request, 5000);
    driver.send(Op::Rst, 5000, request.src_port, 0, &[]);
    assert!(read_to_eof(&mut client).is_empty(), "no OK line");
}

#[test]
fn host_close_shuts_the_connection_down_for_the_guest() {
    let mut driver = driver();
    let (mut client, host_port) = driver.host_connect(1024);
    client.write_all(b"last words").unwrap();
    drop(client);
    let (_, payload) = driver.expect(Op::Rw, 1024);
    assert_eq!(payload, b"last words");
    let (shutdown, _) = driver.expect(Op::Shutdown, 1024);
    assert_eq!(shutdown.src_port, host_port);
    assert_eq!(shutdown.flags & SHUTDOWN_SEND, SHUTDOWN_SEND);
    driver.expect(Op::Rst, 1024);
    assert_eq!(driver.connection_count(), 0);
}

#[test]
fn guest_close_ends_the_host_stream_after_its_data() {
    let mut driver = driver();
    let (mut client, host_port) = driver.host_connect(1024);
    driver.send(Op::Rw, 1024, host_port, 0, b"bye");
    driver.send(
        Op::Shutdown,
        1024,
        host_port,
        SHUTDOWN_RCV | SHUTDOWN_SEND,
        &[],
    );
    assert_eq!(read_to_eof(&mut client), b"bye");
    driver.expect(Op::Rst, 1024);
    assert_eq!(driver.connection_count(), 0);
}

#[test]
fn guest_connects_to_a_host_listener() {
    let mut driver = driver();
    let mut path = driver.socket.clone().into_os_string();
    path.push("_1025");
    let listener = UnixListener::bind(&path).unwrap();
    driver.send(Op::Request, 49152, 1025, 0, &[]);
    let (response, _) = driver.expect(Op::Response, 49152);
    assert_eq!(response.src_port, 1025);
    let (mut server, _) = listener.accept().unwrap();
    server.set_read_timeout(Some(WAIT)).unwrap();

    driver.send(Op::Rw, 49152, 1025, 0, b"READY");
    let mut ready = [0u8; 5];
    server.read_exact(&mut ready).unwrap();
    assert_eq!(&ready, b"READY");
    server.write_all(b"ack").unwrap();
    let (_, payload) = driver.expect(Op::Rw, 49152);
    assert_eq!(payload, b"ack");
}

#[test]
fn guest_connection_to_a_missing_listener_is_reset() {
    let mut driver = driver();
    driver.send(Op::Request, 49153, 1026, 0, &[]);
    let (reset, _) = driver.expect(Op::Rst, 49153);
    assert_eq!(reset.src_port, 1026);
    assert_eq!(driver.connection_count(), 0);
}

#[test]
fn packets_for_unknown_connections_get_a_reset() {
    let mut driver = driver();
    for op in [Op::Rw, Op::Response, Op::Shutdown, Op::CreditRequest] {
        driver.send(op, 7, 8, 0, b"x");
        let (reset, _) = driver.expect(Op::Rst, 7);
        assert_eq!(reset.src_port, 8);
    }
    // Datagram-type packets are refused too.
    let mut header = Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 9,
        dst_port: 10,
        socket_type: 2,
        op: Op::Request as u16,
        ..Header::default()
    };
    driver.send_raw(&header.to_bytes(), &[]);
    driver.expect(Op::Rst, 9);
    // Packets claiming another source CID are dropped without an answer.
    header.socket_type = TYPE_STREAM;
    header.src_cid = 42;
    driver.send_raw(&header.to_bytes(), &[]);
    assert!(driver.drain().is_empty());
}

#[test]
fn malformed_chains_are_consumed_and_the_device_goes_on() {
    let mut driver = driver();
    let valid = Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 1,
        dst_port: 2,
        socket_type: TYPE_STREAM,
        op: Op::Rw as u16,
        ..Header::default()
    }
    .to_bytes();
    let memory = driver.memory.clone();
    let tx = &mut driver.rings[TX];
    // A short header.
    tx.add_chain_now(&memory, &[(HEADER_LEN as u32 - 1, false)], tx_address);
    // The header in a write-only descriptor.
    let indices = tx.add_chain(&memory, &[(HEADER_LEN as u32, true)], tx_address);
    memory
        .write_slice(&valid, GuestAddress(tx_address(indices[0])))
        .unwrap();
    tx.publish(&memory, indices[0]);
    // A buffer outside guest memory.
    tx.add_chain_now(&memory, &[(HEADER_LEN as u32, false)], |_| {
        MEMORY_SIZE + 0x1000
    });
    // A buffer running past the end of guest memory.
    tx.add_chain_now(&memory, &[(0x2000, false)], |_| MEMORY_SIZE - 0x1000);
    // len larger than the payload there is.
    let mut too_long = Header::from_bytes(&valid);
    too_long.len = 1000;
    let indices = tx.add_chain(
        &memory,
        &[(HEADER_LEN as u32, false), (10, false)],
        tx_address,
    );
    memory
        .write_slice(&too_long.to_bytes(), GuestAddress(tx_address(indices[0])))
        .unwrap();
    tx.publish(&memory, indices[0]);
    // A descriptor that chains to itself forever.
    let looping = tx.free.pop().unwrap();
    tx.write_desc(
        &memory,
        looping,
        Descriptor::new(
            tx_address(looping),
            HEADER_LEN as u32,
            VRING_DESC_F_NEXT as u16,
            looping,
        ),
    );
    memory
        .write_slice(&valid, GuestAddress(tx_address(looping)))
        .unwrap();
    tx.chains.insert(looping, vec![looping]);
    tx.publish(&memory, looping);
    // A head index beyond the queue.
    tx.publish(&memory, QUEUE_SIZE + 3);
    driver.kick(TX);

    // Every chain comes back except the out-of-range head, which cannot.
    let deadline = Instant::now() + WAIT;
    let mut returned = Vec::new();
    while returned.len() < 6 {
        returned.extend(driver.rings[TX].take_used(&driver.memory));
        assert!(Instant::now() < deadline, "only {returned:?} came back");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(returned.iter().all(|&(_, len)| len == 0));
    // The looping chain parsed as a packet for an unknown connection.
    let resets = driver.drain();
    assert!(resets
        .iter()
        .all(|(header, _)| header.op() == Some(Op::Rst) && header.dst_port == 1));

    // The device still works: a whole connection goes through.
    let (mut client, host_port) = driver.host_connect(1024);
    driver.send(Op::Rw, 1024, host_port, 0, b"still alive");
    let mut got = [0u8; 11];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"still alive");
}

#[test]
fn an_rx_buffer_too_small_for_a_header_is_returned_empty() {
    let mut driver = driver_with_rx_buffers(0);
    let memory = driver.memory.clone();
    let rx = &mut driver.rings[RX];
    let small = rx.add_chain_now(&memory, &[(HEADER_LEN as u32 - 4, true)], rx_address);
    // A device-readable "rx buffer" is no use either.
    let readable = rx.add_chain_now(&memory, &[(RX_BUFFER_LEN, false)], rx_address);
    let good = rx.add_chain_now(&memory, &[(RX_BUFFER_LEN, true)], rx_address);
    driver.kick(RX);
    driver.send(Op::Rw, 7, 8, 0, b"x");
    let deadline = Instant::now() + WAIT;
    let mut returned = Vec::new();
    while returned.len() < 3 {
        returned.extend(driver.rings[RX].take_used(&memory));
        assert!(Instant::now() < deadline, "only {returned:?} came back");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        returned,
        vec![
            (small[0], 0),
            (readable[0], 0),
            (good[0], HEADER_LEN as u32)
        ]
    );
    let mut bytes = [0u8; HEADER_LEN];
    memory
        .read_slice(&mut bytes, GuestAddress(rx_address(good[0])))
        .unwrap();
    assert_eq!(Header::from_bytes(&bytes).op(), Some(Op::Rst));
}

#[test]
fn an_avail_index_beyond_the_queue_size_is_refused() {
    let mut driver = driver();
    let memory = driver.memory.clone();
    let tx = &mut driver.rings[TX];
    tx.next_avail = QUEUE_SIZE + 1;
    memory
        .write_obj(tx.next_avail, tx.avail.unchecked_add(2))
        .unwrap();
    driver.kick(TX);
    std::thread::sleep(QUIET);
    assert!(driver.rings[TX].take_used(&memory).is_empty());
    // The rest of the device is unharmed: host clients still reach the guest.
    let _client = UnixStream::connect(&driver.socket)
        .and_then(|mut client| client.write_all(b"CONNECT 1024\n").map(|()| client))
        .unwrap();
    driver.expect(Op::Request, 1024);
}

#[test]
fn reset_drops_every_connection() {
    let mut driver = driver();
    let (mut first, _) = driver.host_connect(1024);
    let (mut second, _) = driver.host_connect(1025);
    assert_eq!(driver.connection_count(), 2);
    driver.device.clone().reset();
    assert_eq!(driver.connection_count(), 0);
    assert!(read_to_eof(&mut first).is_empty());
    assert!(read_to_eof(&mut second).is_empty());
    // With the driver gone, new clients are turned away.
    let mut late = UnixStream::connect(&driver.socket).unwrap();
    late.set_read_timeout(Some(WAIT)).unwrap();
    late.write_all(b"CONNECT 1024\n").unwrap();
    assert!(read_to_eof(&mut late).is_empty());
}

#[test]
fn dropping_the_device_removes_its_socket() {
    let driver = driver();
    let socket = driver.socket.clone();
    assert!(socket.exists());
    drop(driver);
    assert!(!socket.exists());
}

/// The whole path a guest takes: virtio-mmio registers for discovery,
/// features and queues, DRIVER_OK, then kicks through the transport.
#[test]
fn works_through_the_mmio_transport() {
    let mut driver = Driver::unactivated();
    let mut transport = mmio_transport(
        Box::new(driver.device.clone()),
        &driver.memory,
        &driver.irq,
        DEVICE_TYPE,
    );
    let (read, write) = (mmio_read, mmio_write);
    let mut cid = [0u8; 8];
    transport.read(u64::from(VIRTIO_MMIO_CONFIG), &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    write(&mut transport, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        read(&mut transport, VIRTIO_MMIO_DEVICE_FEATURES),
        1,
        "VERSION_1 only"
    );
    // rx and event rings the guest keeps posted are small; tx is not.
    for (queue, size) in [(0, 64), (1, 256), (2, 64)] {
        write(&mut transport, VIRTIO_MMIO_QUEUE_SEL, queue);
        assert_eq!(read(&mut transport, VIRTIO_MMIO_QUEUE_NUM_MAX), size);
    }
    driver.rings = set_up_through_mmio(&mut transport, &driver.memory, 0, &RING_BASES);
    driver.transport = Transport::Mmio(Box::new(transport));
    driver.give_rx_buffers(8);

    let (mut client, host_port) = driver.host_connect(1024);
    driver.send(Op::Rw, 1024, host_port, 0, b"over mmio");
    let mut got = [0u8; 9];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"over mmio");
    assert!(
        driver.irq.read().unwrap() > 0,
        "used buffers raised the interrupt"
    );
    let Transport::Mmio(transport) = &mut driver.transport else {
        unreachable!()
    };
    assert_ne!(
        read(transport, VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_VRING,
        0
    );

    // A driver reset through the status register drops the connection.
    write(transport, VIRTIO_MMIO_STATUS, 0);
    assert!(read_to_eof(&mut client).is_empty());
    assert_eq!(driver.connection_count(), 0);
}
