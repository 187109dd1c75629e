//! vCPU threads: each runs `KVM_RUN` in a loop and dispatches port and MMIO
//! exits to the VMM's buses. Exits that end the VM (shutdown, reset, an
//! exit the VMM cannot handle) are reported to the event loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, DevicePio};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::cpu::describe_registers;

/// What a vCPU tells the event loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The guest asked for power-off through a KVM system event.
    PowerOff,
    /// The guest reset (system event, or a triple fault).
    Reset,
    /// The vCPU stopped on an exit the VMM cannot handle.
    Error(String),
}

/// Signal used to kick a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler for the kick signal; once per process.
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), noop_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Shared state a vCPU thread needs.
pub struct VcpuContext {
    pub io: Arc<RwLock<IoManager>>,
    pub stop: Arc<AtomicBool>,
    pub paused: Arc<AtomicBool>,
    pub events: Sender<VcpuEvent>,
    pub wake: EventFd,
}

type PioDevice = Arc<dyn DevicePio + Send + Sync>;
type MmioDevice = Arc<dyn DeviceMmio + Send + Sync>;

impl VcpuContext {
    /// The device covering `len` bytes at `port`, taken out of the bus so
    /// that the bus lock is not held while the device runs (a device may
    /// change the bus, e.g. when the guest moves a BAR).
    fn pio_device(&self, port: u16, len: usize) -> Option<(PioAddress, PioDevice)> {
        let io = self.io.read().unwrap_or_else(|e| e.into_inner());
        let (range, dev) = io.pio_device(PioAddress(port))?;
        let end = u32::from(port) + len as u32;
        if end > u32::from(range.last().0) + 1 {
            return None;
        }
        Some((range.base(), dev.clone()))
    }

    fn mmio_device(&self, addr: u64, len: usize) -> Option<(MmioAddress, MmioDevice)> {
        let io = self.io.read().unwrap_or_else(|e| e.into_inner());
        let (range, dev) = io.mmio_device(MmioAddress(addr))?;
        if addr.checked_add(len as u64)? > range.last().0.checked_add(1)? {
            return None;
        }
        Some((range.base(), dev.clone()))
    }

    fn report(&self, ev: VcpuEvent) {
        let _ = self.events.send(ev);
        let _ = self.wake.write(1);
    }
}

/// A running vCPU thread.
pub struct VcpuHandle {
    pub id: u8,
    thread: Option<JoinHandle<()>>,
    parked: Arc<AtomicBool>,
}

impl VcpuHandle {
    /// Kicks the vCPU out of `KVM_RUN` and waits (bounded) until it has
    /// parked; the caller has set the pause flag.
    pub fn wait_paused(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !self.parked.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
            self.kick();
            std::thread::sleep(Duration::from_millis(1));
        }
        if !self.parked.load(Ordering::Acquire) {
            log::warn!("vcpu{} did not pause within 2 s", self.id);
        }
    }

    /// Wakes a parked vCPU (after the pause flag is cleared).
    pub fn unpark(&self) {
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
    }

    /// Interrupts `KVM_RUN` so the thread notices the stop or pause flag.
    pub fn kick(&self) {
        if let Some(t) = &self.thread {
            let _ = t.kill(kick_signal());
        }
    }

    /// Kicks until the thread exits, then joins it. The caller has set the
    /// stop flag.
    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            while !t.is_finished() {
                let _ = t.kill(kick_signal());
                std::thread::sleep(Duration::from_millis(2));
            }
            let _ = t.join();
        }
    }
}

/// Starts vCPU `id` on its own thread.
pub fn spawn(id: u8, vcpu: VcpuFd, ctx: VcpuContext) -> std::io::Result<VcpuHandle> {
    let parked = Arc::new(AtomicBool::new(false));
    let p = parked.clone();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || run(id, vcpu, ctx, p))?;
    Ok(VcpuHandle {
        id,
        thread: Some(thread),
        parked,
    })
}

/// KVM's description of an internal error exit.
fn internal_error(vcpu: &mut VcpuFd) -> String {
    let run = vcpu.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is
    // the union member KVM filled in; it is plain data.
    let ie = unsafe { run.__bindgen_anon_1.internal };
    let n = (ie.ndata as usize).min(ie.data.len());
    let data: Vec<String> = ie.data[..n].iter().map(|d| format!("{d:#x}")).collect();
    let what = match ie.suberror {
        1 => "the host could not emulate an instruction",
        2 => "a simultaneous exception",
        3 => "delivery of an event failed",
        _ => "unknown suberror",
    };
    format!(
        "KVM internal error {} ({what}), data [{}]",
        ie.suberror,
        data.join(", ")
    )
}

fn run(id: u8, mut vcpu: VcpuFd, ctx: VcpuContext, parked: Arc<AtomicBool>) {
    loop {
        if ctx.stop.load(Ordering::Acquire) {
            return;
        }
        if ctx.paused.load(Ordering::Acquire) {
            parked.store(true, Ordering::Release);
            while ctx.paused.load(Ordering::Acquire) && !ctx.stop.load(Ordering::Acquire) {
                std::thread::park_timeout(Duration::from_millis(50));
            }
            parked.store(false, Ordering::Release);
            continue;
        }
        match vcpu.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => match ctx.pio_device(port, data.len()) {
                    Some((base, dev)) => dev.pio_read(base, port - base.0, data),
                    None => data.fill(0xff),
                },
                VcpuExit::IoOut(port, data) => {
                    if let Some((base, dev)) = ctx.pio_device(port, data.len()) {
                        dev.pio_write(base, port - base.0, data);
                    }
                }
                VcpuExit::MmioRead(addr, data) => match ctx.mmio_device(addr, data.len()) {
                    Some((base, dev)) => dev.mmio_read(base, addr - base.0, data),
                    None => {
                        log::debug!("vcpu{id}: unhandled MMIO read at {addr:#x}");
                        data.fill(0xff);
                    }
                },
                VcpuExit::MmioWrite(addr, data) => match ctx.mmio_device(addr, data.len()) {
                    Some((base, dev)) => dev.mmio_write(base, addr - base.0, data),
                    None => log::debug!("vcpu{id}: unhandled MMIO write at {addr:#x}"),
                },
                VcpuExit::Hlt => {
                    // Only reached without an in-kernel LAPIC; wait to be kicked.
                    std::thread::park_timeout(Duration::from_millis(10));
                }
                VcpuExit::Shutdown => {
                    ctx.report(VcpuEvent::Reset);
                    return;
                }
                VcpuExit::SystemEvent(kind, _) => {
                    let ev = match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => VcpuEvent::PowerOff,
                        KVM_SYSTEM_EVENT_RESET => VcpuEvent::Reset,
                        other => {
                            VcpuEvent::Error(format!("vcpu{id}: unexpected system event {other}"))
                        }
                    };
                    ctx.report(ev);
                    return;
                }
                VcpuExit::IrqWindowOpen | VcpuExit::Intr => {}
                other => {
                    let what = match other {
                        VcpuExit::InternalError => None,
                        VcpuExit::FailEntry(reason, cpu) => {
                            Some(format!("VM entry failed (reason {reason:#x} on cpu {cpu})"))
                        }
                        VcpuExit::Exception => Some("unhandled exception exit".to_string()),
                        o => Some(format!("unhandled exit {o:?}")),
                    };
                    let what = what.unwrap_or_else(|| internal_error(&mut vcpu));
                    let msg = format!("vcpu{id}: {what}; {}", describe_registers(&vcpu));
                    ctx.report(VcpuEvent::Error(msg));
                    return;
                }
            },
            Err(e) => match e.errno() {
                libc::EINTR | libc::EAGAIN => {}
                _ => {
                    let msg = format!(
                        "vcpu{id}: KVM_RUN failed: {e}; {}",
                        describe_registers(&vcpu)
                    );
                    ctx.report(VcpuEvent::Error(msg));
                    return;
                }
            },
        }
    }
}
