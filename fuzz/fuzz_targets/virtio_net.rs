//! virtio-net's transmit and receive chains (crates/runv-vmm/src/virtio/net)
//! with a hostile driver; the tap is a seqpacket socket whose host end
//! sends the input's frames (host action 0) and drops what the guest sent
//! (any other action).
#![no_main]

use std::{fs::File, io::Read};

use libfuzzer_sys::fuzz_target;
use runv_fuzz::{host, virtio::HostileDriver};
use runv_vmm::virtio::net::Net;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fuzz_target!(|input: &[u8]| {
    let (device_end, host_end) = host::seqpacket_pair();
    let mut tap = File::from(host_end);
    let device = Net::with_socket(device_end, MAC).expect("a net device");
    HostileDriver::for_shared(device).run(input, |action, bytes| {
        if action == 0 {
            host::send(&mut tap, bytes);
        } else {
            let mut frame = [0u8; 65_536];
            while tap.read(&mut frame).is_ok_and(|len| len > 0) {}
        }
    });
});
