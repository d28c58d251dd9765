//! The seed corpus of every target: realistic inputs the fuzzer starts
//! from, written to fuzz/corpus/<target>/ by `cargo run --example
//! make_seeds` (scripts/fuzz --seeds).

use protobuf::Message;
use runv_protocol::{agent, port_forward, stdio};

use crate::{
    script::Script,
    virtio::{publish_chain, Part},
};

/// A target's seeds: file name and contents.
pub type Seeds = Vec<(&'static str, Vec<u8>)>;

/// Every target's seeds, by target name.
pub fn all() -> Vec<(&'static str, Seeds)> {
    vec![
        ("virtio_blk", virtio_blk()),
        ("virtio_net", virtio_net()),
        ("virtio_vsock", virtio_vsock()),
        ("virtio_fs", virtio_fs()),
        ("mmio_pci", mmio_pci()),
        ("agent_replies", agent_replies()),
        ("host_requests", host_requests()),
        ("vfio_pci", vfio_pci()),
    ]
}

/// `struct virtio_blk_outhdr`: type, reserved, sector.
fn blk_header(request_type: u32, sector: u64) -> Vec<u8> {
    let mut header = request_type.to_le_bytes().to_vec();
    header.extend_from_slice(&[0; 4]);
    header.extend_from_slice(&sector.to_le_bytes());
    header
}

/// A discard or write-zeroes range: sector, sectors, flags.
fn blk_range(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut range = sector.to_le_bytes().to_vec();
    range.extend_from_slice(&sectors.to_le_bytes());
    range.extend_from_slice(&flags.to_le_bytes());
    range
}

fn virtio_blk() -> Seeds {
    let one = |parts: &[Part]| publish_chain(Script::new(), 0, 0, parts).into_bytes();
    let read = blk_header(0, 1);
    let write = blk_header(1, 2);
    let data = [0x5a; 512];
    let flush = blk_header(4, 0);
    let get_id = blk_header(8, 0);
    let discard = blk_header(11, 0);
    let write_zeroes = blk_header(13, 0);
    let range = blk_range(4, 2, 0);
    let unmap_range = blk_range(8, 1, 1);
    vec![
        (
            "read",
            one(&[Part::Read(&read), Part::Write(512), Part::Write(1)]),
        ),
        (
            "write",
            one(&[Part::Read(&write), Part::Read(&data), Part::Write(1)]),
        ),
        ("flush", one(&[Part::Read(&flush), Part::Write(1)])),
        (
            "get_id",
            one(&[Part::Read(&get_id), Part::Write(20), Part::Write(1)]),
        ),
        (
            "discard",
            one(&[Part::Read(&discard), Part::Read(&range), Part::Write(1)]),
        ),
        (
            "write_zeroes",
            one(&[
                Part::Read(&write_zeroes),
                Part::Read(&unmap_range),
                Part::Write(1),
            ]),
        ),
        (
            "write_then_read",
            publish_chain(
                publish_chain(
                    Script::new(),
                    0,
                    0,
                    &[Part::Read(&write), Part::Read(&data), Part::Write(1)],
                ),
                0,
                1,
                &[
                    Part::Read(&blk_header(0, 2)),
                    Part::Write(512),
                    Part::Write(1),
                ],
            )
            .into_bytes(),
        ),
    ]
}

/// `virtio_net_hdr_v1` (no offloads, one buffer) and a small Ethernet frame.
fn net_frame() -> Vec<u8> {
    let mut frame = vec![0u8; 12];
    frame[10] = 1; // num_buffers
    frame.extend_from_slice(&[0xff; 6]); // broadcast
    frame.extend_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    frame.extend_from_slice(&[0x08, 0x06]); // ARP
    frame.extend_from_slice(&[0xa5; 46]);
    frame
}

fn virtio_net() -> Seeds {
    const RX: u8 = 0;
    const TX: u8 = 1;
    const FROM_TAP: u8 = 0;
    const DRAIN_TAP: u8 = 1;
    let frame = net_frame();
    let (header, body) = frame.split_at(12);
    let rx = |script, index| publish_chain(script, RX, index, &[Part::Write(1024)]);
    vec![
        (
            "transmit",
            publish_chain(Script::new(), TX, 0, &[Part::Read(&frame)])
                .host(DRAIN_TAP, &[])
                .into_bytes(),
        ),
        (
            "transmit_split_header",
            publish_chain(
                Script::new(),
                TX,
                0,
                &[Part::Read(header), Part::Read(body)],
            )
            .host(DRAIN_TAP, &[])
            .into_bytes(),
        ),
        (
            "receive",
            rx(Script::new(), 0).host(FROM_TAP, &frame).into_bytes(),
        ),
        (
            "receive_before_buffers",
            rx(Script::new().host(FROM_TAP, &frame), 0).into_bytes(),
        ),
        (
            "receive_merged",
            publish_chain(Script::new(), RX, 0, &[Part::Write(40)])
                .host(FROM_TAP, &frame)
                .kick(RX)
                .into_bytes(),
        ),
    ]
}

/// `struct virtio_vsock_hdr` from the guest (CID 3) to the host (CID 2).
fn vsock_packet(src_port: u32, dst_port: u32, op: u16, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut packet = 3u64.to_le_bytes().to_vec();
    packet.extend_from_slice(&2u64.to_le_bytes());
    packet.extend_from_slice(&src_port.to_le_bytes());
    packet.extend_from_slice(&dst_port.to_le_bytes());
    packet.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    packet.extend_from_slice(&1u16.to_le_bytes()); // stream
    packet.extend_from_slice(&op.to_le_bytes());
    packet.extend_from_slice(&flags.to_le_bytes());
    packet.extend_from_slice(&(64u32 << 10).to_le_bytes()); // buf_alloc
    packet.extend_from_slice(&0u32.to_le_bytes()); // fwd_cnt
    packet.extend_from_slice(payload);
    packet
}

fn virtio_vsock() -> Seeds {
    const RX: u8 = 0;
    const TX: u8 = 1;
    const REQUEST: u16 = 1;
    const RESPONSE: u16 = 2;
    const RST: u16 = 3;
    const SHUTDOWN: u16 = 4;
    const RW: u16 = 5;
    const CREDIT_UPDATE: u16 = 6;
    const CREDIT_REQUEST: u16 = 7;
    const NEW_CLIENT: u8 = 0;
    const CLIENT_SENDS: u8 = 1;
    const SERVER_ACCEPTS: u8 = 2;
    const CLOSE_OLDEST: u8 = 3;
    let guest = 49_152;
    let host = 1024;
    let send = |script, index, op, flags, payload: &[u8]| {
        publish_chain(
            script,
            TX,
            index,
            &[Part::Read(&vsock_packet(guest, host, op, flags, payload))],
        )
    };
    let rx = |script, index| publish_chain(script, RX, index, &[Part::Write(1024)]);
    let connected = || send(rx(Script::new(), 0), 0, REQUEST, 0, &[]).host(SERVER_ACCEPTS, &[]);
    vec![
        ("guest_connects", connected().into_bytes()),
        (
            "guest_sends",
            send(connected(), 1, RW, 0, b"ping")
                .host(SERVER_ACCEPTS, &[])
                .into_bytes(),
        ),
        (
            "host_answers",
            rx(send(connected(), 1, RW, 0, b"ping"), 1)
                .host(CLIENT_SENDS, b"pong")
                .into_bytes(),
        ),
        (
            "guest_shuts_down",
            send(send(connected(), 1, SHUTDOWN, 3, &[]), 2, RST, 0, &[]).into_bytes(),
        ),
        (
            "credit",
            send(
                send(connected(), 1, CREDIT_REQUEST, 0, &[]),
                2,
                CREDIT_UPDATE,
                0,
                &[],
            )
            .into_bytes(),
        ),
        (
            "host_connects",
            rx(rx(Script::new(), 0), 1)
                .host(NEW_CLIENT, b"CONNECT 52\n")
                .into_bytes(),
        ),
        (
            "host_connects_and_guest_accepts",
            send(
                rx(Script::new(), 0).host(NEW_CLIENT, b"CONNECT 52\n"),
                0,
                RESPONSE,
                0,
                &[],
            )
            .host(CLIENT_SENDS, b"data")
            .host(CLOSE_OLDEST, &[])
            .into_bytes(),
        ),
    ]
}

/// A FUSE request: `fuse_in_header` for node 1 (the root), then `body`.
fn fuse_request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut request = ((40 + body.len()) as u32).to_le_bytes().to_vec();
    request.extend_from_slice(&opcode.to_le_bytes());
    request.extend_from_slice(&unique.to_le_bytes());
    request.extend_from_slice(&nodeid.to_le_bytes());
    request.extend_from_slice(&[0; 16]); // uid, gid, pid, total_extlen, padding
    request.extend_from_slice(body);
    request
}

fn virtio_fs() -> Seeds {
    const HIPRIO: u8 = 0;
    const REQUESTS: u8 = 1;
    const LOOKUP: u32 = 1;
    const FORGET: u32 = 2;
    const GETATTR: u32 = 3;
    const OPEN: u32 = 14;
    const READ: u32 = 15;
    const MKDIR: u32 = 9;
    const INIT: u32 = 26;
    const OPENDIR: u32 = 27;
    const READDIR: u32 = 28;
    let mut init = 7u32.to_le_bytes().to_vec(); // major
    init.extend_from_slice(&31u32.to_le_bytes()); // minor
    init.extend_from_slice(&(128u32 << 10).to_le_bytes()); // max_readahead
    init.extend_from_slice(&0u32.to_le_bytes()); // flags
    let init = fuse_request(INIT, 1, 0, &init);
    let request = |script, index, bytes: &[u8]| {
        publish_chain(
            script,
            REQUESTS,
            index,
            &[Part::Read(bytes), Part::Write(1024)],
        )
    };
    let initialised = || request(Script::new(), 0, &init);
    // fuse_read_in: fh, offset, size, read_flags, lock_owner, flags, padding.
    let mut read = vec![0u8; 40];
    read[16..20].copy_from_slice(&512u32.to_le_bytes());
    let mut open = vec![0u8; 8];
    open[0..4].copy_from_slice(&(libc::O_RDONLY as u32).to_le_bytes());
    vec![
        ("init", initialised().into_bytes()),
        (
            "lookup_getattr",
            request(
                request(initialised(), 1, &fuse_request(LOOKUP, 2, 1, b"file\0")),
                2,
                &fuse_request(GETATTR, 3, 2, &[0; 16]),
            )
            .into_bytes(),
        ),
        (
            "open_read",
            request(
                request(
                    request(initialised(), 1, &fuse_request(LOOKUP, 2, 1, b"file\0")),
                    2,
                    &fuse_request(OPEN, 3, 2, &open),
                ),
                3,
                &fuse_request(READ, 4, 2, &read),
            )
            .into_bytes(),
        ),
        (
            "readdir",
            request(
                request(initialised(), 1, &fuse_request(OPENDIR, 2, 1, &open)),
                2,
                &fuse_request(READDIR, 3, 1, &read),
            )
            .into_bytes(),
        ),
        (
            "mkdir_refused",
            request(
                initialised(),
                1,
                &fuse_request(MKDIR, 2, 1, &[0xed, 1, 0, 0, 0, 0, 0, 0, b'n', 0]),
            )
            .into_bytes(),
        ),
        (
            "forget",
            publish_chain(
                initialised(),
                HIPRIO,
                0,
                &[Part::Read(&fuse_request(FORGET, 0, 2, &1u64.to_le_bytes()))],
            )
            .into_bytes(),
        ),
    ]
}

/// One access of the mmio_pci and vfio_pci targets: a read or write of
/// `size` bytes (an index into their size table) at `address`, which the
/// target maps onto the MMIO window or the PCI ports.
fn bus_access(write: bool, ports: bool, size: u8, address: u16, value: u64) -> Vec<u8> {
    let mut bytes = vec![u8::from(write) | u8::from(ports) << 1 | size << 2];
    bytes.extend_from_slice(&address.to_le_bytes());
    bytes.extend_from_slice(&value.to_le_bytes());
    bytes
}

/// A 4-byte access at `offset` of the mmio_pci target's virtio-mmio window
/// (at 0x1000) or PCI ports (at 0xcf8).
fn access(write: bool, ports: bool, offset: u64, value: u32) -> Vec<u8> {
    let address = if ports {
        0xcf8 - 0xcf0 + offset
    } else {
        0x1000 - 0x800 + offset
    };
    bus_access(write, ports, 2, address as u16, u64::from(value))
}

/// PCI configuration accesses to device 1: latch `register`, then read
/// or write its 4 bytes.
fn config_access(register: u32, write: Option<u32>) -> Vec<u8> {
    let mut bytes = access(true, true, 0, 0x8000_0000 | 1 << 11 | register << 2);
    bytes.extend(access(write.is_some(), true, 4, write.unwrap_or(0)));
    bytes
}

fn mmio_pci() -> Seeds {
    use virtio_bindings::virtio_mmio::*;
    let mmio_write = |offset, value| access(true, false, u64::from(offset), value);
    let mmio_read = |offset| access(false, false, u64::from(offset), 0);
    let mut driver = Vec::new();
    for (offset, value) in [
        (VIRTIO_MMIO_STATUS, 3),
        (VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1),
        (VIRTIO_MMIO_DRIVER_FEATURES, 1),
        (VIRTIO_MMIO_STATUS, 11),
        (VIRTIO_MMIO_QUEUE_SEL, 0),
        (VIRTIO_MMIO_QUEUE_NUM, 16),
        (VIRTIO_MMIO_QUEUE_DESC_LOW, 0),
        (VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x100),
        (VIRTIO_MMIO_QUEUE_USED_LOW, 0x200),
        (VIRTIO_MMIO_QUEUE_READY, 1),
        (VIRTIO_MMIO_QUEUE_SEL, 1),
        (VIRTIO_MMIO_QUEUE_NUM, 16),
        (VIRTIO_MMIO_QUEUE_DESC_LOW, 0x400),
        (VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x500),
        (VIRTIO_MMIO_QUEUE_USED_LOW, 0x600),
        (VIRTIO_MMIO_QUEUE_READY, 1),
        (VIRTIO_MMIO_STATUS, 15),
        (VIRTIO_MMIO_QUEUE_NOTIFY, 1),
    ] {
        driver.extend(mmio_write(offset, value));
    }
    let mut probe = Vec::new();
    for offset in [
        VIRTIO_MMIO_MAGIC_VALUE,
        VIRTIO_MMIO_DEVICE_ID,
        VIRTIO_MMIO_DEVICE_FEATURES,
        VIRTIO_MMIO_QUEUE_NUM_MAX,
        VIRTIO_MMIO_CONFIG,
        VIRTIO_MMIO_CONFIG + 4,
    ] {
        probe.extend(mmio_read(offset));
    }
    // Device 1's vendor ID, then the sizing of each of its BARs.
    let mut pci = config_access(0, None);
    for register in 4..10 {
        pci.extend(config_access(register, None));
        pci.extend(config_access(register, Some(u32::MAX)));
        pci.extend(config_access(register, None));
    }
    vec![("driver", driver), ("probe", probe), ("pci_bars", pci)]
}

/// A ttrpc frame: length, stream ID, type, flags (big-endian), payload.
fn ttrpc_frame(stream_id: u32, message_type: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&stream_id.to_be_bytes());
    frame.extend_from_slice(&[message_type, 0]);
    frame.extend_from_slice(payload);
    frame
}

/// What the agent sends for the shim's first call: the handshake reply
/// for `port`, then the ttrpc response frame with `response` or `status`.
fn agent_answer(
    call: u8,
    response: &dyn protobuf::MessageDyn,
    status: Option<ttrpc::proto::Status>,
) -> Vec<u8> {
    const RESPONSE: u8 = 2;
    let mut envelope = ttrpc::proto::Response::new();
    match status {
        Some(status) => envelope.status = protobuf::MessageField::some(status),
        None => {
            envelope.payload = response
                .write_to_bytes_dyn()
                .expect("an encodable response")
        }
    }
    let mut input = vec![call];
    input.extend_from_slice(format!("OK {}\n", runv_protocol::AGENT_VSOCK_PORT).as_bytes());
    input.extend(ttrpc_frame(
        1,
        RESPONSE,
        &envelope.write_to_bytes().expect("an encodable envelope"),
    ));
    input
}

fn agent_replies() -> Seeds {
    let port_forward = |reply: &Result<(), String>| {
        let mut input = vec![0];
        input.extend_from_slice(b"OK 1027\n");
        input.extend_from_slice(port_forward::reply_line(reply).as_bytes());
        input
    };
    let check = agent::CheckResponse {
        protocol_version: runv_protocol::PROTOCOL_VERSION,
        agent_version: "0.1.0".into(),
        ..Default::default()
    };
    let details = agent::GuestDetails {
        kernel_release: "6.1.0".into(),
        memory_total_bytes: 512 << 20,
        online_cpus: 2,
        ..Default::default()
    };
    let plugged = agent::PlugVirtioMmioResponse {
        device_name: "vda".into(),
        device_id: 2,
        ..Default::default()
    };
    let exited = agent::WaitProcessResponse {
        exit_status: 137,
        exited_at_ns: 1_700_000_000_000_000_000,
        ..Default::default()
    };
    let pids = agent::ListProcessesResponse {
        pids: vec![1, 42, 4242],
        ..Default::default()
    };
    let stats = agent::ContainerStats::new();
    let not_found = ttrpc::get_status(ttrpc::Code::NOT_FOUND, "no container c1");
    vec![
        ("port_forward_ok", port_forward(&Ok(()))),
        (
            "port_forward_refused",
            port_forward(&Err("connection refused".into())),
        ),
        ("hybrid_vsock_refused", vec![1]),
        ("check", agent_answer(1, &check, None)),
        ("guest_details", agent_answer(2, &details, None)),
        ("plug_virtio_mmio", agent_answer(3, &plugged, None)),
        ("wait_process", agent_answer(4, &exited, None)),
        ("list_processes", agent_answer(5, &pids, None)),
        ("container_stats", agent_answer(6, &stats, None)),
        ("error_status", agent_answer(6, &stats, Some(not_found))),
    ]
}

/// A ttrpc request of the agent's `method` carrying `message`.
fn ttrpc_request(method: &str, message: &dyn protobuf::MessageDyn) -> Vec<u8> {
    let request = ttrpc::proto::Request {
        service: "runv.agent.Agent".into(),
        method: method.into(),
        payload: message.write_to_bytes_dyn().expect("an encodable request"),
        timeout_nano: 10_000_000_000,
        ..Default::default()
    };
    let mut input = vec![2];
    input.extend(request.write_to_bytes().expect("an encodable request"));
    input
}

fn host_requests() -> Seeds {
    let line = |kind: u8, line: String| {
        let mut input = vec![kind];
        input.extend_from_slice(line.as_bytes());
        input
    };
    let header = stdio::StreamHeader {
        container_id: "c1".into(),
        exec_id: "e1".into(),
        stream: stdio::StdioStream::Stdout,
    };
    let network = agent::ConfigureNetworkRequest {
        interfaces: vec![agent::NetworkInterface {
            mac: "52:54:00:12:34:56".into(),
            name: "eth0".into(),
            mtu: 1500,
            addresses: vec![
                agent::IpAddress {
                    address: "10.88.0.5".into(),
                    prefix_len: 16,
                    ..Default::default()
                },
                agent::IpAddress {
                    address: "fd00::5".into(),
                    prefix_len: 64,
                    ..Default::default()
                },
            ],
            ..Default::default()
        }],
        routes: vec![
            agent::Route {
                gateway: "10.88.0.1".into(),
                device: "eth0".into(),
                ..Default::default()
            },
            agent::Route {
                destination: "10.0.0.0/8".into(),
                device: "eth0".into(),
                scope: 253,
                family: 2,
                ..Default::default()
            },
        ],
        neighbors: vec![agent::Neighbor {
            ip: "10.88.0.1".into(),
            mac: "aa:bb:cc:dd:ee:ff".into(),
            device: "eth0".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let signal = agent::SignalProcessRequest {
        container_id: "c1".into(),
        signal: 9,
        ..Default::default()
    };
    vec![
        ("stdio_header", line(0, header.to_line())),
        ("port_forward", line(1, port_forward::request_line(8080))),
        (
            "configure_network",
            ttrpc_request("ConfigureNetwork", &network),
        ),
        ("signal_process", ttrpc_request("SignalProcess", &signal)),
        ("check", ttrpc_request("Check", &agent::CheckRequest::new())),
    ]
}

fn vfio_pci() -> Seeds {
    // The function's MSI-X capability is at 0x70: Message Control is the
    // upper half of register 28; the table is at 0x8000 of BAR0.
    const MSIX_REGISTER: u32 = 0x70 / 4;
    const TABLE: u16 = 0x8000;
    const PBA: u16 = 0x9000;
    let bar_write = |offset: u16, value: u32| bus_access(true, false, 2, offset, u64::from(value));
    let bar_read = |offset: u16| bus_access(false, false, 2, offset, 0);
    let mut scan = Vec::new();
    for register in 0..64 {
        scan.extend(config_access(register, None));
    }
    let mut sizing = Vec::new();
    for register in [1, 4, 5, 12, 15] {
        sizing.extend(config_access(register, Some(u32::MAX)));
        sizing.extend(config_access(register, None));
    }
    let mut msix = config_access(1, Some(0x6)); // memory space, bus master
    for vector in 0..4u16 {
        let entry = TABLE + 16 * vector;
        msix.extend(bar_write(entry, 0xfee0_0000)); // address low
        msix.extend(bar_write(entry + 4, 0)); // address high
        msix.extend(bar_write(entry + 8, 0x30 + u32::from(vector))); // data
        msix.extend(bar_write(entry + 12, 0)); // unmasked
    }
    msix.extend(config_access(MSIX_REGISTER, Some(0x8003 << 16)));
    msix.extend(bar_read(PBA));
    msix.extend(bar_write(TABLE + 12, 1)); // mask vector 0
    msix.extend(config_access(MSIX_REGISTER, Some(0)));
    let mut bar = Vec::new();
    for offset in [0, 0x100, 0x7ffc] {
        bar.extend(bar_write(offset, 0xdead_beef));
        bar.extend(bar_read(offset));
    }
    vec![
        ("scan", scan),
        ("sizing", sizing),
        ("msix", msix),
        ("bar", bar),
    ]
}
