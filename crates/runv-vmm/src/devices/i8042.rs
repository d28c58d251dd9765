//! Just enough of the i8042 keyboard controller for its CPU reset line:
//! Linux's `reboot=k` pulses it, and runv ends the VM on a reset.

use std::sync::Arc;

use crate::{bus::BusDevice, vm::VmControl};

/// The controller's ports: data at 0x60, status and command at 0x64.
pub const I8042_PORT: u64 = 0x60;
pub const I8042_PORTS: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
/// "Pulse output line 0": the CPU reset.
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    control: Arc<VmControl>,
}

impl I8042 {
    pub fn new(control: Arc<VmControl>) -> I8042 {
        I8042 { control }
    }
}

impl BusDevice for I8042 {
    /// No keyboard: the status says both buffers are empty, data reads 0.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.control.request_reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_reset_command_resets() {
        let control = Arc::new(VmControl::default());
        let mut i8042 = I8042::new(control.clone());
        i8042.write(0, &[CMD_RESET_CPU]);
        i8042.write(COMMAND_OFFSET, &[0xaa]);
        assert!(!control.reset_requested());
        let mut status = [0xffu8];
        i8042.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
        i8042.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert!(control.reset_requested());
    }
}
