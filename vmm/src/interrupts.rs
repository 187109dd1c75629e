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

/// First GSI of the PCI INTx lines (IOAPIC pins 16-23).
pub const INTX_GSI_BASE: u32 = 16;
/// Number of PCI INTx lines.
pub const INTX_LINES: u32 = 8;

/// The GSI the guest expects for INTA of the device at `path`: the pin is
/// swizzled through every bridge (`(pin + slot) % 4`), and the root bus's
/// `_PRT` maps (slot, pin) to `16 + (slot + pin) % 8`.
pub fn intx_gsi(path: &pci::PciPath) -> u32 {
    let slots = path.slots();
    let mut pin = 0u32; // INTA
    for s in slots.iter().skip(1).rev() {
        pin = (pin + u32::from(s.slot)) % 4;
    }
    let root = slots.first().map(|s| u32::from(s.slot)).unwrap_or(0);
    INTX_GSI_BASE + (root + pin) % INTX_LINES
}

struct IntxEntry {
    gsi: u32,
    irqfd: EventFd,
    resample: EventFd,
    pending: Arc<std::sync::atomic::AtomicU8>,
}

/// Level-triggered INTx through KVM irqfds with resample: the device
/// asserts by writing its irqfd; after the guest's EOI KVM lowers the line
/// and signals the resample fd, and a small thread asserts again while the
/// device's status says the interrupt is still pending.
pub struct IntxManager {
    vm: Arc<VmFd>,
    epoll: vmm_sys_util::epoll::Epoll,
    entries: Mutex<BTreeMap<u64, IntxEntry>>,
    next: std::sync::atomic::AtomicU64,
    stop: EventFd,
}

/// One device's INTx line.
pub struct KvmIntx {
    manager: Arc<IntxManager>,
    token: u64,
    irqfd: EventFd,
}

impl pci::IntxInterrupt for KvmIntx {
    fn assert(&self) -> io::Result<()> {
        self.irqfd.write(1)
    }
}

impl Drop for KvmIntx {
    fn drop(&mut self) {
        self.manager.remove(self.token);
    }
}

const STOP_TOKEN: u64 = u64::MAX;

impl IntxManager {
    /// Starts the resample thread.
    pub fn new(vm: Arc<VmFd>) -> io::Result<Arc<Self>> {
        use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
        let epoll = Epoll::new()?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            std::os::fd::AsRawFd::as_raw_fd(&stop),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        let m = Arc::new(IntxManager {
            vm,
            epoll,
            entries: Mutex::new(BTreeMap::new()),
            next: std::sync::atomic::AtomicU64::new(0),
            stop,
        });
        let weak = Arc::downgrade(&m);
        std::thread::Builder::new()
            .name("arbor-intx".into())
            .spawn(move || Self::run(weak))?;
        Ok(m)
    }

    fn run(weak: std::sync::Weak<IntxManager>) {
        use std::sync::atomic::Ordering;
        use vmm_sys_util::epoll::EpollEvent;
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            let Some(m) = weak.upgrade() else { return };
            let n = match m.epoll.wait(100, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            for ev in &events[..n] {
                if ev.data() == STOP_TOKEN {
                    return;
                }
                let entries = m.entries.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(e) = entries.get(&ev.data()) {
                    let _ = e.resample.read();
                    if e.pending.load(Ordering::Acquire) != 0 {
                        let _ = e.irqfd.write(1);
                    }
                }
            }
        }
    }

    /// An INTx line on `gsi` for a device whose interrupt is pending while
    /// `pending` is non-zero.
    pub fn line(
        self: &Arc<Self>,
        gsi: u32,
        pending: Arc<std::sync::atomic::AtomicU8>,
    ) -> io::Result<KvmIntx> {
        use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
        let irqfd = EventFd::new(EFD_NONBLOCK)?;
        let resample = EventFd::new(EFD_NONBLOCK)?;
        self.vm
            .register_irqfd_with_resample(&irqfd, &resample, gsi)
            .map_err(errno_to_io)?;
        let token = self.next.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            std::os::fd::AsRawFd::as_raw_fd(&resample),
            EpollEvent::new(EventSet::IN, token),
        ) {
            let _ = self.vm.unregister_irqfd(&irqfd, gsi);
            return Err(e);
        }
        let device_fd = irqfd.try_clone()?;
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                token,
                IntxEntry {
                    gsi,
                    irqfd,
                    resample,
                    pending,
                },
            );
        Ok(KvmIntx {
            manager: self.clone(),
            token,
            irqfd: device_fd,
        })
    }

    fn remove(&self, token: u64) {
        use vmm_sys_util::epoll::{ControlOperation, EpollEvent};
        if let Some(e) = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&token)
        {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                std::os::fd::AsRawFd::as_raw_fd(&e.resample),
                EpollEvent::default(),
            );
            let _ = self.vm.unregister_irqfd(&e.irqfd, e.gsi);
        }
    }
}

impl Drop for IntxManager {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intx_swizzle() {
        let p = |s: &str| s.parse::<pci::PciPath>().unwrap();
        // Root bus: slot s, INTA -> 16 + s % 8.
        assert_eq!(intx_gsi(&p("03")), 19);
        assert_eq!(intx_gsi(&p("0a")), 18);
        // Behind the bridge in root slot 1, device slot 0: pin A.
        assert_eq!(intx_gsi(&p("01/00")), 17);
        // Device slot 2 behind bridge in root slot 9: pin C -> (9 + 2) % 8.
        assert_eq!(intx_gsi(&p("09/02")), 16 + 3);
        // Two levels: (0 + 1) then + 0 = pin B at root slot 3.
        assert_eq!(intx_gsi(&p("03/00/01")), 16 + 4);
    }
}
