//! The VM's GSI routing table: the in-kernel irqchip's default routes for
//! GSIs 0..24 (which KVM_SET_GSI_ROUTING would otherwise drop) and one MSI
//! route per vector that a PCI function uses.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
    KVM_MAX_IRQ_ROUTES,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::{kvm, mptable::IOAPIC_PINS, VmmError};

/// GSIs below this are the IOAPIC's pins; the ones above are ours to hand
/// out for MSI.
const FIRST_MSI_GSI: u32 = IOAPIC_PINS as u32;
/// The PICs take the first 16 GSIs, 8 pins each.
const PIC_GSIS: u32 = 16;
/// KVM refuses GSIs at or above its route limit.
const GSI_LIMIT: u32 = KVM_MAX_IRQ_ROUTES as u32;

/// MSI routes and the irqfds that fire them.
pub struct IrqRouting {
    vm: Arc<VmFd>,
    /// Allocated GSIs and their MSI message, once one is set. Held across
    /// the ioctl, so that concurrent changes reach KVM in order.
    msi_routes: Mutex<BTreeMap<u32, Option<MsiMessage>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MsiMessage {
    address: u64,
    data: u32,
}

impl IrqRouting {
    /// The routing of `vm`, whose in-kernel irqchip (KVM_CREATE_IRQCHIP)
    /// already holds the default routes.
    pub(crate) fn new(vm: Arc<VmFd>) -> IrqRouting {
        IrqRouting {
            vm,
            msi_routes: Mutex::default(),
        }
    }

    /// A GSI of its own (above the IOAPIC's pins), with no route yet.
    pub fn allocate_gsi(&self) -> Result<u32, VmmError> {
        let mut routes = self.msi_routes.lock().expect("routing lock");
        let gsi = first_free_gsi(&routes).ok_or_else(|| {
            VmmError::Device(format!(
                "all {} MSI GSIs ({FIRST_MSI_GSI}..{GSI_LIMIT}) are in use",
                GSI_LIMIT - FIRST_MSI_GSI
            ))
        })?;
        routes.insert(gsi, None);
        Ok(gsi)
    }

    /// Routes `gsi` to the MSI message `address`/`data`.
    pub fn set_msi_route(&self, gsi: u32, address: u64, data: u32) -> Result<(), VmmError> {
        let mut routes = self.msi_routes.lock().expect("routing lock");
        let route = routes.get_mut(&gsi).ok_or_else(|| not_allocated(gsi))?;
        let old = route.replace(MsiMessage { address, data });
        if let Err(e) = self.push(&routes) {
            // KVM kept the old table: so do we.
            *routes.get_mut(&gsi).expect("just found") = old;
            return Err(e);
        }
        Ok(())
    }

    /// Drops `gsi`'s route and returns the GSI to the pool.
    pub fn release_gsi(&self, gsi: u32) -> Result<(), VmmError> {
        let mut routes = self.msi_routes.lock().expect("routing lock");
        match routes.remove(&gsi).ok_or_else(|| not_allocated(gsi))? {
            // KVM never heard of it.
            None => Ok(()),
            // Even if KVM keeps the stale route, nothing fires it once its
            // irqfds are gone, and the next push drops it.
            Some(_) => self.push(&routes),
        }
    }

    pub fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<(), VmmError> {
        self.vm.register_irqfd(event, gsi).map_err(kvm("KVM_IRQFD"))
    }

    pub fn unregister_irqfd(&self, event: &EventFd, gsi: u32) -> Result<(), VmmError> {
        self.vm
            .unregister_irqfd(event, gsi)
            .map_err(kvm("KVM_IRQFD (deassign)"))
    }

    /// Hands KVM the whole table, as KVM_SET_GSI_ROUTING wants it.
    fn push(&self, routes: &BTreeMap<u32, Option<MsiMessage>>) -> Result<(), VmmError> {
        let table = KvmIrqRouting::from_entries(&routing_table(routes))
            .map_err(|e| VmmError::Device(format!("building the GSI routing table: {e:?}")))?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(kvm("KVM_SET_GSI_ROUTING"))
    }
}

fn not_allocated(gsi: u32) -> VmmError {
    VmmError::Device(format!("GSI {gsi} was not allocated for MSI"))
}

fn first_free_gsi(routes: &BTreeMap<u32, Option<MsiMessage>>) -> Option<u32> {
    // Keys are sorted: the first one out of step with the count is a hole.
    (FIRST_MSI_GSI..GSI_LIMIT)
        .zip(routes.keys().copied().chain(std::iter::repeat(GSI_LIMIT)))
        .find(|(expected, allocated)| expected != allocated)
        .map(|(free, _)| free)
}

/// The default routes of KVM's irqchip (the kernel's
/// kvm_setup_default_irq_routing: GSIs 0..16 to both the PIC and the
/// IOAPIC, 16..24 to the IOAPIC), then the MSI routes that are set.
fn routing_table(routes: &BTreeMap<u32, Option<MsiMessage>>) -> Vec<kvm_irq_routing_entry> {
    let mut table = Vec::new();
    for gsi in 0..FIRST_MSI_GSI {
        table.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < PIC_GSIS {
            let pic = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            table.push(irqchip_route(gsi, pic, gsi % 8));
        }
    }
    for (&gsi, message) in routes {
        if let Some(message) = message {
            let mut entry = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            entry.u.msi = kvm_irq_routing_msi {
                address_lo: message.address as u32,
                address_hi: (message.address >> 32) as u32,
                data: message.data,
                ..Default::default()
            };
            table.push(entry);
        }
    }
    table
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    entry.u.irqchip.irqchip = irqchip;
    entry.u.irqchip.pin = pin;
    entry
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{memory::create_guest_memory, vm::Vm};

    fn describe(entry: &kvm_irq_routing_entry) -> (u32, u32, u32, u32) {
        // SAFETY: the union's member is chosen by the entry's type.
        unsafe {
            match entry.type_ {
                KVM_IRQ_ROUTING_IRQCHIP => (
                    entry.gsi,
                    entry.type_,
                    entry.u.irqchip.irqchip,
                    entry.u.irqchip.pin,
                ),
                _ => (
                    entry.gsi,
                    entry.type_,
                    entry.u.msi.address_lo,
                    entry.u.msi.data,
                ),
            }
        }
    }

    #[test]
    fn the_table_keeps_the_irqchip_defaults() {
        let table: Vec<_> = routing_table(&BTreeMap::new())
            .iter()
            .map(describe)
            .collect();
        // 16 GSIs on both chips, 8 on the IOAPIC only.
        assert_eq!(table.len(), 16 * 2 + 8);
        let irqchip = KVM_IRQ_ROUTING_IRQCHIP;
        assert!(table.contains(&(0, irqchip, KVM_IRQCHIP_IOAPIC, 0)));
        assert!(table.contains(&(0, irqchip, KVM_IRQCHIP_PIC_MASTER, 0)));
        assert!(table.contains(&(4, irqchip, KVM_IRQCHIP_PIC_MASTER, 4)));
        assert!(table.contains(&(9, irqchip, KVM_IRQCHIP_PIC_SLAVE, 1)));
        assert!(table.contains(&(15, irqchip, KVM_IRQCHIP_IOAPIC, 15)));
        assert!(table.contains(&(23, irqchip, KVM_IRQCHIP_IOAPIC, 23)));
        assert!(!table
            .iter()
            .any(|&(gsi, _, chip, _)| gsi >= 16 && chip != 2));
    }

    #[test]
    fn the_table_holds_only_the_msi_routes_that_are_set() {
        let mut routes = BTreeMap::new();
        routes.insert(24, None);
        routes.insert(
            25,
            Some(MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x4041,
            }),
        );
        let table = routing_table(&routes);
        let msi: Vec<_> = table
            .iter()
            .filter(|entry| entry.type_ == KVM_IRQ_ROUTING_MSI)
            .collect();
        assert_eq!(msi.len(), 1);
        assert_eq!(msi[0].gsi, 25);
        // SAFETY: an MSI entry.
        let message = unsafe { msi[0].u.msi };
        assert_eq!(
            (message.address_lo, message.address_hi, message.data),
            (0xfee0_1000, 1, 0x4041)
        );
    }

    #[test]
    fn free_gsis_are_found_above_the_ioapic_and_in_holes() {
        let mut routes = BTreeMap::new();
        assert_eq!(first_free_gsi(&routes), Some(24));
        routes.extend([(24, None), (25, None), (27, None)]);
        assert_eq!(first_free_gsi(&routes), Some(26));
        routes.insert(26, None);
        assert_eq!(first_free_gsi(&routes), Some(28));
        let full: BTreeMap<_, _> = (FIRST_MSI_GSI..GSI_LIMIT).map(|gsi| (gsi, None)).collect();
        assert_eq!(first_free_gsi(&full), None);
    }

    /// A VM on real KVM, or None after saying why not.
    fn vm() -> Option<Vm> {
        if !crate::testing::kvm_usable() {
            return None;
        }
        Some(Vm::new(create_guest_memory(1 << 20).unwrap()).unwrap())
    }

    #[test]
    fn gsis_are_allocated_routed_and_reused_on_kvm() {
        let Some(vm) = vm() else { return };
        let routing = vm.irq_routing();
        assert_eq!(routing.allocate_gsi().unwrap(), 24);
        assert_eq!(routing.allocate_gsi().unwrap(), 25);
        if let Err(e) = routing.set_msi_route(24, 0xfee0_0000, 0x4030) {
            println!("SKIPPED: this host's KVM refuses MSI routes: {e}");
            return;
        }
        routing.set_msi_route(24, 0xfee0_1000, 0x4031).unwrap();
        let event = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        routing.register_irqfd(&event, 24).unwrap();
        event.write(1).unwrap();
        routing.unregister_irqfd(&event, 24).unwrap();
        routing.release_gsi(24).unwrap();
        assert!(routing.release_gsi(24).is_err());
        assert!(routing.set_msi_route(24, 0xfee0_0000, 0).is_err());
        assert_eq!(routing.allocate_gsi().unwrap(), 24);
        assert_eq!(routing.allocate_gsi().unwrap(), 26);
    }
}
