//! `arbor`: boot a Linux guest under KVM.

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
    let mut vm = match Vm::new(cfg) {
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
    match vm.run() {
        Ok(ExitReason::PowerOff) => {
            eprintln!("arbor: guest powered off");
            ExitCode::SUCCESS
        }
        Ok(ExitReason::Reset) => {
            eprintln!("arbor: guest reset (reboot or panic); exit status {EXIT_GUEST_RESET}");
            ExitCode::from(EXIT_GUEST_RESET)
        }
        Err(e) => {
            print_chain(&e);
            ExitCode::from(EXIT_ERROR)
        }
    }
}
