//! The CPUID a vCPU shows its guest: what KVM supports on this host, with
//! the vCPU's own APIC ID and the hypervisor bit set.

use kvm_bindings::CpuId;

/// CPUID.1:ECX bit 31: "running under a hypervisor".
const HYPERVISOR_BIT: u32 = 1 << 31;

/// Adjusts KVM's supported CPUID for vCPU `id` of `count`.
pub fn adjust_for_vcpu(cpuid: &mut CpuId, id: u8, count: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            0x1 => {
                entry.ecx |= HYPERVISOR_BIT;
                // EBX: initial APIC ID in bits 31..24, logical CPUs per
                // package in bits 23..16, CLFLUSH line size (8 x 8 bytes).
                entry.ebx = (u32::from(id) << 24) | (u32::from(count) << 16) | (8 << 8);
            }
            // Extended topology: the x2APIC ID of this vCPU.
            0xb | 0x1f => entry.edx = u32::from(id),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn each_vcpu_gets_its_apic_id_and_the_hypervisor_bit() {
        let leaf = |function| kvm_cpuid_entry2 {
            function,
            ebx: 0xffff_ffff,
            ..Default::default()
        };
        let mut cpuid = CpuId::from_entries(&[leaf(0x0), leaf(0x1), leaf(0xb)]).unwrap();
        adjust_for_vcpu(&mut cpuid, 3, 4);
        let entries = cpuid.as_slice();
        assert_eq!(entries[0].ebx, 0xffff_ffff, "other leaves untouched");
        assert_eq!(entries[1].ebx >> 24, 3);
        assert_eq!((entries[1].ebx >> 16) & 0xff, 4);
        assert_ne!(entries[1].ecx & HYPERVISOR_BIT, 0);
        assert_eq!(entries[2].edx, 3);
    }
}
