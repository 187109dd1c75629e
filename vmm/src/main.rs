//! `arbor`: boot a Linux guest under KVM, optionally driven over an HTTP
//! API on a UNIX socket.
//!
//! SIGTERM and SIGINT are blocked in every thread (the mask is set before
//! any thread starts, and threads inherit it) and taken by one
//! `arbor-signals` thread with `sigwait(3)`. The first one does what
//! `vm.shutdown` does: the ACPI power button, then a hard stop after
//! `--shutdown-grace`; arbor then exits as after `vm.shutdown` (status 0)
//! and removes the API socket. A second one stops the VM at once; arbor
//! then exits with 128 + the signal's number (130 for SIGINT, 143 for
//! SIGTERM).
//!
//! The API thread starts first and confines itself before it serves
//! (`vmm::confine::api_thread_start`). Then, before the VM is created and
//! before any other thread starts, arbor confines `main`
//! (`vmm::confine::apply`: Landlock, no-new-privs, the capability drop), so
//! every thread it starts later is confined.

use std::io;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use vmm::config::EventMonitor;
use vmm::config::{parse_args, Command, USAGE};
use vmm::{EventBus, ExitReason, VmEventKind, Vmm, VmmHandle};

/// Exit status when the guest reboots or resets.
const EXIT_GUEST_RESET: u8 = 3;
const EXIT_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, so that the VMM has
/// every descriptor it may have (the API server keeps a reserve of them
/// free for the VMM, see `api::server::FD_RESERVE`).
fn raise_fd_limit() {
    // SAFETY: rlimit is plain old data; all-zeroes is a valid value.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit(2) writes into the rlimit we pass; checked.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } < 0 {
        log::warn!("cannot read RLIMIT_NOFILE: {}", io::Error::last_os_error());
        return;
    }
    if lim.rlim_cur >= lim.rlim_max {
        return;
    }
    let old = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit(2) reads the rlimit we pass; checked.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } < 0 {
        log::warn!(
            "cannot raise RLIMIT_NOFILE from {old}: {}",
            io::Error::last_os_error()
        );
    } else {
        log::debug!("RLIMIT_NOFILE raised from {old} to {}", lim.rlim_max);
    }
}

fn print_chain(e: &dyn std::error::Error) {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !msg.contains(&t) {
            msg.push_str(": ");
            msg.push_str(&t);
        }
        src = s.source();
    }
    vmm::say!("arbor: error: {msg}");
}

/// The signals that shut the VM down.
const SHUTDOWN_SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "signal",
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread (and so in every thread
/// it starts afterwards); returns the set for `sigwait`.
fn block_shutdown_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain old data; sigemptyset initializes it below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigemptyset/sigaddset only write the local set; the signal
    // numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for sig in SHUTDOWN_SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
    }
    // SAFETY: pthread_sigmask(3) reads the initialized set; no old mask is
    // asked for. It returns the error number instead of setting errno.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(set)
}

/// Runs `request` on its own thread, so the signal thread never waits for
/// the event loop (which may not be running yet) and sees the next signal.
fn request_in_background(
    what: &'static str,
    request: impl FnOnce() -> Result<(), api::ApiError> + Send + 'static,
) {
    let spawned = std::thread::Builder::new()
        .name("arbor-signal-req".into())
        .spawn(move || {
            if let Err(e) = request() {
                vmm::say!("arbor: {what}: {e}");
            }
        });
    if let Err(e) = spawned {
        vmm::say!("arbor: cannot {what}: {e}");
    }
}

/// The first signal: `vm.shutdown`. Without `--kernel` (the VMM outlives
/// its VM), the VMM then stops once no VM runs, as `arbor --kernel` does
/// when its VM stops.
fn shut_down(h: &VmmHandle, serve_only: bool) -> Result<(), api::ApiError> {
    match h.shutdown() {
        Ok(()) => {}
        // No VM running: nothing to power off.
        Err(e) if e.kind == api::ApiErrorKind::Conflict && serve_only => {}
        Err(e) => return Err(e),
    }
    if !serve_only {
        return Ok(());
    }
    while matches!(
        h.info()?.state,
        api::types::VmState::Running | api::types::VmState::Paused
    ) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    h.stop()
}

/// Starts the thread that turns SIGTERM/SIGINT into `vm.shutdown` (first)
/// and an immediate stop (second); records the second signal in `forced`.
fn spawn_signal_thread(
    set: libc::sigset_t,
    handle: VmmHandle,
    forced: Arc<AtomicI32>,
    serve_only: bool,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("arbor-signals".into())
        .spawn(move || {
            vmm::seccomp::install(vmm::seccomp::ThreadKind::Signals);
            let mut received = 0u32;
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: sigwait(3) reads the initialized set and writes
                // the signal number into `sig`; it returns an error number.
                let rc = unsafe { libc::sigwait(&set, &mut sig) };
                if rc != 0 {
                    vmm::say!(
                        "arbor: cannot wait for signals: {}",
                        io::Error::from_raw_os_error(rc)
                    );
                    return;
                }
                received += 1;
                let name = signal_name(sig);
                if received == 1 {
                    vmm::say!(
                        "arbor: {name} received: pressing the ACPI power button \
                         (the VM stops when the guest powers off or after the shutdown \
                         grace period; another SIGTERM or SIGINT stops it at once)"
                    );
                    let h = handle.clone();
                    request_in_background("shut the VM down", move || shut_down(&h, serve_only));
                } else {
                    vmm::say!("arbor: {name} received again: stopping the VM at once");
                    forced.store(sig, Ordering::SeqCst);
                    let h = handle.clone();
                    request_in_background("stop the VM", move || h.stop());
                }
            }
        })
        .map(|_| ())
}

/// Starts the thread that writes the event stream to `--event-monitor`'s
/// file or descriptor. It follows the bus like any API client (a slow
/// reader of a pipe loses events, counted in a `dropped` event, and never
/// holds the VMM up); the receiver tells when it has written the last event.
/// Opens the `--event-monitor` target: before the process confines itself
/// (Landlock would refuse to create the file afterwards).
fn open_event_monitor(target: &EventMonitor) -> io::Result<std::fs::File> {
    match target {
        EventMonitor::Path(p) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p),
        EventMonitor::Fd(fd) => {
            // SAFETY: F_GETFD only reads the descriptor's flags.
            if unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: the user handed this open descriptor (checked above)
            // to arbor for the event stream; nothing else in the process
            // uses or closes it.
            Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(*fd) })
        }
    }
}

/// Writes the event stream of `bus` to `out` from a thread of its own.
fn start_event_monitor(
    mut out: std::fs::File,
    bus: &EventBus,
) -> io::Result<std::sync::mpsc::Receiver<()>> {
    use std::io::Write;
    let sub = bus.subscribe();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("arbor-events".into())
        .spawn(move || {
            vmm::seccomp::install(vmm::seccomp::ThreadKind::EventMonitor);
            while let Some(ev) = sub.recv() {
                if let Err(e) = out.write_all(ev.to_line().as_bytes()) {
                    log::warn!("event monitor: cannot write: {e}; no more events are written");
                    break;
                }
            }
            let _ = done_tx.send(());
        })?;
    Ok(done_rx)
}

/// How long the exit waits for the event monitor to write the last events.
const MONITOR_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// Ends the process: the `vmm-exit` event, the end of every event stream,
/// and the monitor's last write.
fn exit_with(code: u8, bus: &EventBus, monitor: Option<std::sync::mpsc::Receiver<()>>) -> ExitCode {
    bus.emit(VmEventKind::VmmExit {
        status: i32::from(code),
    });
    bus.close();
    if let Some(done) = monitor {
        let _ = done.recv_timeout(MONITOR_FLUSH);
    }
    ExitCode::from(code)
}

/// One malloc arena for the whole process. glibc gives each new thread
/// its own arena (up to eight per CPU), and each costs about 32 KiB of
/// touched memory: with a worker thread per device that was most of what a
/// hot-plugged disk cost. The VMM's threads allocate little on their hot
/// paths (and glibc's per-thread cache serves those), so one shared arena
/// costs no measurable time. `MALLOC_ARENA_MAX` in the environment wins.
/// musl's allocator has no per-thread arenas, so there is nothing to limit.
#[cfg(target_env = "gnu")]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    // SAFETY: mallopt only changes a malloc tunable; called while this is
    // the only thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(target_env = "gnu"))]
fn limit_malloc_arenas() {}

fn main() -> ExitCode {
    limit_malloc_arenas();
    // Before any other thread exists, so that every thread inherits the mask
    // and the signals reach only the signal thread.
    let signals = match block_shutdown_signals() {
        Ok(set) => set,
        Err(e) => {
            vmm::say!("arbor: error: cannot block SIGTERM and SIGINT: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    vmm::logger::init();
    raise_fd_limit();
    let (cfg, serve_only) = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Run(cfg)) => (cfg, false),
        Ok(Command::Serve(cfg)) => (cfg, true),
        Ok(Command::PrintConfig(mut cfg)) => {
            cfg.absolutize();
            match serde_json::to_string_pretty(&cfg.to_json()) {
                Ok(text) => println!("{text}"),
                Err(e) => {
                    vmm::say!("arbor: error: cannot print the configuration: {e}");
                    return ExitCode::from(EXIT_ERROR);
                }
            }
            return ExitCode::SUCCESS;
        }
        Ok(Command::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("arbor {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            vmm::say!("arbor: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mut cfg = cfg;
    let monitor_file = match cfg.event_monitor.as_ref().map(open_event_monitor) {
        None => None,
        Some(Ok(file)) => Some(file),
        Some(Err(e)) => {
            vmm::say!("arbor: error: --event-monitor: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Before any thread starts: the API, signal and event-monitor threads
    // install their filters in this mode, as every VM's threads will, and
    // the API thread confines itself as `main` is about to.
    vmm::seccomp::set_mode(cfg.seccomp);
    vmm::confine::set_api_thread_options(cfg.confine.clone());
    let api_socket = cfg.api_socket.clone();
    let mut vmm = match Vmm::new() {
        Ok(v) => v,
        Err(e) => {
            print_chain(&e);
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let bus = vmm.events();
    // The API server is a thin client of the VMM's request channel. It
    // starts first, before `main` confines itself and builds the VM:
    // vmm.ping answers at once, and other requests wait in the channel
    // until the VMM's loop runs. Its thread confines itself before it
    // serves (`vmm::confine::api_thread_start`).
    let server = match api_socket {
        Some(path) => {
            let started =
                vmm.handle()
                    .channel()
                    .map_err(|e| e.to_string())
                    .and_then(|(tx, wake)| {
                        let options = api::ServerOptions {
                            events: Some(bus.clone()),
                            ping_version: Some(env!("CARGO_PKG_VERSION").to_string()),
                        };
                        api::start_server_with_options(&path, tx, wake, options)
                            .map_err(|e| e.to_string())
                    });
            match started {
                Ok(s) => Some(s),
                Err(e) => {
                    vmm::say!(
                        "arbor: error: cannot serve the API on {}: {e}",
                        path.display()
                    );
                    return ExitCode::from(EXIT_ERROR);
                }
            }
        }
        None => None,
    };
    // The only other thread is the API thread, confined by now: Landlock,
    // no-new-privs and the capability drop are per thread, and every
    // thread started from here on (the INTx thread in Vm::new, the signal
    // thread, the event monitor, vCPUs, device workers) inherits them.
    let kvm = vmm::kvm_device_path();
    let api_threads = usize::from(server.is_some());
    if let Err(e) = vmm::confine::apply(&cfg, std::path::Path::new(&kvm), api_threads) {
        vmm::say!("arbor: error: {e}");
        return exit_with(EXIT_ERROR, &bus, None);
    }
    if vmm::confine::selftest_skips_path_check() {
        log::warn!(
            "{}: the VMM's own path check is off (test hook)",
            vmm::confine::SELFTEST_ENV
        );
        cfg.check_paths = false;
    }
    // What vm.create's configurations are held to (read by the VMM's loop,
    // after this).
    vmm.set_policy(vmm::ProcessPolicy::from_command_line(&cfg));
    let monitor = match monitor_file {
        Some(file) => match start_event_monitor(file, &bus) {
            Ok(done) => Some(done),
            Err(e) => {
                vmm::say!("arbor: error: --event-monitor: {e}");
                return exit_with(EXIT_USAGE, &bus, None);
            }
        },
        None => None,
    };
    if !serve_only {
        let failed = match vmm.create(*cfg) {
            Ok(_) => None,
            Err(vmm::Error::Config(e)) => {
                vmm::say!("arbor: error: {e}");
                Some(EXIT_USAGE)
            }
            Err(e) => {
                print_chain(&e);
                Some(EXIT_ERROR)
            }
        };
        if let Some(code) = failed {
            // Requests that came while the VM was being built get an answer.
            vmm.refuse_queued();
            drop(server);
            return exit_with(code, &bus, monitor);
        }
    }
    // Signals pending since the start are taken from here on.
    let forced = Arc::new(AtomicI32::new(0));
    if let Err(e) = spawn_signal_thread(signals, vmm.handle(), Arc::clone(&forced), serve_only) {
        vmm::say!("arbor: error: cannot start the signal thread: {e}");
        return exit_with(EXIT_ERROR, &bus, monitor);
    }
    let outcome = if serve_only { vmm.serve() } else { vmm.run() };
    vmm.refuse_queued();
    let code = match outcome {
        Ok(ExitReason::PowerOff) => {
            vmm::say!("arbor: guest powered off");
            0
        }
        Ok(ExitReason::Reset) => {
            vmm::say!("arbor: guest reset (reboot or panic); exit status {EXIT_GUEST_RESET}");
            EXIT_GUEST_RESET
        }
        Ok(ExitReason::Shutdown) => {
            vmm::say!("arbor: VM shut down on request");
            0
        }
        Ok(ExitReason::VmmShutdown) => match forced.load(Ordering::SeqCst) {
            0 => {
                vmm::say!("arbor: VMM stopped on request");
                0
            }
            sig => {
                let status = 128 + sig as u8;
                vmm::say!(
                    "arbor: VM stopped at once on a second {}; exit status {status}",
                    signal_name(sig)
                );
                status
            }
        },
        Err(e) => {
            print_chain(&e);
            EXIT_ERROR
        }
    };
    let exit = exit_with(code, &bus, monitor);
    // Event streams have ended: the server stops without waiting for them.
    drop(server);
    exit
}
