//! The VM: creation (KVM, memory, devices, boot images, vCPUs) and the
//! event loop that serves the guest's platform events, hotplug
//! completions, console input and requests from the API or an embedder.
//!
//! The loop is an `event-manager` [`EventManager`] with one subscriber per
//! concern (platform exits, API requests, hotplug, the shutdown timer, the
//! console), as Firecracker's is. They share the VM's mutable state,
//! [`VmCore`], behind one mutex that only the loop thread takes (so it is
//! never contended); a subscriber holds it for one event.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use api::events::{EventBus, StopReason, Subscription, VmEventKind};
use api::types::{AddDeviceResponse, AddedFunction};
use api::types::{VmInfo, VmState, VmmPingResponse};
use api::{ApiError, ApiMessage, ApiReply, ApiRequest, ApiResponse, ReplySender};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Address, FileOffset, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use devices::acpi::GED_EVENT_POWER_BUTTON;
use pci::placement::HotplugPlan;

use crate::coalesced::{CoalescedPort, CoalescedRing};
use crate::device_manager::{Added, DeviceError, DeviceManager, GED_IRQ};
use crate::handle::{RunningVm, VmmHandle};
use crate::hotplug::{self, CompletionQueue, HotplugOwner, Outcome};
use crate::interrupts::GsiRouting;
use crate::pci_manager::PciManager;
use crate::terminal::{ConsoleEscape, EscapeAction, RawMode};
use crate::vcpu::{self, VcpuContext, VcpuEvent, VcpuHandle};
use crate::{acpi, boot, cpu, layout, mptable, Error, ExitReason, Result, SerialOutput, VmConfig};
use pci::BarAllocator;
use vm_memory::GuestMemoryAtomic;

/// An anonymous shared-memory file of `size` bytes for guest RAM. RAM is a
/// shared mapping of it (not private anonymous memory) so that another
/// process can map the same pages from the descriptor: a vfio-user device
/// server receives it with each DMA region (see `devices::vfio`).
fn memfd(size: u64) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns
    // a new descriptor we own or -1.
    let fd = unsafe { libc::memfd_create(c"arbor-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

fn create_memory(vm: &VmFd, size: u64) -> Result<GuestMemoryMmap> {
    let ranges: Vec<_> = layout::ram_ranges(size)
        .into_iter()
        .map(|(a, s)| (a, s as usize))
        .collect();
    let file = memfd(size).map_err(|e| Error::Memory(size >> 20, format!("memfd: {e}")))?;
    let file = Arc::new(file);
    let mut offset = 0u64;
    let mut with_files = Vec::with_capacity(ranges.len());
    for (a, s) in ranges {
        with_files.push((a, s, Some(FileOffset::from_arc(file.clone(), offset))));
        offset += s as u64;
    }
    let mem = GuestMemoryMmap::from_ranges_with_files(&with_files)
        .map_err(|e| Error::Memory(size >> 20, e.to_string()))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::Memory(size >> 20, e.to_string()))?;
        // Guest RAM stays out of the VMM's core dumps: it is large and holds
        // the guest's secrets.
        // SAFETY: madvise only sets a flag on the pages of this live mapping
        // (`host`, `region.len()` bytes, owned by `mem`); no memory is touched.
        if unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_DONTDUMP) } != 0 {
            return Err(Error::Memory(
                size >> 20,
                format!(
                    "madvise(MADV_DONTDUMP): {}",
                    std::io::Error::last_os_error()
                ),
            ));
        }
        // Transparent huge pages where the host allows them for shared
        // memory (`shmem_enabled` advise, within_size or always), as QEMU
        // asks for its RAM: fewer TLB misses for the guest. Best effort.
        // SAFETY: as above, a hint on this live mapping; no memory is touched.
        if unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) } != 0 {
            log::debug!(
                "madvise(MADV_HUGEPAGE) on guest RAM: {}",
                std::io::Error::last_os_error()
            );
        }
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `mem`; `Vm` drops the
        // VM fd before the memory, so KVM never uses a stale mapping.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| Error::KvmSetup("set_user_memory_region", e))?;
    }
    Ok(mem)
}

/// The KVM device: `/dev/kvm`, or the path in `ARBOR_KVM_DEVICE`.
pub fn kvm_device_path() -> String {
    std::env::var("ARBOR_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".to_string())
}

/// Opens the KVM device ([`kvm_device_path`]).
fn open_kvm() -> Result<Kvm> {
    let path = kvm_device_path();
    let c = std::ffi::CString::new(path.clone())
        .map_err(|_| Error::OpenKvm(path.clone(), kvm_ioctls::Error::new(libc::EINVAL)))?;
    Kvm::new_with_path(&c).map_err(|e| Error::OpenKvm(path, e))
}

fn create_vm(kvm: &Kvm) -> Result<VmFd> {
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(Error::KvmVersion(version));
    }
    for (cap, name) in [
        (kvm_ioctls::Cap::Irqchip, "in-kernel irqchip"),
        (kvm_ioctls::Cap::Irqfd, "irqfd"),
        (kvm_ioctls::Cap::Ioeventfd, "ioeventfd"),
        (kvm_ioctls::Cap::UserMemory, "user memory"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::KvmCap(name));
        }
    }
    let vm = kvm.create_vm().map_err(Error::CreateVm)?;
    vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
        .map_err(|e| Error::KvmSetup("set_tss_address", e))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
        .map_err(|e| Error::KvmSetup("set_identity_map_address", e))?;
    vm.create_irq_chip()
        .map_err(|e| Error::KvmSetup("create_irq_chip", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| Error::KvmSetup("create_pit2", e))?;
    Ok(vm)
}

/// How long `vm.pause` waits for each device's request in progress.
const DEVICE_PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The VM's mutable state, shared by the event loop's subscribers.
struct VmCore {
    config: VmConfig,
    // Field order matters for drop: vCPUs and devices go first.
    vcpus: Vec<VcpuHandle>,
    pending_vcpus: Vec<VcpuFd>,
    /// The VM's ring of coalesced port writes (see [`crate::coalesced`]).
    coalesced: Option<Arc<CoalescedRing>>,
    devices: DeviceManager,
    hotplug: HotplugOwner,
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    state: VmState,
    vcpu_events: Receiver<VcpuEvent>,
    vcpu_events_tx: Sender<VcpuEvent>,
    vcpu_wake: EventFd,
    api_rx: SharedReceiver,
    api_wake: Arc<EventFd>,
    shutdown_timer: TimerFd,
    events: EventBus,
    /// Removal requests waiting for the guest, by device id.
    removal_replies: BTreeMap<String, ReplySender>,
    /// When each removal in progress was asked for, and where the device is.
    removals: BTreeMap<String, (Instant, String)>,
    /// `vm.boot`'s answer, sent once the vCPUs run.
    boot_reply: Option<ReplySender>,
    /// Set when the loop should end.
    exit: Option<Result<ExitReason>>,
    start: Instant,
    /// The console's escape keys, when stdin is a terminal.
    escape: Option<ConsoleEscape>,
}

/// The receiving end of the request channel, shared between the VMM's
/// lifecycle loop ([`crate::Vmm`]) and the VM's event loop; only one of
/// them reads at a time.
pub(crate) type SharedReceiver = Arc<Mutex<Receiver<ApiMessage>>>;

/// The request channel and event bus a VM is built with.
pub(crate) struct Link {
    pub tx: Sender<ApiMessage>,
    pub rx: SharedReceiver,
    pub wake: Arc<EventFd>,
    pub events: EventBus,
    /// Whether requests still queued when the VM stops are refused (the
    /// VM owns the channel) or left for the lifecycle loop.
    pub refuse_after_stop: bool,
}

impl Link {
    /// A channel and bus of the VM's own.
    fn new() -> Result<Link> {
        let (tx, rx) = channel();
        Ok(Link {
            tx,
            rx: Arc::new(Mutex::new(rx)),
            wake: Arc::new(EventFd::new(EFD_NONBLOCK).map_err(Error::EventLoop)?),
            events: EventBus::new(),
            refuse_after_stop: true,
        })
    }
}

/// A built VM.
pub struct Vm {
    config: VmConfig,
    // Field order matters for drop: the core (vCPUs, devices) goes before
    // the VM fd and the guest memory they use.
    core: Arc<Mutex<VmCore>>,
    /// Shared with the PCI manager and interrupt routing; dropped after
    /// the devices and before the guest memory.
    _vm: Arc<VmFd>,
    memory: GuestMemoryMmap,
    _kvm: Kvm,
    api_tx: Sender<ApiMessage>,
    api_wake: Arc<EventFd>,
    refuse_after_stop: bool,
}

impl Vm {
    /// Validates `config`, creates the VM, loads the kernel and prepares
    /// the vCPUs. Nothing runs until [`Vm::run`] or [`Vm::start`].
    pub fn new(config: VmConfig) -> Result<Vm> {
        Vm::build(config, Link::new()?)
    }

    /// [`Vm::new`] on a given request channel and event bus.
    pub(crate) fn build(config: VmConfig, link: Link) -> Result<Vm> {
        let start = Instant::now();
        let topology = config.validate()?;
        // Before any thread starts: each reads the mode when it installs
        // its filter.
        crate::seccomp::set_mode(config.seccomp);
        let kvm = open_kvm()?;
        let vm = Arc::new(create_vm(&kvm)?);
        let memory = create_memory(&vm, config.memory)?;
        let completions = CompletionQueue::new().map_err(Error::EventLoop)?;
        let mut devices = DeviceManager::new(&vm, &config.serial, start, completions.clone())?;

        // The PCI Express root complex.
        let routing = GsiRouting::new(vm.clone()).map_err(Error::EventLoop)?;
        let (mmio32, mmio64) = layout::pci_windows(config.memory);
        let windows = acpi::PciWindows {
            mmio32,
            mmio64,
            buses: acpi::root_bus_range(topology.last_bus(), &config.cmdline),
        };
        let rest = topology.remaining_windows();
        let allocator = BarAllocator::new(rest.io, rest.mmio32, Some(rest.mmio64))
            .map_err(|e| Error::Device(crate::pci_manager::PciManagerError::Ports(e).into()))?;
        let pci = PciManager::new(
            devices.io.clone(),
            vm.clone(),
            routing,
            allocator,
            GuestMemoryAtomic::new(memory.clone()),
            topology,
            completions.clone(),
        )
        .map_err(|e| Error::Device(e.into()))?;
        pci.register_config_access(layout::PCI_ECAM_START, layout::PCI_ECAM_SIZE)
            .map_err(|e| Error::Device(e.into()))?;
        devices.pci = Some(pci.clone());
        devices.placement_order = config.placement_order.clone();
        devices.path_policy = config
            .check_paths
            .then(|| crate::confine::PathPolicy::for_config(&config, &config.allow_paths));
        // Cold plug does not depend on the hotplug plan, which is computed
        // once the cold-plugged devices have their slots.
        let cold_plan = HotplugPlan::new(pci.topology(), &[]);
        for d in &config.disks {
            let rec = devices.add_disk(d, false, &cold_plan)?;
            log::info!("disk {} ({}) at {}", rec.id, d.path, rec.path);
        }
        for r in &config.rngs {
            let rec = devices.add_rng(r, false, &cold_plan)?;
            log::info!("rng {} at {}", rec.id, rec.path);
        }
        if let Some(v) = &config.vsock {
            devices.add_vsock(v, false, &cold_plan)?;
        }
        for u in &config.user_devices {
            devices.add_user_device(u, false, &cold_plan)?;
        }
        for d in &config.vfio_devices {
            devices.add_device(d, false, &cold_plan)?;
        }
        for n in &config.nets {
            devices.add_net(n, None, false, &cold_plan)?;
        }
        // Every cold-plugged slot needs its function 0: the guest finds
        // functions 1-7 only through it.
        pci::placement::check_cold_slots(&devices.cold_paths())
            .map_err(|e| Error::Device(e.into()))?;
        let plan = HotplugPlan::new(pci.topology(), &devices.cold_paths());

        let mut dsdt = acpi::platform_aml();
        let root_pins = pci::intx::routed_root_pins(pci.topology());
        dsdt.extend(acpi::host_bridge_aml(&windows, &root_pins, &[]));
        dsdt.extend(devices.dsdt_aml(&plan));
        let mcfg = acpi::mcfg(layout::PCI_ECAM_START, windows.buses);
        let rsdp = acpi::write_tables(&memory, config.cpus, &dsdt, &[mcfg])?;
        let pci_intx: Vec<(u8, u8, u32)> = root_pins
            .iter()
            .map(|&(slot, pin)| (slot, pin, pci::intx::root_intx_gsi(slot, pin)))
            .collect();
        mptable::write(&memory, config.cpus, &pci_intx)?;
        let boot = boot::load(
            &memory,
            &config.kernel,
            config.initramfs.as_deref(),
            &config.cmdline,
            rsdp.raw_value(),
        )?;

        let base_cpuid = cpu::supported_cpuid(&kvm)?;
        let mut pending_vcpus = Vec::new();
        for id in 0..config.cpus {
            let vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(|e| Error::KvmSetup("create_vcpu", e))?;
            let mut cpuid = base_cpuid.clone();
            cpu::patch_cpuid(&mut cpuid, id, config.cpus);
            vcpu.set_cpuid2(&cpuid).map_err(cpu::CpuError::SetCpuid)?;
            cpu::setup_msrs(&vcpu)?;
            cpu::setup_fpu(&vcpu)?;
            cpu::setup_lapic(&vcpu)?;
            if id == 0 {
                cpu::setup_boot_registers(&vcpu, &memory, boot.entry)?;
            }
            pending_vcpus.push(vcpu);
        }
        let coalesced = coalesce_ports(&kvm, &vm, pending_vcpus.first(), &devices);

        let vm_for_ready = vm.clone();
        let hotplug = HotplugOwner::new(
            plan,
            devices.ged.clone(),
            devices.hotplug.clone(),
            pci.native_ports(),
            completions,
            Box::new(move || hotplug::gsi_deliverable(&vm_for_ready, GED_IRQ)),
        )
        .map_err(Error::EventLoop)?;

        let (tx, rx) = channel();
        let Link {
            tx: api_tx,
            rx: api_rx,
            wake: api_wake,
            events,
            refuse_after_stop,
        } = link;
        let core = VmCore {
            config: config.clone(),
            vcpus: Vec::new(),
            pending_vcpus,
            coalesced,
            devices,
            hotplug,
            stop: Arc::new(AtomicBool::new(false)),
            paused: Arc::new(AtomicBool::new(false)),
            state: VmState::Created,
            vcpu_events: rx,
            vcpu_events_tx: tx,
            vcpu_wake: EventFd::new(EFD_NONBLOCK).map_err(Error::EventLoop)?,
            api_rx,
            api_wake: api_wake.clone(),
            shutdown_timer: TimerFd::new()
                .map_err(|e| Error::EventLoop(std::io::Error::from_raw_os_error(e.errno())))?,
            events,
            removal_replies: BTreeMap::new(),
            removals: BTreeMap::new(),
            boot_reply: None,
            exit: None,
            escape: None,
            start,
        };
        core.events.emit(VmEventKind::Created);
        Ok(Vm {
            config,
            core: Arc::new(Mutex::new(core)),
            _vm: vm,
            memory,
            _kvm: kvm,
            api_tx,
            api_wake,
            refuse_after_stop,
        })
    }

    /// The VM's `vm.info`.
    pub fn info(&self) -> VmInfo {
        lock(&self.core).info()
    }

    /// The VM's life-cycle state.
    pub fn state(&self) -> VmState {
        lock(&self.core).state
    }

    /// Answers one request while the VM's event loop is not running
    /// (created, or stopped).
    pub(crate) fn serve_request(&self, msg: ApiMessage) {
        lock(&self.core).handle_request(msg)
    }

    /// Runs the VM (see [`Vm::run`]), answering `reply` (`vm.boot`) once its
    /// vCPUs run, or with the error that kept them from starting.
    pub(crate) fn boot(&mut self, reply: ReplySender) -> Result<ExitReason> {
        lock(&self.core).boot_reply = Some(reply);
        self.run()
    }

    /// The configuration this VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The guest's memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// A handle for requests. Requests sent before the VM runs are served
    /// before its first vCPU starts.
    pub fn handle(&self) -> VmmHandle {
        VmmHandle::new(self.api_tx.clone(), self.api_wake.clone())
    }

    /// A new follower of the VM's events (see [`api::events`]).
    pub fn subscribe(&mut self) -> Subscription {
        lock(&self.core).events.subscribe()
    }

    /// Runs the VM on a new thread.
    pub fn start(mut self) -> Result<RunningVm> {
        let handle = self.handle();
        let thread = std::thread::Builder::new()
            .name("arbor-vmm".into())
            .spawn(move || self.run())
            .map_err(Error::Thread)?;
        Ok(RunningVm { thread, handle })
    }

    /// Runs the VM until it stops. Blocks the calling thread, which serves
    /// the event loop.
    pub fn run(&mut self) -> Result<ExitReason> {
        let mut em: EventManager<Box<dyn MutEventSubscriber>> =
            EventManager::new().map_err(Error::EventManager)?;
        let (platform, api, hotplug, timer) = {
            let c = lock(&self.core);
            (
                vec![
                    c.devices.events.power_off.as_raw_fd(),
                    c.devices.events.reset.as_raw_fd(),
                    c.vcpu_wake.as_raw_fd(),
                ],
                c.api_wake.as_raw_fd(),
                vec![c.hotplug.completion_fd(), c.hotplug.timer_fd()],
                c.shutdown_timer.as_raw_fd(),
            )
        };
        let core = &self.core;
        em.add_subscriber(Box::new(PlatformSubscriber(Watch::new(core, platform))));
        em.add_subscriber(Box::new(ApiSubscriber(Watch::new(core, vec![api]))));
        em.add_subscriber(Box::new(HotplugSubscriber(Watch::new(core, hotplug))));
        em.add_subscriber(Box::new(ShutdownTimerSubscriber(Watch::new(
            core,
            vec![timer],
        ))));
        let stdin = std::io::stdin();
        // SAFETY: isatty only inspects the descriptor.
        let tty = unsafe { libc::isatty(stdin.as_raw_fd()) } == 1;
        // Guest input comes from a terminal, or from a pipe or socket (a
        // program driving the guest's shell, as the tests do); never from a
        // regular file or /dev/null.
        let input = self.config.serial == SerialOutput::Stdout
            && (tty || stdin_is_stream(stdin.as_raw_fd()));
        let _raw = if input {
            em.add_subscriber(Box::new(ConsoleSubscriber(Watch::new(
                core,
                vec![stdin.as_raw_fd()],
            ))));
            if tty {
                lock(core).escape = Some(ConsoleEscape::default());
                RawMode::enter(stdin.as_raw_fd())
            } else {
                None
            }
        } else {
            None
        };

        {
            let mut c = lock(core);
            // The VM runs from here on. Requests sent before are served
            // before the first vCPU starts (an early hotplug is held by the
            // hotplug owner until the guest can take it; a pause parks the
            // vCPUs before their first instruction).
            if c.state != VmState::Created {
                let why = format!("the VM is {}; only a created VM boots", c.state.describe());
                if let Some(r) = c.boot_reply.take() {
                    let _ = r.send(Err(ApiError::conflict(why)));
                }
                return Err(Error::AlreadyStarted);
            }
            c.state = VmState::Running;
            c.serve_api();
            // What building the VM freed (table and AML buffers, the
            // kernel's headers) need not stay resident while it runs.
            devices::release_free_heap();
            if c.exit.is_none() {
                if let Err(e) = c.start_vcpus() {
                    c.exit = Some(Err(e));
                }
            }
            let booted = match &c.exit {
                None => {
                    c.events.emit(VmEventKind::Booted);
                    Ok(ApiResponse::Empty)
                }
                Some(Err(e)) => Err(ApiError::internal(format!("cannot boot the VM: {e}"))),
                Some(Ok(_)) => Err(ApiError::conflict("the VM was stopped before it booted")),
            };
            if let Some(r) = c.boot_reply.take() {
                let _ = r.send(booted);
            }
        }
        // Setup done: the vCPUs run (they install their own filters).
        crate::seccomp::install(crate::seccomp::ThreadKind::EventLoop);
        let outcome = loop {
            if let Some(exit) = lock(core).exit.take() {
                break exit;
            }
            if let Err(e) = em.run() {
                break Err(Error::EventManager(e));
            }
        };
        drop(em);
        let mut c = lock(core);
        c.stop_vcpus();
        c.state = VmState::Shutdown;
        let (reason, error) = match &outcome {
            Ok(ExitReason::PowerOff) => {
                c.events.emit(VmEventKind::PowerOff);
                (StopReason::PowerOff, None)
            }
            Ok(ExitReason::Reset) => {
                c.events.emit(VmEventKind::Reboot);
                (StopReason::Reboot, None)
            }
            Ok(ExitReason::Shutdown) => (StopReason::Shutdown, None),
            Ok(ExitReason::VmmShutdown) => (StopReason::VmmShutdown, None),
            Err(e) => (StopReason::Error, Some(e.to_string())),
        };
        c.events.emit(VmEventKind::Stopped { reason, error });
        c.removals.clear();
        for id in c.hotplug.abandon() {
            if let Some(r) = c.removal_replies.remove(&id) {
                let _ = r.send(Err(ApiError::conflict(
                    "the VM stopped before the guest released the device",
                )));
            }
        }
        for (_, r) in std::mem::take(&mut c.removal_replies) {
            let _ = r.send(Err(ApiError::conflict("the VM has stopped")));
        }
        // Refuse whatever is still queued, unless the lifecycle loop
        // takes over the channel.
        if self.refuse_after_stop {
            let rx = c.api_rx.clone();
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            while let Ok(msg) = rx.try_recv() {
                let _ = msg
                    .reply
                    .send(Err(ApiError::conflict("the VM has stopped")));
            }
        }
        let _ = std::io::Write::flush(&mut std::io::stdout());
        outcome
    }
}

/// Maps the VM's coalesced-write ring and coalesces the CF8 address latch
/// and the UART's transmit register (while no transmit interrupt is on);
/// see [`crate::coalesced`]. Without the ring every write exits, as before.
fn coalesce_ports(
    kvm: &Kvm,
    vm: &Arc<VmFd>,
    vcpu: Option<&VcpuFd>,
    devices: &DeviceManager,
) -> Option<Arc<CoalescedRing>> {
    let ring = match CoalescedRing::map(kvm, vcpu?) {
        Ok(Some(ring)) => Arc::new(ring),
        Ok(None) => {
            log::debug!("no coalesced port I/O: every port write exits");
            return None;
        }
        Err(e) => {
            log::warn!("cannot map the coalesced-write ring ({e}): every port write exits");
            return None;
        }
    };
    // The address latch only: a write to it has no effect but the next
    // data-port access, which exits and so drains the ring first.
    CoalescedPort::new(vm.clone(), pci::config_io::PCI_CONFIG_IO_PORT, 4).set(true);
    let mut thr = CoalescedPort::new(vm.clone(), devices::legacy::SERIAL_PORT, 1);
    devices
        .serial
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .set_tx_coalescing(Box::new(move |on| thr.set(on)));
    Some(ring)
}

fn lock(core: &Mutex<VmCore>) -> MutexGuard<'_, VmCore> {
    core.lock().unwrap_or_else(|e| e.into_inner())
}

impl VmCore {
    fn finish(&mut self, outcome: Result<ExitReason>) {
        if self.exit.is_none() {
            self.exit = Some(outcome);
        }
    }

    fn start_vcpus(&mut self) -> Result<()> {
        if self.pending_vcpus.is_empty() {
            return Err(Error::AlreadyStarted);
        }
        vcpu::install_kick_handler().map_err(Error::Thread)?;
        for (id, fd) in self.pending_vcpus.drain(..).enumerate() {
            let ctx = VcpuContext {
                io: self.devices.io.clone(),
                stop: self.stop.clone(),
                paused: self.paused.clone(),
                events: self.vcpu_events_tx.clone(),
                wake: self.vcpu_wake.try_clone().map_err(Error::Thread)?,
                coalesced: self.coalesced.clone(),
            };
            self.vcpus
                .push(vcpu::spawn(id as u8, fd, ctx).map_err(Error::Thread)?);
        }
        log::info!(
            "{} vCPU(s) started {} us after VMM start",
            self.vcpus.len(),
            self.start.elapsed().as_micros()
        );
        Ok(())
    }

    fn stop_vcpus(&mut self) {
        self.stop.store(true, Ordering::Release);
        for v in &mut self.vcpus {
            v.join();
        }
        self.vcpus.clear();
    }

    fn pause(&mut self) -> ApiReply {
        if self.state != VmState::Running {
            return Err(ApiError::conflict(format!(
                "the VM is {}, not running",
                state_name(self.state)
            )));
        }
        self.paused.store(true, Ordering::Release);
        for v in &self.vcpus {
            v.wait_paused();
        }
        self.state = VmState::Paused;
        self.events.emit(VmEventKind::Paused);
        // Device back ends too: no queued request completes while paused.
        let busy = match &self.devices.pci {
            Some(pci) => pci.pause_devices(DEVICE_PAUSE_TIMEOUT),
            None => Vec::new(),
        };
        if !busy.is_empty() {
            let names: Vec<String> = busy.iter().map(|p| self.device_name(p)).collect();
            return Err(ApiError::internal(format!(
                "the vCPUs are paused, but device(s) {} did not stop within {:?}; they stop after their request in progress",
                names.join(", "),
                DEVICE_PAUSE_TIMEOUT
            )));
        }
        Ok(ApiResponse::Empty)
    }

    /// A device's id (or its path if it has none) for messages.
    fn device_name(&self, path: &pci::PciPath) -> String {
        self.devices
            .records
            .iter()
            .find(|r| &r.path == path)
            .map_or_else(|| path.to_string(), |r| r.id.clone())
    }

    fn resume(&mut self) -> ApiReply {
        if self.state != VmState::Paused {
            return Err(ApiError::conflict(format!(
                "the VM is {}, not paused",
                state_name(self.state)
            )));
        }
        if let Some(pci) = &self.devices.pci {
            pci.resume_devices();
        }
        self.paused.store(false, Ordering::Release);
        for v in &self.vcpus {
            v.unpark();
        }
        self.state = VmState::Running;
        self.events.emit(VmEventKind::Resumed);
        Ok(ApiResponse::Empty)
    }

    fn info(&self) -> VmInfo {
        VmInfo {
            state: self.state,
            cpus: Some(u32::from(self.config.cpus)),
            memory: Some(self.config.memory),
            devices: self.devices.device_info(),
            topology: self.devices.topology_info(self.hotplug.plan()),
        }
    }

    /// Answers every queued request.
    fn serve_api(&mut self) {
        let _ = self.api_wake.read();
        while self.exit.is_none() {
            let next = self
                .api_rx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .try_recv();
            let Ok(msg) = next else {
                break;
            };
            self.handle_request(msg);
        }
    }

    /// Answers one request (a removal is answered when the guest
    /// completes it, see [`VmCore::hotplug_outcome`]).
    fn handle_request(&mut self, msg: ApiMessage) {
        let ApiMessage { request, reply } = msg;
        log::info!("request {}", request.name());
        if let Some(refused) = self.refuse_in_state(&request) {
            let _ = reply.send(Err(refused));
            return;
        }
        let answer = match request {
            ApiRequest::VmmPing => Ok(ApiResponse::VmmPing(VmmPingResponse {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })),
            ApiRequest::VmInfo => Ok(ApiResponse::VmInfo(self.info())),
            ApiRequest::VmPause => self.pause(),
            ApiRequest::VmResume => self.resume(),
            ApiRequest::VmmShutdown => {
                self.finish(Ok(ExitReason::VmmShutdown));
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmShutdown => self.shutdown(),
            // Refused above: the lifecycle loop serves these when they apply.
            ApiRequest::VmCreate(_) | ApiRequest::VmBoot | ApiRequest::VmDelete => Err(
                ApiError::conflict(format!("the VM is {}", self.state.describe())),
            ),
            ApiRequest::VmAddDisk(cfg) => {
                let r = self
                    .devices
                    .add_disk(&cfg, true, self.hotplug.plan())
                    .map(Added::one);
                self.hotplugged(r)
            }
            ApiRequest::VmAddRng(cfg) => {
                let r = self
                    .devices
                    .add_rng(&cfg, true, self.hotplug.plan())
                    .map(Added::one);
                self.hotplugged(r)
            }
            ApiRequest::VmAddVsock(cfg) => {
                let r = self
                    .devices
                    .add_vsock(&cfg, true, self.hotplug.plan())
                    .map(Added::one);
                self.hotplugged(r)
            }
            ApiRequest::VmAddUserDevice(cfg) => {
                let r = self
                    .devices
                    .add_user_device(&cfg, true, self.hotplug.plan())
                    .map(Added::one);
                self.hotplugged(r)
            }
            ApiRequest::VmAddDevice(cfg) => {
                let r = self.devices.add_device(&cfg, true, self.hotplug.plan());
                self.hotplugged(r)
            }
            ApiRequest::VmAddNet(cfg, fds) => {
                // Descriptors the request does not use close with `fds`.
                let r = self
                    .devices
                    .add_net(&cfg, Some(&fds), true, self.hotplug.plan())
                    .map(Added::one);
                self.hotplugged(r)
            }
            ApiRequest::VmRemoveDevice(r) => match self.start_removal(&r.id) {
                Ok(true) => {
                    self.removal_replies.insert(r.id, reply);
                    return;
                }
                Ok(false) => {
                    self.release(&r.id);
                    Ok(ApiResponse::Empty)
                }
                Err(e) => Err(e),
            },
        };
        let _ = reply.send(answer);
    }

    /// The 409 for a request the VM's state does not allow, if any.
    fn refuse_in_state(&self, request: &ApiRequest) -> Option<ApiError> {
        let state = self.state.describe();
        let why = match (request, self.state) {
            (ApiRequest::VmCreate(_), _) => {
                format!("a VM exists (it is {state}); vm.delete it before creating another")
            }
            (ApiRequest::VmBoot, _) => format!("the VM is {state}; only a created VM boots"),
            (ApiRequest::VmDelete, _) => format!(
                "the VM is {state}; vm.delete needs a created or shut-down VM (vm.shutdown it first)"
            ),
            (ApiRequest::VmShutdown, VmState::Created | VmState::Shutdown) => {
                format!("the VM is {state}, not running")
            }
            (
                ApiRequest::VmAddDisk(_)
                | ApiRequest::VmAddRng(_)
                | ApiRequest::VmAddNet(..)
                | ApiRequest::VmAddVsock(_)
                | ApiRequest::VmAddUserDevice(_)
                | ApiRequest::VmAddDevice(_),
                VmState::Shutdown | VmState::NotCreated,
            ) => format!("the VM is {state}; devices are added to a created or running VM"),
            _ => return None,
        };
        Some(ApiError::conflict(why))
    }

    /// `vm.shutdown`: the power button, then a hard stop after the grace
    /// period.
    fn shutdown(&mut self) -> ApiReply {
        if self.state != VmState::Running {
            // A paused guest cannot see the button: stop now.
            self.finish(Ok(ExitReason::Shutdown));
            return Ok(ApiResponse::Empty);
        }
        let grace = self.config.shutdown_grace.max(Duration::from_millis(1));
        let pressed = self
            .shutdown_timer
            .reset(grace, None)
            .map_err(|e| format!("cannot arm the grace timer: {e}"))
            .and_then(|()| self.hotplug.power_button().map_err(|e| e.to_string()));
        match pressed {
            Ok(()) => {
                self.events.emit(VmEventKind::ShutdownRequested);
                Ok(ApiResponse::Empty)
            }
            Err(why) => {
                self.finish(Ok(ExitReason::Shutdown));
                Err(ApiError::internal(format!(
                    "cannot press the power button ({why}); the VM is stopped"
                )))
            }
        }
    }

    /// Announces what an add request placed, in placement order.
    /// A function 1-7 in a slot without function 0 is staged: the guest is
    /// not told. Function 0 commits its slot: one announcement for every
    /// function there (the bus shows function 0's multifunction bit). The
    /// answer names the first device (function 0 of the first slot, or the
    /// one function added) and, when the request added several functions,
    /// each of them; and the placement's warnings.
    fn hotplugged(&mut self, r: std::result::Result<Added, DeviceError>) -> ApiReply {
        let Added { records, warnings } = r?;
        for rec in &records {
            if rec.path.last().function == 0 {
                if let Err(e) = self.hotplug.announce(&rec.id, &rec.mechanism) {
                    log::warn!("cannot notify the guest of {}: {e}", rec.id);
                }
                let slot = self.devices.slot_records(&rec.path);
                if slot.len() > 1 {
                    let all: Vec<String> = slot
                        .iter()
                        .map(|r| format!("{} at {}", r.id, r.path))
                        .collect();
                    log::info!(
                        "committed multifunction slot {}: {}",
                        rec.path,
                        all.join(", ")
                    );
                }
                log::info!("hot-plugged {} at {}", rec.id, rec.path);
            } else if self.devices.is_staged(rec) {
                log::info!(
                    "staged {} at {}: the guest is told of the slot when its function 0 is added",
                    rec.id,
                    rec.path
                );
            }
            self.events.emit(VmEventKind::DeviceAdded {
                id: rec.id.clone(),
                pci_path: rec.path.to_string(),
            });
        }
        // Building the device allocated and freed much; see
        // `devices::release_free_heap`.
        devices::release_free_heap();
        let first = records
            .iter()
            .find(|r| r.path.last().function == 0)
            .or(records.first())
            .ok_or_else(|| ApiError::internal("the request added no device"))?;
        let functions = match records.len() {
            1 => Vec::new(),
            _ => records
                .iter()
                .map(|r| AddedFunction {
                    id: r.id.clone(),
                    pci_path: r.path.to_string(),
                    host_bdf: r.host.as_ref().map(|h| h.bdf.clone()).unwrap_or_default(),
                })
                .collect(),
        };
        Ok(ApiResponse::DeviceAdded(AddDeviceResponse {
            id: first.id.clone(),
            pci_path: first.path.to_string(),
            functions,
            warnings,
        }))
    }

    /// Asks the guest to release device `id`. `Ok(true)`: wait for the
    /// guest; `Ok(false)`: the guest never took it, free it now.
    fn start_removal(&mut self, id: &str) -> std::result::Result<bool, ApiError> {
        let rec = self.devices.removable(id)?;
        let (mechanism, path) = (rec.mechanism.clone(), rec.path.clone());
        if let pci::placement::Removal::Staged(_) = self.devices.removal(id)? {
            // The guest never saw it: no request, whatever the VM's state.
            self.removals
                .insert(id.to_string(), (Instant::now(), path.to_string()));
            self.events.emit(VmEventKind::DeviceRemovalRequested {
                id: id.to_string(),
                pci_path: path.to_string(),
            });
            log::info!("{id} at {path} is a staged function: dropped at once");
            return Ok(false);
        }
        if self.state != VmState::Running {
            return Err(ApiError::conflict(format!(
                "the VM is {}; the guest must run to release a device",
                state_name(self.state)
            )));
        }
        let enumerated = self
            .devices
            .pci
            .as_ref()
            .is_none_or(|pci| pci.enumerated(&path));
        let released =
            self.hotplug
                .request_removal(id, &mechanism, self.config.remove_timeout, enumerated)?;
        self.removals
            .insert(id.to_string(), (Instant::now(), path.to_string()));
        self.events.emit(VmEventKind::DeviceRemovalRequested {
            id: id.to_string(),
            pci_path: path.to_string(),
        });
        if released {
            log::info!("{id} at {path} was never taken by the guest: released at once");
        } else {
            log::info!("asked the guest to release {id} at {path}");
        }
        Ok(!released)
    }

    /// Frees a device the guest released and answers its removal request.
    fn release(&mut self, id: &str) {
        let answer = match self.devices.remove(id) {
            Ok(freed) => {
                let after_ms = self
                    .removals
                    .remove(id)
                    .map_or(0, |(t, _)| t.elapsed().as_millis() as u64);
                // Function 0 takes its whole slot: each function is
                // reported.
                for rec in freed {
                    log::info!(
                        "removed {} from {}: the guest took {after_ms} ms",
                        rec.id,
                        rec.path
                    );
                    self.events.emit(VmEventKind::DeviceReleased {
                        id: rec.id.clone(),
                        pci_path: rec.path.to_string(),
                        after_ms,
                    });
                }
                Ok(ApiResponse::Empty)
            }
            Err(e) => Err(ApiError::internal(format!("cannot free {id}: {e}"))),
        };
        if let Some(r) = self.removal_replies.remove(id) {
            let _ = r.send(answer);
        }
    }

    fn hotplug_outcome(&mut self, o: Outcome) {
        match o {
            Outcome::Released { id } => {
                self.release(&id);
                // The device, its worker and their buffers are gone.
                devices::release_free_heap();
            }
            Outcome::Withdrawn { id, after } => {
                let pci_path = self
                    .removals
                    .remove(&id)
                    .map_or_else(String::new, |(_, p)| p);
                self.events.emit(VmEventKind::DeviceRemovalWithdrawn {
                    id: id.clone(),
                    pci_path,
                    after_ms: after.as_millis() as u64,
                });
                if let Some(r) = self.removal_replies.remove(&id) {
                    let _ = r.send(Err(ApiError::conflict(format!(
                        "the guest did not release device '{id}' within {after:?}; it is still attached, retry later"
                    ))));
                }
            }
        }
    }

    /// Moves what fits of the pending stdin input into the UART's receive
    /// FIFO.
    fn forward_stdin(&mut self) -> StdinState {
        let stdin = std::io::stdin().as_raw_fd();
        let mut buf = [0u8; 64];
        let mut serial = self
            .devices
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // With escape keys, a read may give the guest one byte more than it
        // holds (a Ctrl-A held back from the previous read, then released).
        let spare = usize::from(self.escape.is_some());
        let room = serial.fifo_room().saturating_sub(spare).min(buf.len());
        if room == 0 {
            return StdinState::FifoFull;
        }
        // Straight from the descriptor, not through std's buffered Stdin:
        // that would pull everything the pipe holds into its own buffer and
        // hand out only `room` bytes, and with the pipe then empty epoll
        // would not wake us for the rest (a long command line sent at once
        // stayed stuck until the next input).
        // SAFETY: `buf` is valid for writes of `room` bytes; the descriptor
        // is stdin, open for the process's life.
        let n = unsafe { libc::read(stdin, buf.as_mut_ptr().cast(), room) };
        if n == 0 {
            return StdinState::Closed;
        }
        let Ok(n) = usize::try_from(n) else {
            return StdinState::Open;
        };
        let Some(escape) = self.escape.as_mut() else {
            serial.enqueue_input(&buf[..n]);
            return StdinState::Open;
        };
        let mut guest = Vec::with_capacity(n + 1);
        let action = escape.filter(&buf[..n], &mut guest);
        serial.enqueue_input(&guest);
        drop(serial);
        match action {
            Some(EscapeAction::Quit) => {
                let _ = std::io::Write::write_all(
                    &mut std::io::stderr(),
                    b"\r\narbor: Ctrl-A x: stopping the VM\r\n",
                );
                self.finish(Ok(ExitReason::VmmShutdown));
            }
            Some(EscapeAction::Help) => {
                let _ = std::io::Write::write_all(
                    &mut std::io::stderr(),
                    crate::terminal::ESCAPE_HELP.as_bytes(),
                );
            }
            None => {}
        }
        StdinState::Open
    }
}

/// What every subscriber holds: the shared core and its descriptors.
struct Watch {
    core: Arc<Mutex<VmCore>>,
    fds: Vec<RawFd>,
}

impl Watch {
    fn new(core: &Arc<Mutex<VmCore>>, fds: Vec<RawFd>) -> Self {
        Watch {
            core: core.clone(),
            fds,
        }
    }

    /// Registers the descriptors; a failure ends the VM.
    fn init(&self, ops: &mut EventOps) {
        for fd in &self.fds {
            if let Err(e) = ops.add(Events::new_raw(*fd, EventSet::IN)) {
                lock(&self.core).finish(Err(Error::EventManager(e)));
            }
        }
    }

    fn core(&self) -> MutexGuard<'_, VmCore> {
        lock(&self.core)
    }
}

/// Guest power-off and reset, and vCPU exits.
struct PlatformSubscriber(Watch);

impl MutEventSubscriber for PlatformSubscriber {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let mut c = self.0.core();
        let fd = events.fd();
        if fd == c.devices.events.power_off.as_raw_fd() {
            log::info!("the guest powered off");
            c.finish(Ok(ExitReason::PowerOff));
        } else if fd == c.devices.events.reset.as_raw_fd() {
            log::info!("the guest asked for a reset");
            c.finish(Ok(ExitReason::Reset));
        } else {
            let _ = c.vcpu_wake.read();
            if let Ok(ev) = c.vcpu_events.try_recv() {
                c.finish(match ev {
                    VcpuEvent::PowerOff => Ok(ExitReason::PowerOff),
                    VcpuEvent::Reset => Ok(ExitReason::Reset),
                    VcpuEvent::Error(m) => Err(Error::Guest(m)),
                });
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.0.init(ops)
    }
}

/// Requests from the API server and embedders.
struct ApiSubscriber(Watch);

impl MutEventSubscriber for ApiSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.0.core().serve_api();
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.0.init(ops)
    }
}

/// The hotplug owner's completions and timer.
struct HotplugSubscriber(Watch);

impl MutEventSubscriber for HotplugSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let mut c = self.0.core();
        for o in c.hotplug.process() {
            c.hotplug_outcome(o);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.0.init(ops)
    }
}

/// The end of `vm.shutdown`'s grace period.
struct ShutdownTimerSubscriber(Watch);

impl MutEventSubscriber for ShutdownTimerSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let mut c = self.0.core();
        let _ = c.shutdown_timer.wait();
        let seen = c.devices.ged.take_acknowledged() & GED_EVENT_POWER_BUTTON != 0;
        log::warn!(
            "the guest did not power off within {:?} of the power button ({}); stopping it",
            c.config.shutdown_grace,
            if seen {
                "it read the button event"
            } else {
                "it never read the button event"
            }
        );
        c.finish(Ok(ExitReason::Shutdown));
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.0.init(ops)
    }
}

/// Whether `fd` is a pipe or a socket.
fn stdin_is_stream(fd: RawFd) -> bool {
    // SAFETY: `st` is plain data that fstat fills for the descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    let kind = st.st_mode & libc::S_IFMT;
    kind == libc::S_IFIFO || kind == libc::S_IFSOCK
}

/// Terminal (or pipe) input for the guest's UART.
struct ConsoleSubscriber(Watch);

/// What [`VmCore::forward_stdin`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StdinState {
    Open,
    /// End of input: stop watching stdin.
    Closed,
    /// The guest has not read the FIFO yet; input is left waiting.
    FifoFull,
}

impl MutEventSubscriber for ConsoleSubscriber {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let state = self.0.core().forward_stdin();
        if state == StdinState::Closed || events.event_set().contains(EventSet::HANG_UP) {
            let _ = ops.remove(events);
        } else if state == StdinState::FifoFull {
            // stdin stays readable (level-triggered) until the guest drains
            // the FIFO: poll at most once a millisecond instead of spinning,
            // with no lock held so the vCPU can read the UART meanwhile.
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.0.init(ops)
    }
}

fn state_name(s: VmState) -> &'static str {
    s.describe()
}

impl Drop for Vm {
    fn drop(&mut self) {
        lock(&self.core).stop_vcpus();
    }
}
