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
use std::sync::{Arc, Mutex};

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

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
    /// A virtio-blk back end's worker.
    BlockWorker,
    /// Any other device worker (virtio-rng: `getrandom`; virtio-net:
    /// `read`/`write` on its tap and the `TUNSETOFFLOAD` `ioctl`; all in the
    /// base list).
    Worker,
    Intx,
    Signals,
    /// The `--event-monitor` writer: writes to a descriptor it holds.
    EventMonitor,
    /// The virtio-vsock worker: accepts host clients on its listening UNIX
    /// socket and connects to `PATH_P` sockets.
    VsockWorker,
}

impl ThreadKind {
    /// The kind of a device worker thread named `thread` (the device kind).
    pub fn of_worker(thread: &str) -> ThreadKind {
        match thread {
            "virtio-blk" => ThreadKind::BlockWorker,
            "virtio-vsock" => ThreadKind::VsockWorker,
            _ => ThreadKind::Worker,
        }
    }

    /// Every kind.
    pub const ALL: [ThreadKind; 9] = [
        ThreadKind::Vcpu,
        ThreadKind::EventLoop,
        ThreadKind::Api,
        ThreadKind::BlockWorker,
        ThreadKind::Worker,
        ThreadKind::Intx,
        ThreadKind::Signals,
        ThreadKind::EventMonitor,
        ThreadKind::VsockWorker,
    ];

    /// The name used by `ARBOR_SECCOMP_SELFTEST`.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::EventLoop => "event-loop",
            ThreadKind::Api => "api",
            ThreadKind::BlockWorker => "blk-worker",
            ThreadKind::Worker => "worker",
            ThreadKind::Intx => "intx",
            ThreadKind::Signals => "signals",
            ThreadKind::EventMonitor => "monitor",
            ThreadKind::VsockWorker => "vsock-worker",
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
        devices::virtio::worker::set_thread_hook(|name| install(ThreadKind::of_worker(name)));
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
    // The older calls musl makes where glibc makes the ones above (the
    // release build links musl statically): `open` for `openat`, `stat`
    // and `lstat` for `newfstatat`, `dup2` for `dup3`, `tkill` for
    // `tgkill`. Each does no more than its allowed counterpart.
    libc::SYS_open,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_dup2,
    libc::SYS_tkill,
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

/// UNIX socket calls of the vsock worker (inherited from the vCPU thread
/// that starts it): accept host clients, connect to `PATH_P`, half-close.
const VSOCK_IO: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_shutdown,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
];

/// Creating the vsock device's listening socket (a hot-plug request, in the
/// event loop) and removing it with the device.
const VSOCK_LISTEN: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// A vfio-user client (hot-plug, and removal on the event loop; the
/// handshake's helper thread inherits the event loop's filter): connect to
/// the server's socket, pass guest RAM and interrupt descriptors
/// (`SCM_RIGHTS`), receive region descriptors, shut the connection down.
const VFIO_USER: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
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
            v.extend_from_slice(VSOCK_IO);
            // A passthrough function's accesses go to its vfio-user server
            // (std's socket reads and writes are recvfrom/sendto); a failing
            // server's connection is shut down.
            v.extend(
                VFIO_USER
                    .iter()
                    .filter(|&&nr| nr != libc::SYS_socket && nr != libc::SYS_connect),
            );
            // A kernel VFIO function that fails on a guest access is closed
            // on the vCPU thread; closing it reads its IOMMU group link.
            v.extend_from_slice(&[libc::SYS_readlink, libc::SYS_readlinkat]);
            v
        }
        ThreadKind::BlockWorker => BLOCK_IO.to_vec(),
        ThreadKind::Worker => vec![],
        // Hotplug opens, checks and locks disks (OFD locks are `fcntl`),
        // stops the API server (which removes its socket), kicks vCPUs
        // (`tgkill`), restores the terminal (`ioctl`).
        ThreadKind::EventLoop => {
            let mut v = BLOCK_IO.to_vec();
            v.extend_from_slice(&[
                // The API socket, removed when the server stops.
                libc::SYS_unlinkat,
                // Path checks (canonicalising a disk's path, access(2)).
                libc::SYS_readlink,
                libc::SYS_readlinkat,
                libc::SYS_getcwd,
                libc::SYS_access,
                libc::SYS_faccessat,
                libc::SYS_faccessat2,
                // vCPU threads it starts later (a VM created again in the
                // same process) install their own filters on top.
                libc::SYS_seccomp,
            ]);
            v.extend_from_slice(VSOCK_LISTEN);
            v.extend_from_slice(VFIO_USER);
            // Guest RAM of a VM created again in the same process (vm.create
            // after vm.delete) is a memfd.
            v.extend_from_slice(&[libc::SYS_memfd_create, libc::SYS_ftruncate]);
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
        ThreadKind::Intx | ThreadKind::EventMonitor => vec![],
        ThreadKind::VsockWorker => VSOCK_IO.to_vec(),
        // sigwait; `arbor-signal-req` threads (started here) call the
        // embedding handle.
        ThreadKind::Signals => vec![libc::SYS_rt_sigtimedwait],
    }
}

/// The allow list of `kind`, as `seccompiler` rules.
///
/// `clone` is allowed only with `CLONE_THREAD` (new threads, never new
/// processes). `clone3` passes its flags in memory a filter cannot read: the
/// compiled filter answers it `ENOSYS` before the list ([`filter`]), and
/// glibc's `pthread_create` then falls back to `clone`.
pub fn rules(kind: ThreadKind) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BASE
        .iter()
        .copied()
        .chain(extra_rules(kind))
        .map(|nr| (nr, Vec::new()))
        .collect();
    let thread = libc::CLONE_THREAD as u64;
    if let Ok(cond) = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(thread),
        thread,
    ) {
        if let Ok(rule) = SeccompRule::new(vec![cond]) {
            rules.insert(libc::SYS_clone, vec![rule]);
        }
    }
    rules
}

/// `AUDIT_ARCH_X86_64` (`linux/audit.h`): the `arch` field of `seccomp_data`
/// for 64-bit x86 system calls.
const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;

/// `prog` with a prefix that fails `clone3` with `ENOSYS` (glibc then
/// creates threads with `clone`, whose flags the lists can check; `clone3`
/// passes them in memory, out of a filter's reach). `seccompiler` gives one
/// filter a single action for every matched rule, so this prefix is what
/// spares each thread a second filter and its `seccomp()` call. The prefix
/// checks the architecture itself and otherwise falls through to `prog`,
/// which checks it again; BPF jumps are relative, so `prog` is unchanged.
fn with_clone3_enosys(prog: BpfProgram) -> BpfProgram {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    const ARCH_OFFSET: u32 = 4; // seccomp_data.arch
    const NR_OFFSET: u32 = 0; // seccomp_data.nr
    let insn = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    let mut out = vec![
        insn(LD_W_ABS, 0, 0, ARCH_OFFSET),
        // Another architecture: on to `prog` (3 further), which kills.
        insn(JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
        insn(LD_W_ABS, 0, 0, NR_OFFSET),
        insn(JEQ_K, 0, 1, libc::SYS_clone3 as u32),
        insn(RET_K, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
    ];
    out.extend(prog);
    out
}

/// The compiled filter of `kind`: `clone3` fails with `ENOSYS`, the calls
/// in its list are allowed, anything else kills the process (or is logged).
pub fn filter(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram, seccompiler::Error> {
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::KillProcess,
    };
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(seccompiler::Error::Backend)?;
    let f = SeccompFilter::new(rules(kind), mismatch, SeccompAction::Allow, arch)
        .map_err(seccompiler::Error::Backend)?;
    f.try_into()
        .map(with_clone3_enosys)
        .map_err(seccompiler::Error::Backend)
}

/// The program a thread of `kind` installs, compiled once per kind and
/// mode: a device worker started for each hot-plugged device then only
/// installs it, without building the filter again (time, and the stack and
/// heap the compiler touches).
type Compiled = Arc<BpfProgram>;

fn compiled(kind: ThreadKind, mode: SeccompMode) -> Result<Compiled, seccompiler::Error> {
    static CACHE: Mutex<Vec<(ThreadKind, SeccompMode, Compiled)>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, _, prog)) = cache.iter().find(|(k, m, _)| *k == kind && *m == mode) {
        return Ok(Arc::clone(prog));
    }
    let prog: Compiled = Arc::new(filter(kind, mode)?);
    cache.push((kind, mode, Arc::clone(&prog)));
    Ok(prog)
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
    let prog = match compiled(kind, mode) {
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
