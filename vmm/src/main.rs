//! `arbor`: boot a Linux guest under KVM, optionally driven over an HTTP
//! API on a UNIX socket.

use std::process::ExitCode;

use vmm::config::{parse_args, Command, USAGE};
use vmm::{ExitReason, Vm};

/// Exit status when the guest reboots or resets.
const EXIT_GUEST_RESET: u8 = 3;
const EXIT_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;

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

fn main() -> ExitCode {
    vmm::logger::init();
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
        Ok(ExitReason::VmmShutdown) => {
            eprintln!("arbor: VMM stopped on request");
            ExitCode::SUCCESS
        }
        Err(e) => {
            print_chain(&e);
            ExitCode::from(EXIT_ERROR)
        }
    }
}
