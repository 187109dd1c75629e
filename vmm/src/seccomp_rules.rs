//! The seccomp allow lists of Arbor's threads, as data, and their
//! compilation to BPF.
//!
//! This file is shared: the `vmm` library includes it as
//! `seccomp::rules`, and `vmm/build.rs` includes it to compile every
//! thread kind's program when Arbor is built, so that a starting thread
//! only installs a program (`seccomp::install`). It uses only `std`,
//! `libc` and `seccompiler`. The programs are for x86_64 (the
//! `AUDIT_ARCH_X86_64` prefix below, and the build script refuses other
//! targets).

use seccompiler::{sock_filter, BpfProgram};

/// The calls `kind` may make without conditions, each once (programs test
/// them in ascending order, see [`runs`]). `clone` is not among them: [`CLONE_THREAD`]
/// decides.
pub fn allowed(kind: ThreadKind) -> Vec<i64> {
    let mut out: Vec<i64> = Vec::new();
    for nr in BASE.iter().copied().chain(extra_rules(kind)) {
        if nr != libc::SYS_clone && !out.contains(&nr) {
            out.push(nr);
        }
    }
    out
}

/// `clone` is allowed only with this flag in its first argument: new
/// threads, never new processes.
pub const CLONE_THREAD: u64 = libc::CLONE_THREAD as u64;

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

/// Calls allowed to every thread.
const BASE: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_futex,
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
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
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

/// `AUDIT_ARCH_X86_64` (`linux/audit.h`): the `arch` field of `seccomp_data`
/// for 64-bit x86 system calls.
pub const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;

const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGT_K: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;
const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
/// Offsets in `struct seccomp_data`: the call's number, the architecture
/// and the low word of the first argument (x86_64 is little-endian).
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;
const ARG0_LOW_OFFSET: u32 = 16;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// What a program returns for a call outside the list: the process is
/// killed, or (`log`) the kernel logs the call and allows it.
pub fn mismatch_action(log: bool) -> u32 {
    if log {
        libc::SECCOMP_RET_LOG
    } else {
        libc::SECCOMP_RET_KILL_PROCESS
    }
}

/// Why a program cannot be built.
#[derive(Debug)]
pub struct TooLong(pub usize);

impl std::fmt::Display for TooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} calls: a BPF jump reaches 255 instructions at most",
            self.0
        )
    }
}

/// The allowed call numbers of `kind` as ascending runs of consecutive
/// numbers, `(first, last)`.
pub fn runs(kind: ThreadKind) -> Vec<(u32, u32)> {
    let mut nrs: Vec<u32> = allowed(kind).into_iter().map(|nr| nr as u32).collect();
    nrs.sort_unstable();
    let mut out: Vec<(u32, u32)> = Vec::new();
    for nr in nrs {
        match out.last_mut() {
            Some((_, last)) if nr == *last + 1 => *last = nr,
            _ => out.push((nr, nr)),
        }
    }
    out
}

/// The program a thread of `kind` installs: a call from another
/// architecture kills the process; `clone3` fails with `ENOSYS`; the calls
/// of [`allowed`] are allowed; `clone` is allowed with [`CLONE_THREAD`];
/// anything else gets [`mismatch_action`]`(log)`.
///
/// The allowed calls are tested in ascending order by [`runs`]: one
/// instruction for a lone call (equal: allow), two for a run of
/// consecutive ones (above its last: next run; else at or above its
/// first: allow; else no later run can hold it). The lists hold 63-90
/// calls in 33-45 runs, so the tests take 40-59 instructions, where
/// `seccompiler` emits five per call: the kernel's cost of installing a
/// program grows with its length (about 2 us per instruction on the
/// machines the benchmarks ran on), and every thread installs one as it
/// starts. `oracle::reference` (tests only) is the same policy compiled by
/// `seccompiler`; a test runs both on every call number and checks they
/// agree.
pub fn compact(kind: ThreadKind, log: bool) -> Result<BpfProgram, TooLong> {
    let runs = runs(kind);
    let tests: usize = runs.iter().map(|(a, b)| if a == b { 1 } else { 2 }).sum();
    let header = [
        insn(LD_W_ABS, 0, 0, ARCH_OFFSET),
        insn(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        insn(RET_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        insn(LD_W_ABS, 0, 0, NR_OFFSET),
        insn(JEQ_K, 0, 1, libc::SYS_clone3 as u32),
        insn(RET_K, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
    ];
    // After the tests: the clone test (3 instructions), then the mismatch
    // return, then ALLOW.
    let clone_test = header.len() + tests;
    let allow = clone_test + 4;
    // A jump offset is a u8 counted from the next instruction.
    let offset = |from: usize, to: usize| u8::try_from(to - from - 1);
    let too_long = |_| TooLong(allowed(kind).len());
    let mut prog = header.to_vec();
    for (first, last) in runs {
        let at = prog.len();
        if first == last {
            prog.push(insn(JEQ_K, offset(at, allow).map_err(too_long)?, 0, first));
        } else {
            prog.push(insn(JGT_K, 1, 0, last));
            let to_allow = offset(at + 1, allow).map_err(too_long)?;
            let to_clone = offset(at + 1, clone_test).map_err(too_long)?;
            prog.push(insn(JGE_K, to_allow, to_clone, first));
        }
    }
    prog.extend([
        insn(JEQ_K, 0, 2, libc::SYS_clone as u32),
        insn(LD_W_ABS, 0, 0, ARG0_LOW_OFFSET),
        insn(JSET_K, 1, 0, CLONE_THREAD as u32),
        insn(RET_K, 0, 0, mismatch_action(log)),
        insn(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]);
    Ok(prog)
}

/// The same lists compiled by `seccompiler`: what the tests check the
/// programs against. Not part of a build: threads install [`compact`]'s
/// programs, compiled by `vmm/build.rs`.
#[cfg(test)]
pub mod oracle {
    use std::collections::BTreeMap;

    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };

    use super::*;

    /// The allow list of `kind`, as `seccompiler` rules.
    ///
    /// `clone` is allowed only with `CLONE_THREAD` (new threads, never new
    /// processes). `clone3` passes its flags in memory a filter cannot read:
    /// the programs answer it `ENOSYS` before the list, and glibc's
    /// `pthread_create` then falls back to `clone`.
    pub fn rules(kind: ThreadKind) -> BTreeMap<i64, Vec<SeccompRule>> {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed(kind)
            .into_iter()
            .map(|nr| (nr, Vec::new()))
            .collect();
        if let Ok(cond) = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(CLONE_THREAD),
            CLONE_THREAD,
        ) {
            if let Ok(rule) = SeccompRule::new(vec![cond]) {
                rules.insert(libc::SYS_clone, vec![rule]);
            }
        }
        rules
    }

    /// The same policy as [`compact`], compiled by `seccompiler` (with the
    /// `clone3` prefix it cannot express): what a test checks [`compact`]
    /// against.
    pub fn reference(kind: ThreadKind, log: bool) -> Result<BpfProgram, seccompiler::Error> {
        let mismatch = if log {
            SeccompAction::Log
        } else {
            SeccompAction::KillProcess
        };
        let f = SeccompFilter::new(
            rules(kind),
            mismatch,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .map_err(seccompiler::Error::Backend)?;
        let prog: BpfProgram = f.try_into().map_err(seccompiler::Error::Backend)?;
        // Another architecture: on to `prog` (3 further), which kills.
        let mut out = vec![
            insn(LD_W_ABS, 0, 0, ARCH_OFFSET),
            insn(JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
            insn(LD_W_ABS, 0, 0, NR_OFFSET),
            insn(JEQ_K, 0, 1, libc::SYS_clone3 as u32),
            insn(RET_K, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        ];
        out.extend(prog);
        Ok(out)
    }
}
