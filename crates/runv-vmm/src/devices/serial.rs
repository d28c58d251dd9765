//! The 8250 UART (COM1) that carries the guest console to a host writer,
//! on vm-superio, with its interrupt delivered through an irqfd.

use std::io::Write;

use vm_superio::{serial::NoEvents, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// COM1's I/O ports and interrupt line.
pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_PORTS: u64 = 8;
pub const COM1_IRQ: u32 = 4;

/// Raises an interrupt by signalling an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// COM1 on the port I/O bus.
pub struct SerialPort {
    uart: Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialPort {
    /// A UART whose output goes to `out` and whose interrupt signals `irq`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> SerialPort {
        SerialPort {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(byte), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *byte = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&byte), Ok(offset)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        if let Err(e) = self.uart.write(offset, byte) {
            tracing::debug!(error = ?e, "serial write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    pub struct SharedBuffer(pub Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_the_data_register_reach_the_writer() {
        let out = SharedBuffer::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut port = SerialPort::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        // Enable the "transmitter empty" interrupt, then send two bytes.
        port.write(1, &[0x02]);
        port.write(0, b"o");
        port.write(0, b"k");
        assert_eq!(&*out.0.lock().unwrap(), b"ok");
        assert!(irq.read().unwrap() >= 1, "the UART raised its interrupt");
        // The line status register says the transmitter is empty.
        let mut lsr = [0u8];
        port.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn odd_accesses_are_ignored_without_panic() {
        let out = SharedBuffer::default();
        let mut port = SerialPort::new(EventFd::new(0).unwrap(), Box::new(out.clone()));
        port.write(0, &[]);
        port.write(0x1_0000, b"x");
        let mut empty = [];
        port.read(0, &mut empty);
        assert!(out.0.lock().unwrap().is_empty());
    }
}
