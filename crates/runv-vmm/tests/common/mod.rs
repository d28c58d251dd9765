//! What the VMM's KVM tests share.

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use runv_vmm::Vcpu;

/// Collects what the guest prints on its console.
#[derive(Clone, Default)]
pub struct Console(Arc<Mutex<Vec<u8>>>);

impl Console {
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Puts vCPU 0 in real mode at `ip` (CS base 0), with DS based at `ds_base`
/// so that the payload reaches that address through 16-bit offsets.
#[allow(dead_code, reason = "the machine tests boot through MicroVm")]
pub fn start_in_real_mode(vcpu: &Vcpu, ip: u64, ds_base: u64) {
    let mut sregs = vcpu.fd().get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = ds_base;
    vcpu.fd().set_sregs(&sregs).unwrap();
    let regs = kvm_bindings::kvm_regs {
        rip: ip,
        rflags: 2,
        ..Default::default()
    };
    vcpu.fd().set_regs(&regs).unwrap();
}
