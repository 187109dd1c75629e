//! The VM: creation (KVM, memory, devices, boot images, vCPUs) and the
//! event loop that serves the guest's platform events, console input and
//! requests from the API or an embedder.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::types::AddDeviceResponse;
use api::types::{VmInfo, VmState, VmmPingResponse};
use api::{ApiError, ApiMessage, ApiReply, ApiRequest, ApiResponse, ReplySender};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use devices::acpi::GED_EVENT_POWER_BUTTON;

use crate::device_manager::{DeviceError, DeviceManager, DeviceRecord, Mechanism, SlotSignal};
use crate::handle::{RunningVm, VmEvent, VmmHandle};
use crate::interrupts::GsiRouting;
use crate::pci_manager::PciManager;
use crate::terminal::RawMode;
use crate::vcpu::{self, VcpuContext, VcpuEvent, VcpuHandle};
use crate::{acpi, boot, cpu, layout, Error, ExitReason, Result, SerialOutput, VmConfig};
use pci::BarAllocator;
use vm_memory::GuestMemoryAtomic;

const TOK_POWER_OFF: u64 = 1;
const TOK_RESET: u64 = 2;
const TOK_VCPU: u64 = 3;
const TOK_STDIN: u64 = 4;
const TOK_API: u64 = 5;
const TOK_SHUTDOWN_TIMER: u64 = 6;
const TOK_EJECT: u64 = 7;
const TOK_SLOT_POWER: u64 = 8;

/// A `vm.remove-device` waiting for the guest to release the device.
struct PendingRemoval {
    id: String,
    mechanism: Mechanism,
    reply: Option<ReplySender>,
    deadline: Instant,
}

/// A built VM.
pub struct Vm {
    config: VmConfig,
    // Field order matters for drop: vCPUs and devices go before the VM fd
    // and the guest memory they use.
    vcpus: Vec<VcpuHandle>,
    pending_vcpus: Vec<VcpuFd>,
    devices: DeviceManager,
    /// Shared with the PCI manager and interrupt routing; dropped after
    /// the devices and before the guest memory.
    _vm: Arc<VmFd>,
    memory: GuestMemoryMmap,
    _kvm: Kvm,
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    state: VmState,
    vcpu_events: Receiver<VcpuEvent>,
    vcpu_events_tx: Sender<VcpuEvent>,
    vcpu_wake: EventFd,
    api_rx: Receiver<ApiMessage>,
    api_tx: Sender<ApiMessage>,
    api_wake: Arc<EventFd>,
    subscribers: Vec<Sender<VmEvent>>,
    pending_removals: Vec<PendingRemoval>,
    start: Instant,
}

fn create_memory(vm: &VmFd, size: u64) -> Result<GuestMemoryMmap> {
    let ranges: Vec<_> = layout::ram_ranges(size)
        .into_iter()
        .map(|(a, s)| (a, s as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges)
        .map_err(|e| Error::Memory(size >> 20, e.to_string()))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::Memory(size >> 20, e.to_string()))?;
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

/// Opens the KVM device: `/dev/kvm`, or the path in `ARBOR_KVM_DEVICE`.
fn open_kvm() -> Result<Kvm> {
    let path = std::env::var("ARBOR_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".to_string());
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

impl Vm {
    /// Validates `config`, creates the VM, loads the kernel and prepares
    /// the vCPUs. Nothing runs until [`Vm::run`] or [`Vm::start`].
    pub fn new(config: VmConfig) -> Result<Vm> {
        let start = Instant::now();
        let topology = config.validate()?;
        let kvm = open_kvm()?;
        let vm = Arc::new(create_vm(&kvm)?);
        let memory = create_memory(&vm, config.memory)?;
        let mut devices = DeviceManager::new(&vm, &config.serial, start)?;

        // The PCI Express root complex.
        let routing = GsiRouting::new(vm.clone()).map_err(Error::EventLoop)?;
        let (mmio32, mmio64) = layout::pci_windows(config.memory);
        let windows = acpi::PciWindows {
            mmio32,
            mmio64,
            buses: (0, 0xff),
        };
        let rest = topology.remaining_windows();
        let allocator = BarAllocator::new(None, rest.mmio32, Some(rest.mmio64))
            .map_err(|e| Error::Device(DeviceError::Virtio(e.to_string())))?;
        let pci = PciManager::new(
            devices.io.clone(),
            vm.clone(),
            routing,
            allocator,
            GuestMemoryAtomic::new(memory.clone()),
            topology,
        )
        .map_err(|e| Error::Device(e.into()))?;
        pci.register_config_access(layout::PCI_ECAM_START, layout::PCI_ECAM_SIZE)
            .map_err(|e| Error::Device(e.into()))?;
        devices.pci = Some(pci);
        devices.placement_order = config.placement_order.clone();
        for d in &config.disks {
            devices.add_disk(d, false)?;
        }
        for r in &config.rngs {
            devices.add_rng(r, false)?;
        }

        let mut dsdt = acpi::platform_aml();
        dsdt.extend(acpi::host_bridge_aml(&windows, &[]));
        dsdt.extend(devices.dsdt_aml());
        let mcfg = acpi::mcfg(layout::PCI_ECAM_START, windows.buses);
        let rsdp = acpi::write_tables(&memory, config.cpus, &dsdt, &[mcfg])?;
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

        let (tx, rx) = channel();
        let (api_tx, api_rx) = channel();
        Ok(Vm {
            config,
            vcpus: Vec::new(),
            pending_vcpus,
            devices,
            _vm: vm,
            memory,
            _kvm: kvm,
            stop: Arc::new(AtomicBool::new(false)),
            paused: Arc::new(AtomicBool::new(false)),
            state: VmState::Created,
            vcpu_events: rx,
            vcpu_events_tx: tx,
            vcpu_wake: EventFd::new(EFD_NONBLOCK).map_err(Error::EventLoop)?,
            api_rx,
            api_tx,
            api_wake: Arc::new(EventFd::new(EFD_NONBLOCK).map_err(Error::EventLoop)?),
            subscribers: Vec::new(),
            pending_removals: Vec::new(),
            start,
        })
    }

    /// The configuration this VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The guest's memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// A handle for requests (usable once the VM runs).
    pub fn handle(&self) -> VmmHandle {
        VmmHandle::new(self.api_tx.clone(), self.api_wake.clone())
    }

    /// A stream of [`VmEvent`]s.
    pub fn subscribe(&mut self) -> Receiver<VmEvent> {
        let (tx, rx) = channel();
        self.subscribers.push(tx);
        rx
    }

    fn emit(&mut self, ev: VmEvent) {
        self.subscribers.retain(|s| s.send(ev.clone()).is_ok());
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
            };
            self.vcpus
                .push(vcpu::spawn(id as u8, fd, ctx).map_err(Error::Thread)?);
        }
        self.state = VmState::Running;
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
        Ok(ApiResponse::Empty)
    }

    fn resume(&mut self) -> ApiReply {
        if self.state != VmState::Paused {
            return Err(ApiError::conflict(format!(
                "the VM is {}, not paused",
                state_name(self.state)
            )));
        }
        self.paused.store(false, Ordering::Release);
        for v in &self.vcpus {
            v.unpark();
        }
        self.state = VmState::Running;
        Ok(ApiResponse::Empty)
    }

    fn info(&self) -> VmInfo {
        VmInfo {
            state: self.state,
            cpus: Some(u32::from(self.config.cpus)),
            memory: Some(self.config.memory),
            devices: self.devices.device_info(),
            topology: self.devices.topology_info(),
        }
    }

    /// Answers one request. `Ok(Some(reason))` ends the run loop.
    fn handle_request(
        &mut self,
        msg: ApiMessage,
        shutdown_timer: &mut TimerFd,
    ) -> Option<ExitReason> {
        let ApiMessage { request, reply } = msg;
        log::info!("request {}", request.name());
        let (answer, exit) = match request {
            ApiRequest::VmmPing => (
                Ok(ApiResponse::VmmPing(VmmPingResponse {
                    version: env!("CARGO_PKG_VERSION").to_string(),
                })),
                None,
            ),
            ApiRequest::VmInfo => (Ok(ApiResponse::VmInfo(self.info())), None),
            ApiRequest::VmPause => (self.pause(), None),
            ApiRequest::VmResume => (self.resume(), None),
            ApiRequest::VmmShutdown => (Ok(ApiResponse::Empty), Some(ExitReason::VmmShutdown)),
            ApiRequest::VmShutdown => {
                if self.state == VmState::Paused {
                    // A paused guest cannot see the button: stop now.
                    (Ok(ApiResponse::Empty), Some(ExitReason::Shutdown))
                } else {
                    let r = self.devices.ged.notify(GED_EVENT_POWER_BUTTON);
                    let grace = self.config.shutdown_grace.max(Duration::from_millis(1));
                    let arm = shutdown_timer.reset(grace, None);
                    match r.and(arm.map_err(|e| std::io::Error::from_raw_os_error(e.errno()))) {
                        Ok(()) => (Ok(ApiResponse::Empty), None),
                        Err(e) => (
                            Err(ApiError::internal(format!(
                                "cannot press the power button: {e}"
                            ))),
                            Some(ExitReason::Shutdown),
                        ),
                    }
                }
            }
            ApiRequest::VmAddDisk(cfg) => {
                let r = self.devices.add_disk(&cfg, true);
                (self.hotplugged(r), None)
            }
            ApiRequest::VmAddRng(cfg) => {
                let r = self.devices.add_rng(&cfg, true);
                (self.hotplugged(r), None)
            }
            ApiRequest::VmRemoveDevice(r) => match self.start_removal(&r.id) {
                Ok(mechanism) => {
                    self.pending_removals.push(PendingRemoval {
                        id: r.id,
                        mechanism,
                        reply: Some(reply),
                        deadline: Instant::now() + self.config.remove_timeout,
                    });
                    return None;
                }
                Err(e) => (Err(e), None),
            },
        };
        let _ = reply.send(answer);
        exit
    }

    /// Announces a device just placed (or maps the error to the API).
    fn hotplugged(&mut self, r: std::result::Result<DeviceRecord, DeviceError>) -> ApiReply {
        let rec = r.map_err(device_error)?;
        let mechanism = self.devices.mechanism(rec.port.as_deref(), &rec.path);
        if let Err(e) = self.devices.signal(&mechanism, SlotSignal::Added) {
            log::warn!("cannot notify the guest of {}: {e}", rec.id);
        }
        log::info!("hot-plugged {} at {}", rec.id, rec.path);
        self.emit(VmEvent::DeviceAdded {
            id: rec.id.clone(),
            pci_path: rec.path.to_string(),
        });
        Ok(ApiResponse::DeviceAdded(AddDeviceResponse {
            id: rec.id,
            pci_path: rec.path.to_string(),
        }))
    }

    /// Asks the guest to release device `id`; returns how.
    fn start_removal(&mut self, id: &str) -> std::result::Result<Mechanism, ApiError> {
        let rec = self
            .devices
            .records
            .iter()
            .find(|r| r.id == id)
            .ok_or_else(|| ApiError::not_found(format!("no device with id '{id}'")))?;
        if !rec.hotplugged {
            return Err(ApiError::conflict(format!(
                "device '{id}' was cold-plugged and is not removable"
            )));
        }
        if self.pending_removals.iter().any(|p| p.id == id) {
            return Err(ApiError::conflict(format!(
                "the removal of device '{id}' is already under way"
            )));
        }
        if self.state != VmState::Running {
            return Err(ApiError::conflict(format!(
                "the VM is {}; the guest must run to release a device",
                state_name(self.state)
            )));
        }
        let mechanism = self.devices.mechanism(rec.port.as_deref(), &rec.path);
        if mechanism == Mechanism::None {
            return Err(ApiError::conflict(format!(
                "device '{id}' sits in a slot without hotplug"
            )));
        }
        self.devices
            .signal(&mechanism, SlotSignal::RemovalRequested)
            .map_err(|e| ApiError::internal(format!("cannot notify the guest: {e}")))?;
        log::info!("asked the guest to release {id} at {}", rec.path);
        Ok(mechanism)
    }

    /// Frees what the guest ejected and answers the waiting requests.
    fn handle_ejects(&mut self) {
        for (sel, slot) in self.devices.hotplug.take_ejects() {
            let Some(rec) = self
                .devices
                .records
                .iter()
                .find(|r| {
                    self.devices.mechanism(r.port.as_deref(), &r.path) == Mechanism::Acpi(sel, slot)
                })
                .cloned()
            else {
                continue;
            };
            if !rec.hotplugged {
                log::warn!("the guest ejected cold-plugged {}; keeping it", rec.id);
                continue;
            }
            self.finish_removal(&rec);
        }
    }

    /// Frees a device the guest released and answers its removal request.
    fn finish_removal(&mut self, rec: &DeviceRecord) {
        let result = self.devices.remove(&rec.id);
        let answer = match &result {
            Ok(_) => {
                log::info!("removed {} from {}", rec.id, rec.path);
                Ok(ApiResponse::Empty)
            }
            Err(e) => Err(ApiError::internal(format!("cannot free {}: {e}", rec.id))),
        };
        if result.is_ok() {
            self.emit(VmEvent::DeviceRemoved { id: rec.id.clone() });
        }
        if let Some(i) = self.pending_removals.iter().position(|p| p.id == rec.id) {
            let mut p = self.pending_removals.remove(i);
            if let Some(r) = p.reply.take() {
                let _ = r.send(answer);
            }
        }
    }

    /// A native slot's power changed: complete the removals whose slot the
    /// guest has powered off.
    fn handle_slot_power(&mut self) {
        let done: Vec<String> = self
            .pending_removals
            .iter()
            .filter_map(|p| match &p.mechanism {
                Mechanism::Native(port) => {
                    let pci = self.devices.pci.as_ref()?;
                    let off = pci
                        .port(port)?
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .removal_complete();
                    off.then(|| p.id.clone())
                }
                _ => None,
            })
            .collect();
        for id in done {
            if let Some(rec) = self.devices.records.iter().find(|r| r.id == id).cloned() {
                self.finish_removal(&rec);
            }
        }
    }

    /// Answers removals the guest did not complete in time; the devices
    /// stay attached and working.
    fn expire_removals(&mut self) {
        let now = Instant::now();
        let (expired, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending_removals)
            .into_iter()
            .partition(|p| p.deadline <= now);
        self.pending_removals = kept;
        for mut p in expired {
            // A native card is put back: the guest sees it present again.
            if let Err(e) = self
                .devices
                .signal(&p.mechanism, SlotSignal::RemovalWithdrawn)
            {
                log::warn!("cannot withdraw the removal of {}: {e}", p.id);
            }
            log::warn!("the guest did not release {} in time", p.id);
            if let Some(r) = p.reply.take() {
                let _ = r.send(Err(ApiError::conflict(format!(
                    "the guest did not release device '{}' within {:?}; it is still attached, retry later",
                    p.id, self.config.remove_timeout
                ))));
            }
        }
    }

    fn loop_timeout_ms(&self) -> i32 {
        match self.pending_removals.iter().map(|p| p.deadline).min() {
            None => -1,
            Some(d) => {
                let ms = d.saturating_duration_since(Instant::now()).as_millis();
                ms.clamp(1, i32::MAX as u128) as i32
            }
        }
    }

    /// Runs the VM until it stops. Blocks the calling thread, which serves
    /// the event loop.
    pub fn run(&mut self) -> Result<ExitReason> {
        let epoll = Epoll::new().map_err(Error::EventLoop)?;
        let add = |fd: i32, tok: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, tok),
            )
        };
        let mut shutdown_timer = TimerFd::new()
            .map_err(|e| Error::EventLoop(std::io::Error::from_raw_os_error(e.errno())))?;
        add(self.devices.events.power_off.as_raw_fd(), TOK_POWER_OFF).map_err(Error::EventLoop)?;
        add(self.devices.events.reset.as_raw_fd(), TOK_RESET).map_err(Error::EventLoop)?;
        add(self.vcpu_wake.as_raw_fd(), TOK_VCPU).map_err(Error::EventLoop)?;
        add(self.api_wake.as_raw_fd(), TOK_API).map_err(Error::EventLoop)?;
        add(shutdown_timer.as_raw_fd(), TOK_SHUTDOWN_TIMER).map_err(Error::EventLoop)?;
        add(self.devices.events.eject.as_raw_fd(), TOK_EJECT).map_err(Error::EventLoop)?;
        if let Some(pci) = &self.devices.pci {
            add(pci.slot_power_event().as_raw_fd(), TOK_SLOT_POWER).map_err(Error::EventLoop)?;
        }
        let stdin = std::io::stdin();
        // SAFETY: isatty only inspects the descriptor.
        let interactive = self.config.serial == SerialOutput::Stdout
            && unsafe { libc::isatty(stdin.as_raw_fd()) } == 1;
        let _raw = if interactive {
            add(stdin.as_raw_fd(), TOK_STDIN).map_err(Error::EventLoop)?;
            RawMode::enter(stdin.as_raw_fd())
        } else {
            None
        };

        self.start_vcpus()?;
        let mut events = vec![EpollEvent::default(); 16];
        let outcome = 'outer: loop {
            let n = match epoll.wait(self.loop_timeout_ms(), &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(Error::EventLoop(e)),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOK_POWER_OFF => break 'outer Ok(ExitReason::PowerOff),
                    TOK_RESET => break 'outer Ok(ExitReason::Reset),
                    TOK_VCPU => {
                        let _ = self.vcpu_wake.read();
                        if let Ok(ev) = self.vcpu_events.try_recv() {
                            break 'outer match ev {
                                VcpuEvent::PowerOff => Ok(ExitReason::PowerOff),
                                VcpuEvent::Reset => Ok(ExitReason::Reset),
                                VcpuEvent::Error(m) => Err(Error::Guest(m)),
                            };
                        }
                    }
                    TOK_API => {
                        let _ = self.api_wake.read();
                        while let Ok(msg) = self.api_rx.try_recv() {
                            if let Some(exit) = self.handle_request(msg, &mut shutdown_timer) {
                                break 'outer Ok(exit);
                            }
                        }
                    }
                    TOK_SHUTDOWN_TIMER => {
                        let _ = shutdown_timer.wait();
                        let seen =
                            self.devices.ged.take_acknowledged() & GED_EVENT_POWER_BUTTON != 0;
                        log::warn!(
                            "the guest did not power off within {:?} of the power button ({}); stopping it",
                            self.config.shutdown_grace,
                            if seen { "it read the button event" } else { "it never read the button event" }
                        );
                        break 'outer Ok(ExitReason::Shutdown);
                    }
                    TOK_STDIN => self.forward_stdin(&epoll),
                    TOK_EJECT => {
                        let _ = self.devices.events.eject.read();
                        self.handle_ejects();
                    }
                    TOK_SLOT_POWER => {
                        if let Some(pci) = &self.devices.pci {
                            let _ = pci.slot_power_event().read();
                        }
                        self.handle_slot_power();
                    }
                    _ => {}
                }
            }
            self.expire_removals();
        };
        self.stop_vcpus();
        self.state = VmState::Shutdown;
        if let Ok(reason) = &outcome {
            let r = reason.clone();
            self.emit(VmEvent::Stopped(r));
        }
        for mut p in std::mem::take(&mut self.pending_removals) {
            if let Some(r) = p.reply.take() {
                let _ = r.send(Err(ApiError::conflict(
                    "the VM stopped before the guest released the device",
                )));
            }
        }
        // Refuse whatever is still queued.
        while let Ok(msg) = self.api_rx.try_recv() {
            let _ = msg
                .reply
                .send(Err(ApiError::conflict("the VM has stopped")));
        }
        let _ = std::io::Write::flush(&mut std::io::stdout());
        outcome
    }

    fn forward_stdin(&mut self, epoll: &Epoll) {
        let stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        let mut serial = self
            .devices
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let room = serial.fifo_room().min(buf.len());
        if room == 0 {
            return;
        }
        match stdin.lock().read(&mut buf[..room]) {
            Ok(0) => {
                let _ = epoll.ctl(
                    ControlOperation::Delete,
                    stdin.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            Ok(n) => {
                serial.enqueue_input(&buf[..n]);
            }
            Err(_) => {}
        }
    }
}

/// The API's status for a failed device request.
fn device_error(e: DeviceError) -> ApiError {
    use crate::pci_manager::PciManagerError as P;
    match &e {
        DeviceError::DuplicateId(_) => ApiError::conflict(e.to_string()),
        DeviceError::BadPath(..) | DeviceError::Disk(..) => ApiError::bad_request(e.to_string()),
        DeviceError::NotHotplugSlot(_) | DeviceError::NoSlot(_) => {
            ApiError::conflict(e.to_string())
        }
        DeviceError::UnknownPort(_) => ApiError::not_found(e.to_string()),
        DeviceError::Placement(P::NoFreeSlot | P::SlotTaken(_) | P::Bars(_)) => {
            ApiError::conflict(e.to_string())
        }
        _ => ApiError::internal(e.to_string()),
    }
}

fn state_name(s: VmState) -> &'static str {
    match s {
        VmState::Created => "created",
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::Shutdown => "shut down",
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop_vcpus();
    }
}
