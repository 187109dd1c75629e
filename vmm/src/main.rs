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
//! Before the VM is created, while it is still the only thread, arbor
//! confines itself (`vmm::confine::apply`: Landlock, no-new-privs, the
//! capability drop), so every thread it starts is confined.

use std::io;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use vmm::config::{parse_args, Command, USAGE};
use vmm::{ExitReason, Vm, VmmHandle};

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
    eprintln!("arbor: error: {msg}");
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
                eprintln!("arbor: {what}: {e}");
            }
        });
    if let Err(e) = spawned {
        eprintln!("arbor: cannot {what}: {e}");
    }
}

/// Starts the thread that turns SIGTERM/SIGINT into `vm.shutdown` (first)
/// and an immediate stop (second); records the second signal in `forced`.
fn spawn_signal_thread(
    set: libc::sigset_t,
    handle: VmmHandle,
    forced: Arc<AtomicI32>,
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
                    eprintln!(
                        "arbor: cannot wait for signals: {}",
                        io::Error::from_raw_os_error(rc)
                    );
                    return;
                }
                received += 1;
                let name = signal_name(sig);
                if received == 1 {
                    eprintln!(
                        "arbor: {name} received: pressing the ACPI power button \
                         (the VM stops when the guest powers off or after the shutdown \
                         grace period; another SIGTERM or SIGINT stops it at once)"
                    );
                    let h = handle.clone();
                    request_in_background("shut the VM down", move || h.shutdown());
                } else {
                    eprintln!("arbor: {name} received again: stopping the VM at once");
                    forced.store(sig, Ordering::SeqCst);
                    let h = handle.clone();
                    request_in_background("stop the VM", move || h.stop());
                }
            }
        })
        .map(|_| ())
}

fn main() -> ExitCode {
    // Before any other thread exists, so that every thread inherits the mask
    // and the signals reach only the signal thread.
    let signals = match block_shutdown_signals() {
        Ok(set) => set,
        Err(e) => {
            eprintln!("arbor: error: cannot block SIGTERM and SIGINT: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    vmm::logger::init();
    raise_fd_limit();
    let cfg = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Run(cfg)) => cfg,
        Ok(Command::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("arbor {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("arbor: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mut cfg = cfg;
    // Still the only thread: Landlock, no-new-privs and the capability
    // drop are per thread, and every thread started from here on (the
    // INTx thread in Vm::new, the signal thread, the API thread, vCPUs,
    // device workers) inherits them.
    let kvm = vmm::kvm_device_path();
    if let Err(e) = vmm::confine::apply(&cfg, std::path::Path::new(&kvm)) {
        eprintln!("arbor: error: {e}");
        return ExitCode::from(EXIT_ERROR);
    }
    if vmm::confine::selftest_skips_path_check() {
        log::warn!(
            "{}: the VMM's own path check is off (test hook)",
            vmm::confine::SELFTEST_ENV
        );
        cfg.check_paths = false;
    }
    let api_socket = cfg.api_socket.clone();
    let mut vm = match Vm::new(*cfg) {
        Ok(vm) => vm,
        Err(vmm::Error::Config(e)) => {
            eprintln!("arbor: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            print_chain(&e);
            return ExitCode::from(EXIT_ERROR);
        }
    };
    // Signals pending since the start are taken from here on.
    let forced = Arc::new(AtomicI32::new(0));
    if let Err(e) = spawn_signal_thread(signals, vm.handle(), Arc::clone(&forced)) {
        eprintln!("arbor: error: cannot start the signal thread: {e}");
        return ExitCode::from(EXIT_ERROR);
    }
    // The API server is a thin client of the VM's request channel.
    let _server = match api_socket {
        Some(path) => {
            let started =
                vm.handle()
                    .channel()
                    .map_err(|e| e.to_string())
                    .and_then(|(tx, wake)| {
                        api::start_server(&path, tx, wake).map_err(|e| e.to_string())
                    });
            match started {
                Ok(s) => Some(s),
                Err(e) => {
                    eprintln!(
                        "arbor: error: cannot serve the API on {}: {e}",
                        path.display()
                    );
                    return ExitCode::from(EXIT_ERROR);
                }
            }
        }
        None => None,
    };
    match vm.run() {
        Ok(ExitReason::PowerOff) => {
            eprintln!("arbor: guest powered off");
            ExitCode::SUCCESS
        }
        Ok(ExitReason::Reset) => {
            eprintln!("arbor: guest reset (reboot or panic); exit status {EXIT_GUEST_RESET}");
            ExitCode::from(EXIT_GUEST_RESET)
        }
        Ok(ExitReason::Shutdown) => {
            eprintln!("arbor: VM shut down on request");
            ExitCode::SUCCESS
        }
        Ok(ExitReason::VmmShutdown) => match forced.load(Ordering::SeqCst) {
            0 => {
                eprintln!("arbor: VMM stopped on request");
                ExitCode::SUCCESS
            }
            sig => {
                let status = 128 + sig as u8;
                eprintln!(
                    "arbor: VM stopped at once on a second {}; exit status {status}",
                    signal_name(sig)
                );
                ExitCode::from(status)
            }
        },
        Err(e) => {
            print_chain(&e);
            ExitCode::from(EXIT_ERROR)
        }
    }
}
