//! vCPU threads: each runs `KVM_RUN` in a loop and dispatches port and MMIO
//! exits to the VMM's buses. Exits that end the VM (shutdown, reset, an
//! exit the VMM cannot handle) are reported to the event loop.
//!
//! Kicks: to make a vCPU notice its pause or stop flag, the VMM sets the
//! flag and sends the thread the kick signal once. The signal's handler sets
//! `immediate_exit` in the thread's `kvm_run` (found through a thread-local
//! pointer), so `KVM_RUN` returns `EINTR` whether the signal arrives while
//! the guest runs or just before `KVM_RUN` is entered; the run loop clears
//! `immediate_exit` and checks its flags. A paused vCPU waits on a condition
//! variable, which the VMM notifies on resume and on stop.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_run, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, DevicePio};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::coalesced::CoalescedRing;
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

thread_local! {
    /// The `kvm_run` area of the vCPU this thread runs; null on every other
    /// thread, and once the vCPU thread is done with its `VcpuFd`.
    /// Const-initialised and without a destructor, so reading it from a
    /// signal handler allocates nothing and cannot fail.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN
        .try_with(|p| p.get())
        .unwrap_or(std::ptr::null_mut());
    if !run.is_null() {
        // SAFETY: a non-null pointer is this thread's vCPU's `kvm_run`
        // mapping, set by `RunAreaGuard::new` and cleared by its `Drop`
        // before the `VcpuFd` (and with it the mapping) goes away; the
        // handler runs on this thread, so the mapping is alive. The byte
        // is shared with the kernel (like the rest of `kvm_run`), hence the
        // volatile write through a raw place, without making a reference.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the handler for the kick signal; once per process (later calls
/// return the first call's result).
pub fn install_kick_handler() -> std::io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let installed = *INSTALLED.get_or_init(|| {
        register_signal_handler(kick_signal(), kick_handler).map_err(|e| e.errno())
    });
    installed.map_err(std::io::Error::from_raw_os_error)
}

/// Publishes a vCPU's `kvm_run` to the kick handler for as long as it lives.
struct RunAreaGuard;

impl RunAreaGuard {
    fn new(vcpu: &mut VcpuFd) -> Self {
        let run: *mut kvm_run = vcpu.get_kvm_run();
        KVM_RUN.with(|p| p.set(run));
        RunAreaGuard
    }
}

impl Drop for RunAreaGuard {
    fn drop(&mut self) {
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    }
}

/// Where a vCPU thread is, as its handle sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    /// Running (or about to run) the guest.
    Running,
    /// Waiting for the pause flag to clear.
    Parked,
    /// The thread has left its run loop.
    Exited,
}

/// The condition variable a vCPU thread and its handle share: the thread
/// waits on it while paused, the handle while waiting for the thread to
/// park.
struct Parking {
    state: Mutex<RunState>,
    cond: Condvar,
}

impl Parking {
    fn lock(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the state and wakes every waiter.
    fn set(&self, state: RunState) {
        *self.lock() = state;
        self.cond.notify_all();
    }

    /// Wakes the thread if it waits (the caller changed a flag first).
    fn notify(&self) {
        // Taking the lock orders this after the thread's flag check: the
        // thread checks its flags and starts waiting with the lock held.
        drop(self.lock());
        self.cond.notify_all();
    }
}

/// Marks the thread exited (and wakes its handle) however `run` returns.
struct ExitGuard(Arc<Parking>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.0.set(RunState::Exited);
    }
}

/// Shared state a vCPU thread needs.
pub struct VcpuContext {
    pub io: Arc<RwLock<IoManager>>,
    pub stop: Arc<AtomicBool>,
    pub paused: Arc<AtomicBool>,
    pub events: Sender<VcpuEvent>,
    pub wake: EventFd,
    /// The VM's ring of coalesced writes, when it has one.
    pub coalesced: Option<Arc<CoalescedRing>>,
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

    /// Applies the guest's coalesced writes (see [`crate::coalesced`]);
    /// called before every exit is handled, so that devices see accesses in
    /// the guest's order.
    fn drain_coalesced(&self) {
        let Some(ring) = &self.coalesced else {
            return;
        };
        ring.drain(|w| {
            if w.pio {
                let Ok(port) = u16::try_from(w.addr) else {
                    return;
                };
                if let Some((base, dev)) = self.pio_device(port, w.len) {
                    dev.pio_write(base, port - base.0, w.bytes());
                }
            } else if let Some((base, dev)) = self.mmio_device(w.addr, w.len) {
                dev.mmio_write(base, w.addr - base.0, w.bytes());
            }
        });
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
    parking: Arc<Parking>,
}

/// How long `wait_paused` waits for a vCPU to park before giving up.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

impl VcpuHandle {
    /// Kicks the vCPU out of `KVM_RUN` and waits (bounded) until it has
    /// parked; the caller has set the pause flag.
    pub fn wait_paused(&self) {
        self.kick();
        let state = self.parking.lock();
        let (state, _) = self
            .parking
            .cond
            .wait_timeout_while(state, PAUSE_TIMEOUT, |s| *s == RunState::Running)
            .unwrap_or_else(|e| e.into_inner());
        if *state == RunState::Running {
            log::warn!(
                "vcpu{} did not pause within {} s",
                self.id,
                PAUSE_TIMEOUT.as_secs()
            );
        }
    }

    /// Wakes a parked vCPU (after the pause flag is cleared).
    pub fn unpark(&self) {
        self.parking.notify();
    }

    /// Interrupts `KVM_RUN` (or a wait) so the thread notices the stop or
    /// pause flag; the caller has set the flag. One kick is enough: see the
    /// module's documentation.
    pub fn kick(&self) {
        self.parking.notify();
        if let Some(t) = &self.thread {
            if !t.is_finished() {
                let _ = t.kill(kick_signal());
            }
        }
    }

    /// Kicks the thread once, then joins it. The caller has set the stop
    /// flag.
    pub fn join(&mut self) {
        self.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts vCPU `id` on its own thread.
pub fn spawn(id: u8, vcpu: VcpuFd, ctx: VcpuContext) -> std::io::Result<VcpuHandle> {
    let parking = Arc::new(Parking {
        state: Mutex::new(RunState::Running),
        cond: Condvar::new(),
    });
    let p = parking.clone();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            let _exited = ExitGuard(p.clone());
            run(id, vcpu, &ctx, &p);
        })?;
    Ok(VcpuHandle {
        id,
        thread: Some(thread),
        parking,
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
    let hint = if ie.suberror == 1 {
        // Seen when a kernel booted without the kit's command line touches
        // a CPU feature that an emulated KVM cannot emulate.
        "; this usually means the guest kernel used a CPU feature this host's KVM cannot \
         emulate: boot it with the kernel command line its kit provides (the guest kit's \
         cmdline file), which turns such features off"
    } else {
        ""
    };
    format!(
        "KVM internal error {} ({what}{hint}), data [{}]",
        ie.suberror,
        data.join(", ")
    )
}

/// Parks the vCPU thread while the pause flag is set (and stop is not).
fn park(ctx: &VcpuContext, parking: &Parking) {
    let mut state = parking.lock();
    *state = RunState::Parked;
    parking.cond.notify_all();
    while ctx.paused.load(Ordering::Acquire) && !ctx.stop.load(Ordering::Acquire) {
        state = parking.cond.wait(state).unwrap_or_else(|e| e.into_inner());
    }
    *state = RunState::Running;
}

/// After a `HLT` exit (no in-kernel LAPIC): waits up to 10 ms for a kick;
/// a kick (pause, stop) ends the wait at once.
fn halt(ctx: &VcpuContext, parking: &Parking) {
    let state = parking.lock();
    let _ = parking
        .cond
        .wait_timeout_while(state, Duration::from_millis(10), |_| {
            !ctx.paused.load(Ordering::Acquire) && !ctx.stop.load(Ordering::Acquire)
        });
}

fn run(id: u8, mut vcpu: VcpuFd, ctx: &VcpuContext, parking: &Parking) {
    // From here on a kick sets `immediate_exit`. Dropped at the end of this
    // function, before `vcpu`, which was declared (as a parameter) earlier.
    let _run_area = RunAreaGuard::new(&mut vcpu);
    crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu);
    loop {
        if ctx.stop.load(Ordering::Acquire) {
            ctx.drain_coalesced();
            return;
        }
        if ctx.paused.load(Ordering::Acquire) {
            ctx.drain_coalesced();
            park(ctx, parking);
            continue;
        }
        let exit = vcpu.run();
        ctx.drain_coalesced();
        match exit {
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
                    // Only reached without an in-kernel LAPIC: wait briefly
                    // (a kick ends the wait) before running the guest on.
                    halt(ctx, parking);
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
                libc::EINTR => {
                    // Kicked (or another signal): clear the kick, then the
                    // loop checks the flags.
                    vcpu.set_kvm_immediate_exit(0);
                }
                libc::EAGAIN => {}
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

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::{Kvm, VmFd};
    use std::time::Instant;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    fn state(h: &VcpuHandle) -> RunState {
        *h.parking.lock()
    }

    /// A VM with 64 KiB of RAM and one real-mode vCPU about to run `code`
    /// at 0x1000. `None` without /dev/kvm.
    fn real_mode_vcpu(code: &[u8]) -> Option<(GuestMemoryMmap<()>, Kvm, Arc<VmFd>, VcpuFd)> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let Ok(kvm) = Kvm::new() else {
            eprintln!("no /dev/kvm: skipped");
            return None;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        mem.write_slice(code, GuestAddress(0x1000)).unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap();
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: 0x10000,
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: `mem` maps these 64 KiB and is returned with the VM: the
        // callers keep it until the vCPU has stopped.
        unsafe { vm.set_user_memory_region(region) }.unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = 0x1000;
        regs.rflags = 2;
        vcpu.set_regs(&regs).unwrap();
        Some((mem, kvm, vm, vcpu))
    }

    /// A real-mode vCPU spinning on `jmp $` is paused, resumed and stopped
    /// with one kick each time.
    #[test]
    fn one_kick_pauses_resumes_and_stops() {
        let Some((_mem, _kvm, _vm, vcpu)) = real_mode_vcpu(&[0xeb, 0xfe]) else {
            return; // jmp $
        };

        install_kick_handler().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let ctx = VcpuContext {
            io: Arc::new(RwLock::new(IoManager::new())),
            stop: stop.clone(),
            paused: paused.clone(),
            events: tx,
            wake: EventFd::new(0).unwrap(),
            coalesced: None,
        };
        let mut h = spawn(0, vcpu, ctx).unwrap();
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(5)); // back in KVM_RUN
            paused.store(true, Ordering::Release);
            let t = Instant::now();
            h.wait_paused();
            assert_eq!(state(&h), RunState::Parked);
            assert!(t.elapsed() < PAUSE_TIMEOUT, "took {:?}", t.elapsed());
            paused.store(false, Ordering::Release);
            h.unpark();
        }
        // Stop while paused, then while running.
        paused.store(true, Ordering::Release);
        h.wait_paused();
        stop.store(true, Ordering::Release);
        h.join();
        assert!(rx.try_recv().is_err(), "a stopped vCPU reports nothing");
        assert_eq!(state(&h), RunState::Exited);
    }

    /// Records the accesses of a port device.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl DevicePio for Recorder {
        fn pio_read(&self, _: PioAddress, offset: u16, data: &mut [u8]) {
            self.0.lock().unwrap().push(format!("read {offset}"));
            data.fill(0);
        }
        fn pio_write(&self, _: PioAddress, offset: u16, data: &[u8]) {
            let text = String::from_utf8_lossy(data).into_owned();
            self.0
                .lock()
                .unwrap()
                .push(format!("write {offset} {text}"));
        }
    }

    /// Writes to a coalesced port do not exit; the device sees them, in
    /// order, before the next exit is handled, and when the vCPU stops.
    #[test]
    fn coalesced_writes_arrive_in_order_before_the_next_exit() {
        #[rustfmt::skip]
        let code = [
            0xba, 0xf8, 0x03, // mov dx, 0x3f8
            0xb0, b'a', 0xee, // mov al, 'a'; out dx, al
            0xb0, b'b', 0xee, // mov al, 'b'; out dx, al
            0xba, 0xfd, 0x03, // mov dx, 0x3fd
            0xec,             // in al, dx (exits)
            0xba, 0xf8, 0x03, // mov dx, 0x3f8
            0xb0, b'c', 0xee, // mov al, 'c'; out dx, al
            0xeb, 0xfe,       // jmp $
        ];
        let Some((_mem, kvm, vm, vcpu)) = real_mode_vcpu(&code) else {
            return;
        };
        let Some(ring) = CoalescedRing::map(&kvm, &vcpu).unwrap() else {
            eprintln!("no coalesced port I/O: skipped");
            return;
        };
        crate::coalesced::CoalescedPort::new(vm.clone(), devices::legacy::SERIAL_PORT, 1).set(true);
        let dev = Arc::new(Recorder::default());
        let mut io = IoManager::new();
        let range = vm_device::bus::PioRange::new(
            PioAddress(devices::legacy::SERIAL_PORT),
            devices::legacy::SERIAL_PORT_LEN,
        )
        .unwrap();
        io.register_pio(range, dev.clone()).unwrap();

        install_kick_handler().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, _rx) = std::sync::mpsc::channel();
        let ctx = VcpuContext {
            io: Arc::new(RwLock::new(io)),
            stop: stop.clone(),
            paused: Arc::new(AtomicBool::new(false)),
            events: tx,
            wake: EventFd::new(0).unwrap(),
            coalesced: Some(Arc::new(ring)),
        };
        let mut h = spawn(0, vcpu, ctx).unwrap();
        let t = Instant::now();
        while dev.0.lock().unwrap().len() < 3 && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50)); // the guest spins now
        assert_eq!(
            *dev.0.lock().unwrap(),
            ["write 0 a", "write 0 b", "read 5"],
            "the writes before the exit, nothing after it yet"
        );
        stop.store(true, Ordering::Release);
        h.join();
        assert_eq!(
            *dev.0.lock().unwrap(),
            ["write 0 a", "write 0 b", "read 5", "write 0 c"],
            "the write queued when the vCPU stopped"
        );
    }
}
