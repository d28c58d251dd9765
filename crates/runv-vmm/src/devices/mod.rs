//! Devices of the microVM.

pub mod i8042;
pub mod serial;

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use vmm_sys_util::eventfd::EventFd;

use crate::{kvm, vm::Vm, VmmError};

/// Adds the legacy devices every runv guest has: COM1 carrying the console
/// to `console` (its interrupt through an irqfd), and the i8042 reset line.
pub fn add_legacy_devices(vm: &mut Vm, console: Box<dyn Write + Send>) -> Result<(), VmmError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| VmmError::Device(format!("creating the serial irqfd: {e}")))?;
    vm.fd()
        .register_irqfd(&irq, serial::COM1_IRQ)
        .map_err(kvm("KVM_IRQFD"))?;
    let com1 = serial::SerialPort::new(irq, console);
    vm.pio.insert(
        "com1",
        serial::COM1_PORT,
        serial::COM1_PORTS,
        Arc::new(Mutex::new(com1)),
    )?;
    let i8042 = i8042::I8042::new(vm.control().clone());
    vm.pio.insert(
        "i8042",
        i8042::I8042_PORT,
        i8042::I8042_PORTS,
        Arc::new(Mutex::new(i8042)),
    )
}
