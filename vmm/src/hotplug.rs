//! The hotplug lifecycle's one owner.
//!
//! [`HotplugOwner`] is the only code that tells the guest about a slot
//! (announce, removal request, withdrawal) and the only code that turns
//! what the guest did into "device X is released". It holds the
//! [`HotplugPlan`] (every hotplug slot and its mechanism, computed once),
//! the devices each mechanism drives (native ports, the ACPI register
//! block, the GED), the removals in flight with their deadlines, and one
//! timer for those deadlines and for the GED's readiness poll.
//!
//! Guest completions come from vCPU threads as typed [`Completion`]s naming
//! their slot (an ACPI `_EJ0` by bus selector and slot, a native slot's
//! power by port id) through a bounded [`CompletionQueue`], never as
//! counters to be re-scanned. The event loop only keeps "device id ->
//! reply sender" for the requests waiting on an [`Outcome`].
//!
//! A third mechanism (SHPC, say) adds a [`SlotMechanism`] variant to the
//! plan and one arm to [`HotplugOwner::signal`] and to the completion
//! matching here; nothing else changes.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::acpi::{
    EjectSink, Ged, PciHotplugController, GED_EVENT_PCI_HOTPLUG, GED_EVENT_POWER_BUTTON,
};
use pci::placement::{HotplugPlan, SlotMechanism};
use pci::PciePort;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

/// How often the owner looks whether a booting guest can take the GED's
/// interrupt yet, while events are held.
const READY_POLL: Duration = Duration::from_millis(10);

/// At most this many completions wait for the event loop; a guest that
/// produces more (ejecting in a loop) loses the excess, which only delays
/// its own removals until their timeout.
const MAX_QUEUED: usize = 1024;

/// What the guest did to a hotplug slot, as reported from a vCPU thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Completion {
    /// `_EJ0` of `slot` on the bus with ACPI selector `bsel`.
    AcpiEjected { bsel: u32, slot: u8 },
    /// The guest wrote native port `port`'s Slot Control, leaving its power indicator
    /// off: it released the slot's device if the card is gone.
    SlotReleased { port: String },
}

/// Typed completions from vCPU threads to the event loop, with a wake-up
/// descriptor.
pub struct CompletionQueue {
    queue: Mutex<VecDeque<Completion>>,
    wake: EventFd,
    dropped: AtomicU64,
}

impl CompletionQueue {
    /// An empty queue.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(CompletionQueue {
            queue: Mutex::new(VecDeque::new()),
            wake: EventFd::new(EFD_NONBLOCK)?,
            dropped: AtomicU64::new(0),
        }))
    }

    /// Queues `c` and wakes the event loop.
    pub fn push(&self, c: Completion) {
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() >= MAX_QUEUED {
                if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                    log::warn!("hotplug: the guest floods completions; dropping the excess");
                }
                return;
            }
            q.push_back(c);
        }
        if let Err(e) = self.wake.write(1) {
            log::warn!("hotplug: cannot wake the event loop: {e}");
        }
    }

    /// Everything queued so far.
    pub fn drain(&self) -> Vec<Completion> {
        let _ = self.wake.read();
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.drain(..).collect()
    }

    /// Readable while completions wait.
    pub fn fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }
}

impl EjectSink for CompletionQueue {
    fn ejected(&self, bsel: u32, slot: u8) {
        self.push(Completion::AcpiEjected { bsel, slot });
    }
}

/// What the owner concluded from the guest's completions and the clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest released device `id` (after a removal request, or on its
    /// own): free it.
    Released { id: String },
    /// The guest did not release `id` in time; the request was withdrawn
    /// and the device stays attached and working.
    Withdrawn { id: String, after: Duration },
}

/// Errors of the hotplug lifecycle; each maps to an HTTP status in
/// [`HotplugError::api_kind`].
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    #[error("device '{0}' sits in a slot without hotplug")]
    NoHotplug(String),
    #[error("the removal of device '{0}' is already under way")]
    AlreadyRemoving(String),
    #[error("cannot notify the guest: {0}")]
    Notify(#[source] std::io::Error),
    #[error("port {port}: {source}")]
    Port {
        port: String,
        #[source]
        source: pci::PciError,
    },
    #[error("unknown native hotplug port '{0}'")]
    UnknownPort(String),
}

impl HotplugError {
    /// The API's status class for this error.
    pub fn api_kind(&self) -> api::ApiErrorKind {
        use api::ApiErrorKind as K;
        match self {
            HotplugError::NoHotplug(_) | HotplugError::AlreadyRemoving(_) => K::Conflict,
            HotplugError::Notify(_) | HotplugError::Port { .. } | HotplugError::UnknownPort(_) => {
                K::Internal
            }
        }
    }
}

impl From<HotplugError> for api::ApiError {
    fn from(e: HotplugError) -> Self {
        api::ApiError::new(e.api_kind(), e.to_string())
    }
}

/// What the guest is told about a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Signal {
    Added,
    RemovalRequested,
    RemovalWithdrawn,
}

struct Removal {
    id: String,
    mechanism: SlotMechanism,
    requested: Instant,
    deadline: Instant,
}

/// The owner of every hotplug slot's lifecycle.
pub struct HotplugOwner {
    plan: HotplugPlan,
    ged: Arc<Ged>,
    acpi: Arc<PciHotplugController>,
    native: BTreeMap<String, Arc<Mutex<PciePort>>>,
    completions: Arc<CompletionQueue>,
    /// Hot-plugged devices by the slot they occupy.
    occupants: BTreeMap<SlotMechanism, String>,
    removals: Vec<Removal>,
    timer: TimerFd,
    /// Whether the guest can take the GED's interrupt now.
    guest_ready: Box<dyn Fn() -> bool + Send>,
}

impl HotplugOwner {
    /// An owner for `plan`'s slots. `guest_ready` tells whether the guest
    /// has programmed its interrupt controllers for the GED's line.
    pub fn new(
        plan: HotplugPlan,
        ged: Arc<Ged>,
        acpi: Arc<PciHotplugController>,
        native: BTreeMap<String, Arc<Mutex<PciePort>>>,
        completions: Arc<CompletionQueue>,
        guest_ready: Box<dyn Fn() -> bool + Send>,
    ) -> std::io::Result<Self> {
        let timer = TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        Ok(HotplugOwner {
            plan,
            ged,
            acpi,
            native,
            completions,
            occupants: BTreeMap::new(),
            removals: Vec::new(),
            timer,
            guest_ready,
        })
    }

    /// The plan the slots follow.
    pub fn plan(&self) -> &HotplugPlan {
        &self.plan
    }

    /// The completion queue's descriptor (for the event loop).
    pub fn completion_fd(&self) -> RawFd {
        self.completions.fd()
    }

    /// The deadline/poll timer's descriptor (for the event loop).
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Whether a removal of `id` is in flight.
    pub fn removing(&self, id: &str) -> bool {
        self.removals.iter().any(|r| r.id == id)
    }

    /// Tells the guest that device `id` appeared at `mechanism`'s slot.
    pub fn announce(&mut self, id: &str, mechanism: &SlotMechanism) -> Result<(), HotplugError> {
        if *mechanism == SlotMechanism::None {
            return Err(HotplugError::NoHotplug(id.to_string()));
        }
        self.occupants.insert(mechanism.clone(), id.to_string());
        self.signal(mechanism, Signal::Added)
    }

    /// Asks the guest to release device `id`; it is released when the
    /// guest completes (an [`Outcome::Released`] from [`HotplugOwner::process`])
    /// or withdrawn at `timeout`. Returns `true` if the guest had never
    /// taken the device, which is then released at once: `enumerated` is
    /// false (the guest never read the function's identity, whatever the
    /// mechanism; the announcement is taken back), or its native slot was
    /// never powered on. Both orders of add and removal work.
    pub fn request_removal(
        &mut self,
        id: &str,
        mechanism: &SlotMechanism,
        timeout: Duration,
        enumerated: bool,
    ) -> Result<bool, HotplugError> {
        if *mechanism == SlotMechanism::None {
            return Err(HotplugError::NoHotplug(id.to_string()));
        }
        if self.removing(id) {
            return Err(HotplugError::AlreadyRemoving(id.to_string()));
        }
        if !enumerated {
            match mechanism {
                SlotMechanism::Acpi { bsel, slot } => {
                    self.acpi.withdraw_add(*bsel, *slot);
                }
                _ => self.signal(mechanism, Signal::RemovalRequested)?,
            }
            self.occupants.remove(mechanism);
            return Ok(true);
        }
        self.signal(mechanism, Signal::RemovalRequested)?;
        if let SlotMechanism::Native { port } = mechanism {
            if self.native_released(port) {
                self.occupants.remove(mechanism);
                return Ok(true);
            }
        }
        let now = Instant::now();
        self.removals.push(Removal {
            id: id.to_string(),
            mechanism: mechanism.clone(),
            requested: now,
            deadline: now + timeout,
        });
        self.arm();
        Ok(false)
    }

    /// Presses the ACPI power button (held like every GED event until the
    /// guest can take it).
    pub fn power_button(&mut self) -> Result<(), HotplugError> {
        self.ged
            .notify(GED_EVENT_POWER_BUTTON)
            .map_err(HotplugError::Notify)?;
        self.arm();
        Ok(())
    }

    /// Handles what happened since the last call: the guest's completions,
    /// removal deadlines, and the GED's readiness. Call when either
    /// descriptor is readable.
    pub fn process(&mut self) -> Vec<Outcome> {
        // The timer is not read: re-arming it below (timerfd_settime)
        // resets its expiration count, which is what made it readable.
        let mut out = Vec::new();
        for c in self.completions.drain() {
            match c {
                Completion::AcpiEjected { bsel, slot } => {
                    let m = SlotMechanism::Acpi { bsel, slot };
                    match self.occupants.remove(&m) {
                        Some(id) => {
                            self.removals.retain(|r| r.id != id);
                            out.push(Outcome::Released { id });
                        }
                        None => log::debug!(
                            "hotplug: the guest ejected empty or cold-plugged slot {slot} of bus selector {bsel}"
                        ),
                    }
                }
                Completion::SlotReleased { port } => {
                    log::debug!("hotplug: port {port}: power indicator off");
                    let m = SlotMechanism::Native { port: port.clone() };
                    let pending = self.removals.iter().any(|r| r.mechanism == m);
                    if pending && self.native_released(&port) {
                        if let Some(id) = self.occupants.remove(&m) {
                            self.removals.retain(|r| r.id != id);
                            out.push(Outcome::Released { id });
                        }
                    }
                }
            }
        }
        out.extend(self.expire(Instant::now()));
        if self.ged.holding() && (self.guest_ready)() {
            log::info!("hotplug: the guest can take GED interrupts; raising the held events");
            if let Err(e) = self.ged.set_ready() {
                log::warn!("hotplug: cannot raise the GED interrupt: {e}");
            }
        }
        self.arm();
        out
    }

    /// Withdraws every removal in flight (the VM is stopping); returns the
    /// ids whose requests wait.
    pub fn abandon(&mut self) -> Vec<String> {
        self.removals.drain(..).map(|r| r.id).collect()
    }

    fn expire(&mut self, now: Instant) -> Vec<Outcome> {
        let (expired, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.removals)
            .into_iter()
            .partition(|r| r.deadline <= now);
        self.removals = kept;
        expired
            .into_iter()
            .map(|r| {
                if let Err(e) = self.signal(&r.mechanism, Signal::RemovalWithdrawn) {
                    log::warn!("hotplug: cannot withdraw the removal of {}: {e}", r.id);
                }
                log::warn!("hotplug: the guest did not release {} in time", r.id);
                Outcome::Withdrawn {
                    id: r.id,
                    after: r.deadline.saturating_duration_since(r.requested),
                }
            })
            .collect()
    }

    /// Whether native port `port`'s slot is empty and its power indicator off.
    fn native_released(&self, port: &str) -> bool {
        self.native.get(port).is_some_and(|p| {
            p.lock()
                .unwrap_or_else(|e| e.into_inner())
                .removal_complete()
        })
    }

    /// Re-arms the timer for the next deadline, or the readiness poll
    /// while the GED holds events, or disarms it.
    fn arm(&mut self) {
        let now = Instant::now();
        let mut next = self
            .removals
            .iter()
            .map(|r| r.deadline.saturating_duration_since(now))
            .min();
        if self.ged.holding() {
            next = Some(next.map_or(READY_POLL, |n| n.min(READY_POLL)));
        }
        let r = match next {
            // A zero duration would disarm the timer: fire as soon as possible.
            Some(d) => self.timer.reset(d.max(Duration::from_micros(1)), None),
            None => self.timer.clear(),
        };
        if let Err(e) = r {
            log::warn!("hotplug: cannot arm the timer: {e}");
        }
    }

    /// Tells the guest about a slot through its mechanism.
    fn signal(&mut self, m: &SlotMechanism, s: Signal) -> Result<(), HotplugError> {
        match m {
            SlotMechanism::Acpi { bsel, slot } => {
                match s {
                    Signal::Added => self.acpi.device_added(*bsel, *slot),
                    Signal::RemovalRequested => self.acpi.request_removal(*bsel, *slot),
                    Signal::RemovalWithdrawn => {
                        self.acpi.cancel_removal(*bsel, *slot);
                        return Ok(());
                    }
                }
                self.ged
                    .notify(GED_EVENT_PCI_HOTPLUG)
                    .map_err(HotplugError::Notify)?;
                self.arm();
                Ok(())
            }
            SlotMechanism::Native { port } => {
                let p = self
                    .native
                    .get(port)
                    .ok_or_else(|| HotplugError::UnknownPort(port.clone()))?;
                // Presence changes are held by the port until the guest
                // enables its slot interrupts.
                p.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .card_present(s != Signal::RemovalRequested)
                    .map(|_| ())
                    .map_err(|source| HotplugError::Port {
                        port: port.clone(),
                        source,
                    })
            }
            SlotMechanism::None => Ok(()),
        }
    }
}

/// Whether the guest has programmed an interrupt controller to deliver
/// legacy line `gsi` (below 16): its IOAPIC pin is unmasked, or the PIC
/// was initialised (vector base moved off the exception vectors) with the
/// line unmasked. Linux unmasks the line when a driver requests it, so
/// for the GED this means "the guest's GED driver is listening".
pub fn gsi_deliverable(vm: &kvm_ioctls::VmFd, gsi: u32) -> bool {
    use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER};
    if gsi >= 16 {
        return false;
    }
    let mut ioapic = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    if vm.get_irqchip(&mut ioapic).is_ok() {
        // SAFETY: KVM filled the `ioapic` member for KVM_IRQCHIP_IOAPIC;
        // every member of the union is plain data.
        let entry = unsafe { ioapic.chip.ioapic.redirtbl[gsi as usize].bits };
        if entry & (1 << 16) == 0 {
            return true;
        }
    }
    let mut pic = kvm_irqchip {
        chip_id: KVM_IRQCHIP_PIC_MASTER,
        ..Default::default()
    };
    if vm.get_irqchip(&mut pic).is_ok() {
        // SAFETY: KVM filled the `pic` member for KVM_IRQCHIP_PIC_MASTER;
        // plain data.
        let p = unsafe { pic.chip.pic };
        return p.init_state == 0 && p.irq_base >= 0x20 && p.imr & (1 << gsi) == 0;
    }
    false
}

#[cfg(test)]
#[path = "hotplug_tests.rs"]
mod tests;
