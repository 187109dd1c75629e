//! Interrupt routing: KVM's GSI routing table (the IOAPIC and PIC pins,
//! plus one MSI route per device vector) and the irqfds that inject them.
//! [`KvmMsiGroup`] is the VMM's implementation of the `pci` crate's
//! `MsiInterruptGroup`: devices program vectors through it and trigger them
//! by writing an irqfd, without knowing about KVM.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use pci::{MsiInterruptGroup, MsiMessage};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// IOAPIC pins; GSIs from here on are free for MSI routes.
pub const IOAPIC_PINS: u32 = 24;
/// Highest GSI KVM accepts in a routing table (KVM_MAX_IRQ_ROUTES - 1).
const MAX_GSI: u32 = 4095;

fn errno_to_io(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

struct Table {
    msi: BTreeMap<u32, kvm_irq_routing_entry>,
    free: Vec<u32>,
    next: u32,
}

/// The VM's GSI routing table. Every change rewrites the whole table, as
/// KVM_SET_GSI_ROUTING requires.
pub struct GsiRouting {
    vm: Arc<VmFd>,
    table: Mutex<Table>,
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl GsiRouting {
    /// The routing of a fresh VM: IOAPIC pins 0-23 and PIC pins 0-15.
    pub fn new(vm: Arc<VmFd>) -> io::Result<Arc<Self>> {
        let r = Arc::new(GsiRouting {
            vm,
            table: Mutex::new(Table {
                msi: BTreeMap::new(),
                free: Vec::new(),
                next: IOAPIC_PINS,
            }),
        });
        r.commit(&r.table.lock().unwrap_or_else(|e| e.into_inner()))?;
        Ok(r)
    }

    fn commit(&self, t: &Table) -> io::Result<()> {
        let mut entries = Vec::new();
        for gsi in 0..IOAPIC_PINS {
            entries.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for gsi in 0..16u32 {
            if gsi == 2 {
                continue; // the cascade
            }
            let (chip, pin) = if gsi < 8 {
                (KVM_IRQCHIP_PIC_MASTER, gsi)
            } else {
                (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
            };
            entries.push(irqchip_entry(gsi, chip, pin));
        }
        entries.extend(t.msi.values().copied());
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| io::Error::other(format!("routing table: {e:?}")))?;
        self.vm.set_gsi_routing(&routing).map_err(errno_to_io)
    }

    fn allocate(&self) -> io::Result<u32> {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = t.free.pop() {
            return Ok(g);
        }
        if t.next > MAX_GSI {
            return Err(io::Error::other("no free GSI for an MSI route"));
        }
        let g = t.next;
        t.next += 1;
        Ok(g)
    }

    fn set_msi(&self, gsi: u32, msg: MsiMessage) -> io::Result<()> {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = msg.addr as u32;
        e.u.msi.address_hi = (msg.addr >> 32) as u32;
        e.u.msi.data = msg.data;
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.msi.insert(gsi, e);
        self.commit(&t)
    }

    fn release(&self, gsi: u32) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if t.msi.remove(&gsi).is_some() {
            let _ = self.commit(&t);
        }
        t.free.push(gsi);
    }

    /// Number of MSI routes in use (for tests of resource leaks).
    pub fn msi_routes(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .msi
            .len()
    }
}

/// One device's MSI or MSI-X vectors: a GSI and an irqfd per vector.
pub struct KvmMsiGroup {
    routing: Arc<GsiRouting>,
    vectors: Vec<(u32, EventFd)>,
}

impl KvmMsiGroup {
    /// Allocates `count` vectors and registers their irqfds.
    pub fn new(routing: Arc<GsiRouting>, count: u16) -> io::Result<Self> {
        let mut group = KvmMsiGroup {
            routing: routing.clone(),
            vectors: Vec::new(),
        };
        for _ in 0..count {
            let gsi = routing.allocate()?;
            let evt = match EventFd::new(EFD_NONBLOCK) {
                Ok(e) => e,
                Err(e) => {
                    routing.release(gsi);
                    return Err(e);
                }
            };
            if let Err(e) = routing.vm.register_irqfd(&evt, gsi) {
                routing.release(gsi);
                return Err(errno_to_io(e));
            }
            group.vectors.push((gsi, evt));
        }
        Ok(group)
    }
}

impl MsiInterruptGroup for KvmMsiGroup {
    fn trigger(&self, vector: u16) -> io::Result<()> {
        match self.vectors.get(vector as usize) {
            Some((_, evt)) => evt.write(1),
            None => Err(io::Error::from(io::ErrorKind::InvalidInput)),
        }
    }

    fn update(&self, vector: u16, msg: MsiMessage, masked: bool) -> io::Result<()> {
        let Some((gsi, _)) = self.vectors.get(vector as usize) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        if masked {
            // Masked vectors are never triggered; keep the last route.
            return Ok(());
        }
        self.routing.set_msi(*gsi, msg)
    }

    fn notifier(&self, vector: u16) -> Option<&EventFd> {
        self.vectors.get(vector as usize).map(|(_, e)| e)
    }
}

impl Drop for KvmMsiGroup {
    fn drop(&mut self) {
        for (gsi, evt) in self.vectors.drain(..) {
            let _ = self.routing.vm.unregister_irqfd(&evt, gsi);
            self.routing.release(gsi);
        }
    }
}
