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
    /// For a group whose irqfds are signalled from outside the VMM (a
    /// passthrough back end): whether each vector's irqfd is registered.
    /// Such a group registers a vector's irqfd only while the vector is
    /// unmasked, so a masked vector's signals stay counted in its eventfd
    /// and KVM delivers them when the irqfd is registered again (on
    /// unmask). `None`: irqfds are always registered (devices inside the
    /// VMM apply masking before they trigger).
    registered: Option<Mutex<Vec<bool>>>,
}

impl KvmMsiGroup {
    /// Allocates `count` vectors and registers their irqfds.
    pub fn new(routing: Arc<GsiRouting>, count: u16) -> io::Result<Self> {
        let mut group = KvmMsiGroup {
            routing: routing.clone(),
            vectors: Vec::new(),
            registered: None,
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

    /// Allocates `count` vectors for a passthrough function, whose back end
    /// signals the irqfds itself: a vector's irqfd is registered only while
    /// the vector is unmasked (see `update`), none at first.
    pub fn new_passthrough(routing: Arc<GsiRouting>, count: u16) -> io::Result<Self> {
        let mut group = KvmMsiGroup {
            routing: routing.clone(),
            vectors: Vec::new(),
            registered: Some(Mutex::new(vec![false; count as usize])),
        };
        for _ in 0..count {
            let gsi = routing.allocate()?;
            match EventFd::new(EFD_NONBLOCK) {
                Ok(e) => group.vectors.push((gsi, e)),
                Err(e) => {
                    routing.release(gsi);
                    return Err(e);
                }
            }
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
        let Some(registered) = &self.registered else {
            if masked {
                // Masked vectors are never triggered; keep the last route.
                return Ok(());
            }
            return self.routing.set_msi(*gsi, msg);
        };
        let mut registered = registered.lock().unwrap_or_else(|e| e.into_inner());
        let Some(on) = registered.get_mut(vector as usize) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        let evt = &self.vectors[vector as usize].1;
        if masked {
            if *on {
                self.routing
                    .vm
                    .unregister_irqfd(evt, *gsi)
                    .map_err(errno_to_io)?;
                *on = false;
            }
            return Ok(());
        }
        // The route first, so that signals counted while masked are
        // delivered with the new message when the irqfd is registered.
        self.routing.set_msi(*gsi, msg)?;
        if !*on {
            self.routing
                .vm
                .register_irqfd(evt, *gsi)
                .map_err(errno_to_io)?;
            *on = true;
        }
        Ok(())
    }

    fn notifier(&self, vector: u16) -> Option<&EventFd> {
        self.vectors.get(vector as usize).map(|(_, e)| e)
    }
}

impl Drop for KvmMsiGroup {
    fn drop(&mut self) {
        let registered = self
            .registered
            .take()
            .map(|r| r.into_inner().unwrap_or_else(|e| e.into_inner()));
        for (v, (gsi, evt)) in self.vectors.drain(..).enumerate() {
            if registered.as_ref().is_none_or(|r| r.get(v) == Some(&true)) {
                let _ = self.routing.vm.unregister_irqfd(&evt, gsi);
            }
            self.routing.release(gsi);
        }
    }
}

struct IntxEntry {
    gsi: u32,
    irqfd: EventFd,
    resample: EventFd,
    pending: Arc<std::sync::atomic::AtomicU8>,
}

/// What the resample thread and the lines' owners share. The thread holds
/// this, not the [`IntxManager`], so that it can block without a timeout and
/// the manager still drops (its `Drop` signals `control`).
struct IntxShared {
    /// The resample fds of every line, plus `control`.
    epoll: vmm_sys_util::epoll::Epoll,
    entries: Mutex<BTreeMap<u64, IntxEntry>>,
    /// Control eventfd: written to stop the thread.
    control: EventFd,
}

/// Level-triggered INTx through KVM irqfds with resample: the device
/// asserts by writing its irqfd; after the guest's EOI KVM lowers the line
/// and signals the resample fd, and a small thread asserts again while the
/// device's status says the interrupt is still pending. The thread sleeps in
/// `epoll_wait` on the resample fds and costs nothing while no line is
/// resampled. Lines are added to and removed from the epoll set directly
/// (`epoll_ctl` takes effect on a concurrent `epoll_wait`), so the control
/// eventfd only carries the stop request.
pub struct IntxManager {
    vm: Arc<VmFd>,
    shared: Arc<IntxShared>,
    next: std::sync::atomic::AtomicU64,
}

/// One device's INTx line.
pub struct KvmIntx {
    manager: Arc<IntxManager>,
    token: u64,
    irqfd: EventFd,
    /// A duplicate of the line's resample eventfd, for a back end that
    /// unmasks on EOI (kernel VFIO).
    resample: EventFd,
}

impl pci::IntxInterrupt for KvmIntx {
    fn assert(&self) -> io::Result<()> {
        self.irqfd.write(1)
    }

    fn eventfd(&self) -> Option<&EventFd> {
        Some(&self.irqfd)
    }

    fn resample_eventfd(&self) -> Option<&EventFd> {
        Some(&self.resample)
    }
}

impl Drop for KvmIntx {
    fn drop(&mut self) {
        self.manager.remove(self.token);
    }
}

const CONTROL_TOKEN: u64 = u64::MAX;

impl IntxManager {
    /// Starts the resample thread.
    pub fn new(vm: Arc<VmFd>) -> io::Result<Arc<Self>> {
        use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
        let epoll = Epoll::new()?;
        let control = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            std::os::fd::AsRawFd::as_raw_fd(&control),
            EpollEvent::new(EventSet::IN, CONTROL_TOKEN),
        )?;
        let shared = Arc::new(IntxShared {
            epoll,
            entries: Mutex::new(BTreeMap::new()),
            control,
        });
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("arbor-intx".into())
            .spawn(move || Self::run(&thread_shared))?;
        Ok(Arc::new(IntxManager {
            vm,
            shared,
            next: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    fn run(shared: &IntxShared) {
        use std::sync::atomic::Ordering;
        use vmm_sys_util::epoll::EpollEvent;
        let mut events = vec![EpollEvent::default(); 16];
        crate::seccomp::install(crate::seccomp::ThreadKind::Intx);
        loop {
            // No timeout: a resample fd or the control fd wakes us.
            let n = match shared.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("INTx resample thread: epoll_wait: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                if ev.data() == CONTROL_TOKEN {
                    return;
                }
                let entries = shared.entries.lock().unwrap_or_else(|e| e.into_inner());
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
        let (device_fd, device_resample) = match (irqfd.try_clone(), resample.try_clone()) {
            (Ok(fd), Ok(r)) => (fd, r),
            (Err(e), _) | (_, Err(e)) => {
                let _ = self.vm.unregister_irqfd(&irqfd, gsi);
                return Err(e);
            }
        };
        let resample_fd = std::os::fd::AsRawFd::as_raw_fd(&resample);
        // Into the table first, so that the thread finds the entry as soon
        // as the resample fd is in its epoll set.
        self.shared
            .entries
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
        if let Err(e) = self.shared.epoll.ctl(
            ControlOperation::Add,
            resample_fd,
            EpollEvent::new(EventSet::IN, token),
        ) {
            self.remove(token);
            return Err(e);
        }
        Ok(KvmIntx {
            manager: self.clone(),
            token,
            irqfd: device_fd,
            resample: device_resample,
        })
    }

    fn remove(&self, token: u64) {
        use vmm_sys_util::epoll::{ControlOperation, EpollEvent};
        let entry = {
            let mut entries = self
                .shared
                .entries
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            // Out of the epoll set before out of the table, so that the
            // thread is never woken for a line it cannot find.
            if let Some(e) = entries.get(&token) {
                let _ = self.shared.epoll.ctl(
                    ControlOperation::Delete,
                    std::os::fd::AsRawFd::as_raw_fd(&e.resample),
                    EpollEvent::default(),
                );
            }
            entries.remove(&token)
        };
        if let Some(e) = entry {
            let _ = self.vm.unregister_irqfd(&e.irqfd, e.gsi);
        }
    }
}

impl Drop for IntxManager {
    fn drop(&mut self) {
        let _ = self.shared.control.write(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::Kvm;

    /// Whether `evt` is registered as an irqfd of `gsi`: KVM refuses to
    /// register the same eventfd twice.
    fn registered(routing: &GsiRouting, evt: &EventFd, gsi: u32) -> bool {
        if routing.vm.register_irqfd(evt, gsi).is_err() {
            return true;
        }
        routing.vm.unregister_irqfd(evt, gsi).unwrap();
        false
    }

    #[test]
    fn passthrough_group_registers_only_unmasked_vectors() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("no /dev/kvm: skipped");
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let routing = GsiRouting::new(vm).unwrap();
        let group = KvmMsiGroup::new_passthrough(routing.clone(), 2).unwrap();
        let (gsi0, gsi1) = (group.vectors[0].0, group.vectors[1].0);
        assert!(!registered(&routing, group.notifier(0).unwrap(), gsi0));
        let msg = MsiMessage {
            addr: 0xfee0_0000,
            data: 0x41,
        };
        group.update(0, msg, false).unwrap();
        assert_eq!(routing.msi_routes(), 1);
        assert!(registered(&routing, group.notifier(0).unwrap(), gsi0));
        assert!(!registered(&routing, group.notifier(1).unwrap(), gsi1));
        // Unmasked twice: still one registration.
        group.update(0, msg, false).unwrap();
        // Masked: unregistered, the route kept.
        group.update(0, msg, true).unwrap();
        group.update(0, msg, true).unwrap();
        assert!(!registered(&routing, group.notifier(0).unwrap(), gsi0));
        assert_eq!(routing.msi_routes(), 1);
        assert!(group.update(2, msg, false).is_err());
        group.update(1, msg, false).unwrap();
        drop(group);
        assert_eq!(routing.msi_routes(), 0);
        // The GSIs are free again: a new group reuses them and can
        // register their (new) eventfds.
        let again = KvmMsiGroup::new(routing.clone(), 2).unwrap();
        let mut gsis = [again.vectors[0].0, again.vectors[1].0];
        gsis.sort();
        let mut before = [gsi0, gsi1];
        before.sort();
        assert_eq!(gsis, before);
    }
}
