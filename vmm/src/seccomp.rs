//! Seccomp filters, one per thread kind.
//!
//! Every Arbor thread installs its own filter (`seccompiler`, TSYNC off)
//! as its first action once its setup is done. The allow lists below are
//! data: a base list every thread needs (memory, futexes, thread start,
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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

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

/// The thread kinds, each with its own allow list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    Vcpu,
    EventLoop,
    Api,
    Worker,
    Intx,
    Signals,
}

impl ThreadKind {
    /// The name used by `ARBOR_SECCOMP_SELFTEST`.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::EventLoop => "event-loop",
            ThreadKind::Api => "api",
            ThreadKind::Worker => "worker",
            ThreadKind::Intx => "intx",
            ThreadKind::Signals => "signals",
        }
    }
}

static MODE: AtomicU8 = AtomicU8::new(2);

/// Sets the process-wide mode and hooks the threads of `devices` and `api`.
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
        devices::virtio::worker::set_thread_hook(|| install(ThreadKind::Worker));
        api::set_thread_hook(|| install(ThreadKind::Api));
    }
}

/// The process-wide mode.
pub fn mode() -> SeccompMode {
    match MODE.load(Ordering::Acquire) {
        0 => SeccompMode::On,
        1 => SeccompMode::Log,
        _ => SeccompMode::Off,
    }
}

/// Calls allowed to every thread.
const BASE: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_openat,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_ioctl,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_getrandom,
    libc::SYS_getdents64,
    libc::SYS_getrlimit,
    libc::SYS_prlimit64,
    libc::SYS_uname,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_prctl,
    // Threads: glibc's pthread_create (clone3, falling back to clone).
    libc::SYS_clone,
    libc::SYS_clone3,
];

/// Block I/O done by device workers (and inherited from vCPU threads).
const BLOCK_IO: &[i64] = &[
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
];

/// What each thread kind may call beyond [`BASE`].
pub fn extra_rules(kind: ThreadKind) -> Vec<i64> {
    match kind {
        // KVM_RUN and device emulation; starts the device workers, which
        // install their own filter on top of this one (`seccomp` only ever
        // adds restrictions).
        ThreadKind::Vcpu => {
            let mut v = BLOCK_IO.to_vec();
            v.push(libc::SYS_seccomp);
            v
        }
        ThreadKind::Worker => BLOCK_IO.to_vec(),
        // Hotplug opens and checks disks, stops the API server (which
        // removes its socket), kicks vCPUs, restores the terminal.
        ThreadKind::EventLoop => {
            let mut v = BLOCK_IO.to_vec();
            v.extend_from_slice(&[
                libc::SYS_flock,
                libc::SYS_ftruncate,
                libc::SYS_unlinkat,
                libc::SYS_readlinkat,
                libc::SYS_pipe2,
                libc::SYS_kill,
                libc::SYS_getrusage,
                libc::SYS_membarrier,
                libc::SYS_munlock,
                libc::SYS_mlock,
                libc::SYS_sched_setaffinity,
                libc::SYS_getcwd,
                libc::SYS_wait4,
            ]);
            v
        }
        // Accepts on the listening socket and serves connections; counts its
        // descriptors in /proc/self/fd (getdents64, in the base list).
        ThreadKind::Api => vec![
            libc::SYS_accept4,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_sendto,
            libc::SYS_sendmsg,
            libc::SYS_shutdown,
            libc::SYS_getsockopt,
            libc::SYS_setsockopt,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
            libc::SYS_unlinkat,
            libc::SYS_unlink,
        ],
        ThreadKind::Intx => vec![],
        // sigwait; `arbor-signal-req` threads (started here) call the
        // embedding handle.
        ThreadKind::Signals => vec![libc::SYS_rt_sigtimedwait, libc::SYS_kill],
    }
}

/// The allow list of `kind`, as `seccompiler` rules.
pub fn rules(kind: ThreadKind) -> BTreeMap<i64, Vec<SeccompRule>> {
    BASE.iter()
        .copied()
        .chain(extra_rules(kind))
        .map(|nr| (nr, Vec::new()))
        .collect()
}

/// The compiled filter of `kind`.
pub fn filter(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram, seccompiler::Error> {
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::KillProcess,
    };
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(seccompiler::Error::Backend)?;
    let f = SeccompFilter::new(rules(kind), mismatch, SeccompAction::Allow, arch)
        .map_err(seccompiler::Error::Backend)?;
    f.try_into().map_err(seccompiler::Error::Backend)
}

/// The system call `ARBOR_SECCOMP_SELFTEST` makes: in no allow list.
const SELFTEST_SYSCALL: i64 = libc::SYS_getpgrp;

/// Installs the calling thread's filter for `kind` in the process-wide
/// mode. A failure is logged; the thread keeps running unfiltered only if
/// the kernel refused the filter.
///
/// Test hook: if the environment variable `ARBOR_SECCOMP_SELFTEST` names
/// `kind`, the thread makes a forbidden call right after. Only the process
/// environment can set it, never the guest or the API.
pub fn install(kind: ThreadKind) {
    let mode = mode();
    if mode == SeccompMode::Off {
        return;
    }
    let selftest = std::env::var("ARBOR_SECCOMP_SELFTEST").is_ok_and(|v| v == kind.name());
    let prog = match filter(kind, mode) {
        Ok(p) => p,
        Err(e) => {
            log::error!("seccomp filter for {}: {e}", kind.name());
            return;
        }
    };
    if let Err(e) = seccompiler::apply_filter(&prog) {
        log::error!("cannot install the seccomp filter for {}: {e}", kind.name());
        return;
    }
    if selftest {
        // SAFETY: getpgrp takes no arguments and touches no memory.
        let pgrp = unsafe { libc::syscall(SELFTEST_SYSCALL) };
        eprintln!("arbor: seccomp selftest ({}) survived: {pgrp}", kind.name());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_and_omits_the_selftest_call() {
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::EventLoop,
            ThreadKind::Api,
            ThreadKind::Worker,
            ThreadKind::Intx,
            ThreadKind::Signals,
        ] {
            assert!(!rules(kind).contains_key(&SELFTEST_SYSCALL));
            assert!(!rules(kind).contains_key(&libc::SYS_execve));
            filter(kind, SeccompMode::On).unwrap();
            filter(kind, SeccompMode::Log).unwrap();
        }
        assert!(!rules(ThreadKind::Vcpu).contains_key(&libc::SYS_socket));
    }

    #[test]
    fn modes_parse() {
        assert_eq!("on".parse::<SeccompMode>().unwrap(), SeccompMode::On);
        assert_eq!("log".parse::<SeccompMode>().unwrap(), SeccompMode::Log);
        assert_eq!("off".parse::<SeccompMode>().unwrap(), SeccompMode::Off);
        assert!("yes".parse::<SeccompMode>().is_err());
    }
}
