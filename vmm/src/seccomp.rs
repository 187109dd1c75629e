//! Seccomp filters, one per thread kind.
//!
//! Every Arbor thread installs its own filter (`seccompiler`, TSYNC off)
//! as its first action once its setup is done. The allow lists
//! ([`rules`], a file `vmm/build.rs` shares) are data: a base list every thread needs (memory, futexes, thread start,
//! signals, clocks, epoll/eventfd, reads and writes on descriptors it
//! already holds), plus what each kind adds. Anything else kills the
//! process (`SIGSYS`) with [`SeccompMode::On`], or is only logged by the
//! kernel with [`SeccompMode::Log`].
//!
//! Filters stack: a thread spawned by a filtered thread keeps its parent's
//! filter and adds its own. Device workers are started by a vCPU thread
//! (the guest sets DRIVER_OK), and `arbor-signal-req` threads by the signal
//! thread, so those parents' lists include what the children need.
//!
//! `ioctl` is allowed without looking at the request number: the vCPU,
//! event loop and INTx threads issue many KVM requests, the event loop
//! terminal and block-size requests. `openat` is allowed to every thread
//! (glibc reads `/sys/devices/system/cpu/online` the first time a thread
//! creates a malloc arena); `execve`, new sockets (except in the API
//! thread, which only accepts), `ptrace`, `mount`, `kexec` and the rest
//! are not.
//!
//! The mode is process-wide: [`set_mode`] is called by `Vm::new`.

use std::sync::atomic::{AtomicU8, Ordering};

use seccompiler::sock_filter;

#[path = "seccomp_rules.rs"]
pub mod rules;

pub use rules::ThreadKind;

// The programs of every kind and mode, compiled by `vmm/build.rs` from
// `rules` when Arbor is built: `built_program(kind, log)`.
include!(concat!(env!("OUT_DIR"), "/seccomp_programs.rs"));

/// Whether and how filters are installed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// A forbidden system call kills the process with `SIGSYS`.
    On,
    /// A forbidden system call is logged by the kernel and allowed.
    Log,
    /// No filters.
    #[default]
    Off,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(SeccompMode::On),
            "log" => Ok(SeccompMode::Log),
            "off" => Ok(SeccompMode::Off),
            _ => Err(format!("seccomp must be on, log or off, not {s:?}")),
        }
    }
}

static MODE: AtomicU8 = AtomicU8::new(2);

/// Sets the process-wide mode and hooks the threads of `devices` and `api`
/// (the API thread's hook, [`crate::confine::api_thread_start`], also
/// applies the confinement `main` asked for, whatever the mode).
pub fn set_mode(mode: SeccompMode) {
    MODE.store(
        match mode {
            SeccompMode::On => 0,
            SeccompMode::Log => 1,
            SeccompMode::Off => 2,
        },
        Ordering::Release,
    );
    if mode != SeccompMode::Off {
        devices::virtio::worker::set_thread_hook(|name| install(ThreadKind::of_worker(name)));
    }
    api::set_thread_hook(crate::confine::api_thread_start);
}

/// The process-wide mode.
pub fn mode() -> SeccompMode {
    match MODE.load(Ordering::Acquire) {
        0 => SeccompMode::On,
        1 => SeccompMode::Log,
        _ => SeccompMode::Off,
    }
}

/// The program a thread of `kind` installs in `mode` (`Off` gives `On`'s),
/// compiled when Arbor was built: a starting thread (the API thread, a
/// device worker per hot-plugged device) only installs it, without the
/// time, stack and heap of compiling it.
pub fn program(kind: ThreadKind, mode: SeccompMode) -> &'static [sock_filter] {
    built_program(kind, mode == SeccompMode::Log)
}

/// The system call `ARBOR_SECCOMP_SELFTEST` makes: in no allow list.
const SELFTEST_SYSCALL: i64 = libc::SYS_getpgrp;

/// Installs the calling thread's filter for `kind` in the process-wide
/// mode. A failure is logged; the thread keeps running unfiltered only if
/// the kernel refused the filter.
///
/// Test hook: if the environment variable `ARBOR_SECCOMP_SELFTEST` (a
/// comma-separated list of kinds) names `kind`, the thread makes a
/// forbidden call right after. Only the process
/// environment can set it, never the guest or the API.
pub fn install(kind: ThreadKind) {
    let mode = mode();
    if mode == SeccompMode::Off {
        return;
    }
    let selftest = std::env::var("ARBOR_SECCOMP_SELFTEST")
        .is_ok_and(|v| v.split(',').any(|k| k == kind.name()));
    if let Err(e) = seccompiler::apply_filter(program(kind, mode)) {
        log::error!("cannot install the seccomp filter for {}: {e}", kind.name());
        return;
    }
    if selftest {
        // Tells a test the filters are in: a kill after this line comes
        // from the forbidden call, not from installing them.
        eprintln!("arbor: seccomp selftest ({}) installed", kind.name());
        // SAFETY: getpgrp takes no arguments and touches no memory.
        let pgrp = unsafe { libc::syscall(SELFTEST_SYSCALL) };
        eprintln!("arbor: seccomp selftest ({}) survived: {pgrp}", kind.name());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rules::oracle::rules;
    use seccompiler::BpfProgram;

    /// The program of `kind` in `mode` (`Off` gives `On`'s), built here from
    /// [`rules`] ([`rules::compact`]), as `vmm/build.rs` builds it.
    fn filter(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram, rules::TooLong> {
        rules::compact(kind, mode == SeccompMode::Log)
    }

    /// Runs a classic BPF program (the instructions `seccompiler` and
    /// `rules::compact` emit) on a `seccomp_data`: its return value.
    fn run(prog: &[sock_filter], nr: u32, arch: u32, arg0: u64) -> u32 {
        let word = |off: u32| match off {
            0 => nr,
            4 => arch,
            16 => arg0 as u32,
            20 => (arg0 >> 32) as u32,
            _ => panic!("load at {off}"),
        };
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = &prog[pc];
            pc += 1;
            let op = u32::from(i.code);
            match op {
                _ if op == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => a = word(i.k),
                _ if op == libc::BPF_ALU | libc::BPF_AND | libc::BPF_K => a &= i.k,
                _ if op == libc::BPF_RET | libc::BPF_K => return i.k,
                _ if op == libc::BPF_JMP | libc::BPF_JA => pc += i.k as usize,
                _ => {
                    let taken = match op & !libc::BPF_K {
                        x if x == libc::BPF_JMP | libc::BPF_JEQ => a == i.k,
                        x if x == libc::BPF_JMP | libc::BPF_JGT => a > i.k,
                        x if x == libc::BPF_JMP | libc::BPF_JGE => a >= i.k,
                        x if x == libc::BPF_JMP | libc::BPF_JSET => a & i.k != 0,
                        _ => panic!("opcode {op:#x}"),
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
            }
        }
    }

    /// Arbor's programs (runs of consecutive calls) decide every call as
    /// `seccompiler`'s program of the same lists does, and are shorter.
    #[test]
    fn compact_programs_agree_with_seccompiler() {
        const AUDIT_ARCH_I386: u32 = 3 | 0x4000_0000;
        let x32 = 0x4000_0000u32;
        let args = [
            0,
            CLONE_THREAD_FLAGS,
            CLONE_THREAD_FLAGS | (1 << 40),
            libc::SIGCHLD as u64,
            1 << 40,
            u64::MAX,
        ];
        for kind in ThreadKind::ALL {
            for log in [false, true] {
                let ours = rules::compact(kind, log).unwrap();
                let theirs = rules::oracle::reference(kind, log).unwrap();
                assert!(
                    ours.len() * 6 < theirs.len(),
                    "{kind:?}: {} {}",
                    ours.len(),
                    theirs.len()
                );
                let mut allowed = 0;
                for arch in [rules::AUDIT_ARCH_X86_64, AUDIT_ARCH_I386] {
                    for nr in (0..=600u32).chain([x32, x32 | 1, x32 | 56, u32::MAX]) {
                        for &arg0 in &args {
                            let verdict = run(&ours, nr, arch, arg0);
                            assert_eq!(
                                verdict,
                                run(&theirs, nr, arch, arg0),
                                "{kind:?} log={log} nr={nr:#x} arch={arch:#x} arg0={arg0:#x}"
                            );
                            allowed += usize::from(verdict == libc::SECCOMP_RET_ALLOW);
                        }
                    }
                }
                // The lists allow something, and clone only with CLONE_THREAD.
                assert!(allowed > 0);
                let clone = libc::SYS_clone as u32;
                let x86 = rules::AUDIT_ARCH_X86_64;
                assert_eq!(
                    run(&ours, clone, x86, CLONE_THREAD_FLAGS),
                    libc::SECCOMP_RET_ALLOW
                );
                assert_eq!(
                    run(&ours, clone, x86, libc::SIGCHLD as u64),
                    rules::mismatch_action(log)
                );
                assert_eq!(
                    run(&ours, libc::SYS_clone3 as u32, x86, 0),
                    libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32
                );
                assert_eq!(
                    run(&ours, 0, AUDIT_ARCH_I386, 0),
                    libc::SECCOMP_RET_KILL_PROCESS
                );
            }
        }
    }

    /// The flags std's thread spawn passes to `clone`.
    const CLONE_THREAD_FLAGS: u64 = (libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM
        | libc::CLONE_SETTLS
        | libc::CLONE_PARENT_SETTID
        | libc::CLONE_CHILD_CLEARTID) as u64;

    /// The programs compiled with Arbor are those its allow lists give now.
    #[test]
    fn built_programs_are_the_rules_compiled() {
        for kind in ThreadKind::ALL {
            for mode in [SeccompMode::On, SeccompMode::Log] {
                let now = filter(kind, mode).unwrap();
                assert_eq!(program(kind, mode), &now[..], "{kind:?} {mode:?}");
            }
            assert_eq!(
                program(kind, SeccompMode::Off),
                program(kind, SeccompMode::On)
            );
        }
        // Each kind has its own program.
        assert_ne!(
            program(ThreadKind::Api, SeccompMode::On),
            program(ThreadKind::Vcpu, SeccompMode::On)
        );
        assert_ne!(
            program(ThreadKind::Api, SeccompMode::On),
            program(ThreadKind::Api, SeccompMode::Log)
        );
    }

    #[test]
    fn every_filter_compiles_and_omits_the_selftest_call() {
        for kind in ThreadKind::ALL {
            assert!(!rules(kind).contains_key(&SELFTEST_SYSCALL));
            assert!(!rules(kind).contains_key(&libc::SYS_execve));
            filter(kind, SeccompMode::On).unwrap();
            filter(kind, SeccompMode::Log).unwrap();
            // clone only for threads.
            assert_eq!(rules(kind)[&libc::SYS_clone].len(), 1);
        }
        // vCPU threads start the vsock worker, so they allow its socket calls,
        // but never binding or listening.
        assert!(!rules(ThreadKind::Vcpu).contains_key(&libc::SYS_bind));
        assert!(!rules(ThreadKind::Vcpu).contains_key(&libc::SYS_listen));
        assert!(!rules(ThreadKind::Api).contains_key(&libc::SYS_socket));
        assert!(!rules(ThreadKind::Worker).contains_key(&libc::SYS_pwritev2));
        assert_eq!(ThreadKind::of_worker("virtio-blk"), ThreadKind::BlockWorker);
        assert_eq!(ThreadKind::of_worker("virtio-rng"), ThreadKind::Worker);
        assert_eq!(
            ThreadKind::of_worker("virtio-vsock"),
            ThreadKind::VsockWorker
        );
        assert!(!rules(ThreadKind::Worker).contains_key(&libc::SYS_connect));
        assert!(!rules(ThreadKind::VsockWorker).contains_key(&libc::SYS_bind));
        assert_eq!(ThreadKind::of_worker("virtio-net"), ThreadKind::Worker);
    }

    /// The one installed program answers `clone3` with `ENOSYS` (a filter
    /// without the prefix lets `clone3(NULL, 0)` fail with `EINVAL`) and
    /// allows the list's calls; in its own thread, since filters stay.
    #[test]
    fn installed_filter_fails_clone3_with_enosys() {
        let prog = filter(ThreadKind::Worker, SeccompMode::Log).unwrap();
        let (errno, pid) = std::thread::spawn(move || {
            seccompiler::apply_filter(&prog).unwrap();
            // SAFETY: clone3 with a null argument block and size 0 creates
            // nothing: the kernel (or the filter) fails it before reading.
            let r = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            assert_eq!(r, -1);
            // SAFETY: getpid takes no arguments.
            (errno, unsafe { libc::getpid() })
        })
        .join()
        .unwrap();
        assert_eq!(errno, Some(libc::ENOSYS));
        assert_eq!(pid, std::process::id() as i32);
    }

    #[test]
    fn modes_parse() {
        assert_eq!("on".parse::<SeccompMode>().unwrap(), SeccompMode::On);
        assert_eq!("log".parse::<SeccompMode>().unwrap(), SeccompMode::Log);
        assert_eq!("off".parse::<SeccompMode>().unwrap(), SeccompMode::Off);
        assert!("yes".parse::<SeccompMode>().is_err());
    }
}
