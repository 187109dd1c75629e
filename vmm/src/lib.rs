//! Arbor's VMM: builds a KVM virtual machine from a [`VmConfig`], boots a
//! Linux kernel in it and runs it until the guest powers off or resets, or
//! until it is told to stop.
//!
//! Embedding, without the HTTP layer:
//! ```no_run
//! let cfg = vmm::VmConfig { kernel: "vmlinux".into(), ..Default::default() };
//! let mut vm = vmm::Vm::new(cfg).expect("build");
//! let handle = vm.handle();
//! let events = vm.subscribe();
//! let running = vm.start().expect("start");
//! println!("{:?}", handle.info());
//! handle.shutdown().ok();
//! println!("{:?}", running.wait());
//! # drop(events);
//! ```
//! The HTTP API server is a thin client of the same [`VmmHandle`] channel.

pub mod acpi;
pub mod boot;
pub mod coalesced;
pub mod config;
pub mod confine;
pub mod cpu;
pub mod device_manager;
mod handle;
pub mod hotplug;
pub mod interrupts;
pub mod layout;
mod lifecycle;
pub mod logger;
pub mod mptable;
pub mod pci_manager;
pub mod seccomp;
mod terminal;
pub mod vcpu;
mod vm;

pub use api::events::EventBus;
pub use api::types::{DiskConfig, RngConfig, VmInfo, VsockConfig};
pub use config::{ConfigError, EventMonitor, ProcessPolicy, SerialOutput, VmConfig};
pub use handle::{RunningVm, StopReason, Subscription, VmEvent, VmEventKind, VmmHandle};
pub use lifecycle::Vmm;
pub use seccomp::SeccompMode;
pub use vm::{kvm_device_path, Vm};

/// Why a VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered itself off (ACPI S5).
    PowerOff,
    /// The guest rebooted or reset (including a panic with `panic=-1`, and
    /// a triple fault).
    Reset,
    /// The VM was shut down by request (`vm.shutdown`: the guest did not
    /// power off within the grace period, or did).
    Shutdown,
    /// The VMM was told to stop (`vmm.shutdown`).
    VmmShutdown,
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
    MpTable(#[from] mptable::MpTableError),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error(transparent)]
    Device(#[from] device_manager::DeviceError),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("event loop failed: {0}")]
    EventLoop(#[source] std::io::Error),
    #[error("event loop failed: {0}")]
    EventManager(#[source] event_manager::Error),
    #[error("the guest stopped the VM: {0}")]
    Guest(String),
    #[error("the VM was started already")]
    AlreadyStarted,
}

pub type Result<T> = std::result::Result<T, Error>;

/// Writes a line to standard error, ignoring failure: unlike `eprintln!`,
/// it does not panic when standard error is closed (a supervisor that went
/// away must not bring the VMM down).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}
