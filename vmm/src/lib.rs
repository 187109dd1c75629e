//! Arbor's VMM: builds a KVM virtual machine from a [`VmConfig`], boots a
//! Linux kernel in it and runs it until the guest powers off or resets.
//!
//! Embedding:
//! ```no_run
//! let cfg = vmm::VmConfig { kernel: "vmlinux".into(), ..Default::default() };
//! let mut vm = vmm::Vm::new(cfg).expect("build");
//! let reason = vm.run().expect("run");
//! println!("{reason:?}");
//! ```

pub mod acpi;
pub mod boot;
pub mod config;
pub mod cpu;
pub mod device_manager;
pub mod layout;
pub mod logger;
pub mod vcpu;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use config::{ConfigError, SerialOutput, VmConfig};

use device_manager::DeviceManager;
use vcpu::{VcpuContext, VcpuEvent, VcpuHandle};

/// Why a VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered itself off (ACPI S5).
    PowerOff,
    /// The guest rebooted or reset (including a panic with `panic=-1`, and
    /// a triple fault).
    Reset,
}

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("cannot open {0}: {1} (is KVM available, and may this user use it?)")]
    OpenKvm(String, kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmVersion(i32),
    #[error("KVM lacks a capability Arbor needs: {0}")]
    KvmCap(&'static str),
    #[error("cannot create the VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("KVM setup failed ({0}): {1}")]
    KvmSetup(&'static str, kvm_ioctls::Error),
    #[error("cannot allocate {0} MiB of guest memory: {1}")]
    Memory(u64, String),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error(transparent)]
    Device(#[from] device_manager::DeviceError),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("event loop failed: {0}")]
    EventLoop(std::io::Error),
    #[error("the guest stopped the VM: {0}")]
    Guest(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A built VM, ready to run.
pub struct Vm {
    config: VmConfig,
    kvm: Kvm,
    vm: Arc<VmFd>,
    memory: GuestMemoryMmap,
    devices: DeviceManager,
    vcpus: Vec<VcpuHandle>,
    pending_vcpus: Vec<kvm_ioctls::VcpuFd>,
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    vcpu_events: Receiver<VcpuEvent>,
    vcpu_events_tx: std::sync::mpsc::Sender<VcpuEvent>,
    vcpu_wake: EventFd,
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
        // SAFETY: the region is a live mapping owned by `mem`, which outlives
        // the VM's use of it (the VM is dropped with or before `mem` in `Vm`).
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

impl Vm {
    /// Validates `config`, creates the VM, loads the kernel and prepares
    /// the vCPUs. Nothing runs until [`Vm::run`].
    pub fn new(config: VmConfig) -> Result<Vm> {
        let start = Instant::now();
        config.validate()?;
        let kvm = open_kvm()?;
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

        let memory = create_memory(&vm, config.memory)?;
        let devices = DeviceManager::new(&vm, &config.serial, start)?;

        let rsdp = acpi::write_tables(&memory, config.cpus, &acpi::platform_aml(), &[])?;
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
        let vcpu_wake = EventFd::new(EFD_NONBLOCK).map_err(Error::EventLoop)?;
        Ok(Vm {
            config,
            kvm,
            vm: Arc::new(vm),
            memory,
            devices,
            vcpus: Vec::new(),
            pending_vcpus,
            stop: Arc::new(AtomicBool::new(false)),
            paused: Arc::new(AtomicBool::new(false)),
            vcpu_events: rx,
            vcpu_events_tx: tx,
            vcpu_wake,
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

    /// The KVM handle (for capability checks).
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    fn start_vcpus(&mut self) -> Result<()> {
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

    /// Runs the VM until the guest powers off or resets. Blocks the calling
    /// thread, which serves the event loop (console input, device events).
    pub fn run(&mut self) -> Result<ExitReason> {
        const TOK_POWER_OFF: u64 = 1;
        const TOK_RESET: u64 = 2;
        const TOK_VCPU: u64 = 3;
        const TOK_STDIN: u64 = 4;

        let epoll = Epoll::new().map_err(Error::EventLoop)?;
        let add = |fd: i32, tok: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, tok),
            )
        };
        add(self.devices.events.power_off.as_raw_fd(), TOK_POWER_OFF).map_err(Error::EventLoop)?;
        add(self.devices.events.reset.as_raw_fd(), TOK_RESET).map_err(Error::EventLoop)?;
        add(self.vcpu_wake.as_raw_fd(), TOK_VCPU).map_err(Error::EventLoop)?;
        let stdin = std::io::stdin();
        // SAFETY: isatty only inspects the descriptor.
        let interactive = self.config.serial == SerialOutput::Stdout
            && unsafe { libc::isatty(stdin.as_raw_fd()) } == 1;
        let _raw = if interactive {
            add(stdin.as_raw_fd(), TOK_STDIN).map_err(Error::EventLoop)?;
            terminal::RawMode::enter(stdin.as_raw_fd())
        } else {
            None
        };

        self.start_vcpus()?;
        let mut events = vec![EpollEvent::default(); 8];
        let outcome = 'outer: loop {
            let n = match epoll.wait(-1, &mut events) {
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
                    TOK_STDIN => {
                        let mut buf = [0u8; 64];
                        let mut serial = self
                            .devices
                            .serial
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        let room = serial.fifo_room().min(buf.len());
                        if room == 0 {
                            continue;
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
                    _ => {}
                }
            }
        };
        self.stop_vcpus();
        let _ = std::io::Write::flush(&mut std::io::stdout());
        outcome
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop_vcpus();
    }
}

mod terminal {
    //! Raw mode for an interactive console, restored on drop.

    pub struct RawMode {
        fd: i32,
        saved: libc::termios,
    }

    impl RawMode {
        pub fn enter(fd: i32) -> Option<RawMode> {
            // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
            let mut saved: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: `saved` is a valid, writable termios.
            if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
                return None;
            }
            let mut raw = saved;
            // SAFETY: cfmakeraw only edits the struct it is given.
            unsafe { libc::cfmakeraw(&mut raw) };
            // Keep Ctrl-C working for the user of the terminal.
            raw.c_lflag |= libc::ISIG;
            // SAFETY: `raw` is a valid termios for this fd.
            if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
                return None;
            }
            Some(RawMode { fd, saved })
        }
    }

    impl Drop for RawMode {
        fn drop(&mut self) {
            // SAFETY: restores the settings read in `enter` on the same fd.
            unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
        }
    }
}
