//! Confinement of the `arbor` process: which host files it may open, and
//! which privileges it keeps.
//!
//! Two walls keep an API client from making the VMM open an arbitrary host
//! file (`/etc/shadow`, a block device) and hand it to the guest:
//!
//! 1. [`PathPolicy`]: the VMM itself checks every path a client names
//!    (`vm.add-disk`) before opening it. The path is made canonical
//!    (symbolic links and `..` resolved) and must lie under one of the
//!    `--allow-path` directories or be a file the command line names (a
//!    `--disk` image, the kernel, the initramfs). Anything else is refused
//!    with a message naming the path and `--allow-path`.
//! 2. Landlock ([`restrict`]): the kernel refuses any `open` outside the
//!    files and directories the configuration names, whatever the VMM's
//!    own code does (a bug in the first wall, a compromised thread).
//!
//! Besides Landlock, [`apply`] sets `PR_SET_NO_NEW_PRIVS` (no `execve` can
//! give the process privileges back) and drops every capability but
//! `CAP_DAC_OVERRIDE` from all the capability sets, the bounding set
//! included: after `/dev/kvm` is open a VMM needs no privilege, except that
//! a root VMM asked to open an image owned by another user with a
//! restrictive mode (or a root-owned `0400` image read-write) needs
//! `CAP_DAC_OVERRIDE`. Which files it may open is Landlock's job, not the
//! file modes'.
//!
//! Landlock, no-new-privs and capabilities are all per thread: a thread
//! keeps what it had when it was created. [`apply`] therefore runs in
//! `main` before any other thread exists but the API thread (it refuses to
//! run otherwise), and every thread the VMM starts later (vCPUs, device
//! workers, the signal thread) inherits the confinement.
//!
//! The API thread starts first, so that the socket answers while `main`
//! is still confining the process and building the VM, and it confines
//! itself before it serves ([`api_thread_start`]): the same no-new-privs
//! and capability drop, its seccomp filter, and a Landlock domain of its
//! own that is narrower than the process's: it opens no file, and may
//! only list `/proc` (its descriptor count) and remove its socket. The
//! threads share one address space, so what any thread may do is what
//! the process may do; the API thread adds nothing to it.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use crate::config::{ConfigError, SerialOutput, VmConfig};

/// Environment variable for tests only: `skip-path-check` turns the VMM's
/// own path check off (Landlock stays), so a test can show that Landlock
/// alone refuses a path. Only the process environment can set it; no API
/// request or command-line option can.
pub const SELFTEST_ENV: &str = "ARBOR_CONFINE_SELFTEST";

/// What `--landlock` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LandlockMode {
    /// Confine when the kernel supports Landlock; without it, log a
    /// warning and go on (the VMM's own path check still applies).
    #[default]
    On,
    /// Confine, or refuse to start when the kernel cannot.
    Require,
    /// Do not confine (debugging).
    Off,
}

/// The process protections `arbor` applies before it creates the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// `--landlock=on|require|off`.
    pub landlock: LandlockMode,
    /// `--no-new-privs=on|off`.
    pub no_new_privs: bool,
    /// `--capabilities=drop|keep`.
    pub drop_capabilities: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            landlock: LandlockMode::On,
            no_new_privs: true,
            drop_capabilities: true,
        }
    }
}

/// Parses `--landlock`.
pub fn parse_landlock(value: &str) -> Result<LandlockMode, ConfigError> {
    match value {
        "on" => Ok(LandlockMode::On),
        "require" => Ok(LandlockMode::Require),
        "off" => Ok(LandlockMode::Off),
        _ => Err(ConfigError(format!(
            "--landlock '{value}': expected on, require or off"
        ))),
    }
}

/// Parses an `on|off` switch.
pub fn parse_on_off(flag: &str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(ConfigError(format!("{flag} '{value}': expected on or off"))),
    }
}

/// Parses `--capabilities`: true when they are to be dropped.
pub fn parse_capabilities(value: &str) -> Result<bool, ConfigError> {
    match value {
        "drop" => Ok(true),
        "keep" => Ok(false),
        _ => Err(ConfigError(format!(
            "--capabilities '{value}': expected drop or keep"
        ))),
    }
}

/// A path a client named that the VMM refuses to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRefused {
    /// The path as the client gave it.
    pub path: String,
    /// The canonical path, when it could be resolved and differs.
    pub resolved: Option<PathBuf>,
}

impl fmt::Display for PathRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "path '{}' ", self.path)?;
        if let Some(r) = &self.resolved {
            write!(f, "(which resolves to '{}') ", r.display())?;
        }
        f.write_str(
            "is outside the directories this VMM may use: start arbor with \
             --allow-path DIR naming a directory that holds it",
        )
    }
}

impl std::error::Error for PathRefused {}

/// Which paths a client may name: the files the configuration names and
/// the `--allow-path` directories, all canonical.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PathPolicy {
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

/// `path` made absolute and lexically normal (`.` and `..` folded), for a
/// path that cannot be resolved on the file system.
fn lexical(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Some(out)
}

impl PathPolicy {
    /// A policy from canonical `files` and `dirs` (no file system access).
    pub fn from_canonical(files: Vec<PathBuf>, dirs: Vec<PathBuf>) -> Self {
        PathPolicy { files, dirs }
    }

    /// The policy for `cfg`: its disks, kernel, initramfs and console file as files and
    /// its `--allow-path` directories, resolved from the VMM's working
    /// directory. Names that cannot be resolved are left out (they cannot
    /// be opened either).
    pub fn for_config(cfg: &VmConfig, dirs: &[PathBuf]) -> Self {
        let files = cfg
            .disks
            .iter()
            .map(|d| PathBuf::from(&d.path))
            .chain(cfg.user_devices.iter().map(|u| PathBuf::from(&u.socket)))
            .chain(std::iter::once(cfg.kernel.clone()))
            .chain(cfg.initramfs.iter().cloned())
            // The vsock socket's directory (the socket itself is created later).
            .chain(
                cfg.vsock
                    .iter()
                    .map(|v| PathBuf::from(crate::config::vsock_dir(&v.socket))),
            )
            .filter(|p| !p.as_os_str().is_empty())
            .filter_map(|p| std::fs::canonicalize(p).ok())
            // The console file may not exist yet: its path as written.
            .chain(match &cfg.serial {
                crate::SerialOutput::File { path, .. } => {
                    std::fs::canonicalize(path).ok().or_else(|| lexical(path))
                }
                _ => None,
            })
            .collect();
        let dirs = dirs
            .iter()
            .filter_map(|d| std::fs::canonicalize(d).ok())
            .collect();
        PathPolicy { files, dirs }
    }

    /// The allowed directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Whether the canonical path `p` is allowed: equal to a named file or
    /// under (or equal to) an allowed directory, compared component by
    /// component (`/srv/img` does not allow `/srv/images`). Pure.
    pub fn allows(&self, p: &Path) -> bool {
        self.files.iter().any(|f| f == p) || self.dirs.iter().any(|d| p.starts_with(d))
    }

    /// Checks a path a client named; returns the canonical path to open.
    /// A path that cannot be resolved (it does not exist, say) is refused
    /// the same way unless it lies lexically under an allowed directory,
    /// so a client cannot probe which files exist elsewhere; then the
    /// error of resolving it is returned as `Ok(Err(..))`.
    pub fn check(&self, path: &str) -> Result<std::io::Result<PathBuf>, PathRefused> {
        let refused = |resolved: Option<PathBuf>| PathRefused {
            path: path.to_string(),
            resolved,
        };
        match std::fs::canonicalize(path) {
            Ok(c) if self.allows(&c) => Ok(Ok(c)),
            Ok(c) => {
                let differs = c.as_path() != Path::new(path);
                Err(refused(differs.then_some(c)))
            }
            Err(e) => match lexical(Path::new(path)) {
                Some(l) if self.allows(&l) => Ok(Err(e)),
                _ => Err(refused(None)),
            },
        }
    }
}

/// One Landlock rule: a path and what may be done beneath it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// A file (the rule covers it) or a directory (everything beneath).
    pub path: PathBuf,
    /// The rights granted.
    pub access: BitFlags<AccessFs>,
    /// Why (for the log and errors).
    pub what: &'static str,
}

/// What the process may do on the file system once confined, for `cfg`
/// and the KVM device at `kvm`. Paths that do not exist are left out (the
/// configuration check reports them). The access rights are:
///
/// - `/dev/kvm`: read, write, ioctl;
/// - each `--disk`: read and ioctl (block devices), write unless read-only;
/// - kernel, initramfs: read;
/// - `--serial file=PATH`: write (the file is created beforehand);
/// - each `--allow-path` directory: read, write and ioctl of files beneath
///   (hot-plugged disks), creating and removing UNIX sockets (a hot-plugged
///   vsock device's socket; Landlock's remove right is not limited to
///   sockets, so files beneath may be unlinked too); nothing else (no
///   regular file creation, no listing);
/// - the `--vsock` socket's directory: create a socket, remove a file;
/// - `/dev/net/tun`: read, write, ioctl (attaching to taps);
/// - the API socket's directory: create a socket, remove a file (the stale
///   socket replaced at start, the socket removed at exit);
/// - `/dev/vfio`: read, write, ioctl (kernel VFIO devices, cold or
///   hot-plugged; absent on hosts without kernel VFIO);
///   `/sys/devices`: read files, `/sys/kernel/iommu_groups`: list
///   directories (a function's class and its IOMMU group's members, for
///   the group rules);
/// - `/proc`: list directories (the API counts `/proc/self/fd`);
///   `/proc/meminfo`: read (the memory check);
///   `/sys/devices/system/cpu`: read (the C library's CPU count).
///
/// Everything else is refused, executing any file included.
pub fn landlock_rules(cfg: &VmConfig, kvm: &Path, allow_paths: &[PathBuf]) -> Vec<Rule> {
    let rd = AccessFs::ReadFile;
    let wr = AccessFs::WriteFile;
    let ioctl = AccessFs::IoctlDev;
    let mut rules = vec![Rule {
        path: kvm.to_path_buf(),
        access: rd | wr | ioctl,
        what: "KVM device",
    }];
    for d in &cfg.disks {
        let mut access = rd | ioctl;
        if !d.readonly {
            access |= wr;
        }
        rules.push(Rule {
            path: PathBuf::from(&d.path),
            access,
            what: "disk",
        });
    }
    rules.push(Rule {
        path: cfg.kernel.clone(),
        access: rd.into(),
        what: "kernel",
    });
    if let Some(i) = &cfg.initramfs {
        rules.push(Rule {
            path: i.clone(),
            access: rd.into(),
            what: "initramfs",
        });
    }
    if let SerialOutput::File { path, .. } = &cfg.serial {
        rules.push(Rule {
            path: path.clone(),
            access: wr.into(),
            what: "serial output",
        });
    }
    for d in allow_paths {
        rules.push(Rule {
            path: d.clone(),
            access: rd | wr | ioctl | AccessFs::MakeSock | AccessFs::RemoveFile,
            what: "--allow-path directory",
        });
    }
    if let Some(v) = &cfg.vsock {
        rules.push(Rule {
            path: PathBuf::from(crate::config::vsock_dir(&v.socket)),
            access: AccessFs::MakeSock | AccessFs::RemoveFile,
            what: "vsock socket directory",
        });
    }
    if let Some(sock) = &cfg.api_socket {
        rules.push(Rule {
            path: crate::config::socket_dir(sock),
            access: AccessFs::MakeSock | AccessFs::RemoveFile,
            what: "API socket directory",
        });
    }
    // virtio-net attaches to taps through the clone device, cold or
    // hot-plugged (`vm.add-net tap=NAME`).
    rules.push(Rule {
        path: "/dev/net/tun".into(),
        access: rd | wr | ioctl,
        what: "tap clone device",
    });
    // Kernel VFIO (`--device`, `vm.add-device`): the container and group
    // devices, and what the IOMMU group rules read in sysfs.
    rules.push(Rule {
        path: "/dev/vfio".into(),
        access: rd | wr | ioctl,
        what: "VFIO devices",
    });
    rules.push(Rule {
        path: "/sys/devices".into(),
        access: rd.into(),
        what: "PCI functions' class",
    });
    rules.push(Rule {
        path: "/sys/kernel/iommu_groups".into(),
        access: AccessFs::ReadDir.into(),
        what: "IOMMU groups",
    });
    rules.push(Rule {
        path: "/proc".into(),
        access: AccessFs::ReadDir.into(),
        what: "process information",
    });
    rules.push(Rule {
        path: "/proc/meminfo".into(),
        access: rd.into(),
        what: "host memory size",
    });
    rules.push(Rule {
        path: "/sys/devices/system/cpu".into(),
        access: rd | AccessFs::ReadDir,
        what: "CPU list",
    });
    rules.retain(|r| !r.path.as_os_str().is_empty());
    rules
}

/// The Landlock ABI this code was written and tested against: file system
/// rights up to ABI 5 (ioctl on devices), TCP rights (ABI 4) and scopes
/// (ABI 6). Newer kernels enforce all of it; older ones what they know.
const TARGET_ABI: ABI = ABI::V6;

/// Whether the process ended up confined by Landlock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandlockOutcome {
    /// Every right asked for is enforced.
    Full,
    /// The kernel enforces only part (an older Landlock ABI).
    Partial,
    /// The kernel has no Landlock (or it is disabled).
    Unsupported,
    /// `--landlock=off`.
    Off,
}

/// A confinement failure: one sentence for the user.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("confinement must be applied before any other thread starts ({0} threads running)")]
    Threads(usize),
    #[error("Landlock: {0}")]
    Landlock(#[from] landlock::RulesetError),
    #[error("Landlock: cannot open {what} '{}' for a rule: {source}", path.display())]
    RulePath {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: landlock::PathFdError,
    },
    #[error(
        "--landlock=require: this kernel does not support Landlock (use --landlock=on to run \
         without it)"
    )]
    LandlockRequired,
    #[error("cannot set PR_SET_NO_NEW_PRIVS: {0}")]
    NoNewPrivs(#[source] std::io::Error),
    #[error("cannot drop capabilities: {0}")]
    Capabilities(#[from] caps::errors::CapsError),
    #[error("cannot create serial output '{}': {source}", path.display())]
    SerialFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Restricts the calling thread (and the threads it creates afterwards)
/// to `rules`. `no_new_privs` sets `PR_SET_NO_NEW_PRIVS` as well (without
/// it, restricting needs `CAP_SYS_ADMIN`). Does not check for other
/// threads: see [`apply`].
pub fn restrict(
    rules: &[Rule],
    no_new_privs: bool,
    mode: LandlockMode,
) -> Result<LandlockOutcome, ConfineError> {
    if mode == LandlockMode::Off {
        return Ok(LandlockOutcome::Off);
    }
    let mut created = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(TARGET_ABI))?
        .handle_access(AccessNet::from_all(TARGET_ABI))?
        .scope(Scope::from_all(TARGET_ABI))?
        .create()?;
    for r in rules {
        let fd = match PathFd::new(&r.path) {
            Ok(fd) => fd,
            Err(e) => {
                // A missing file cannot be opened anyway; the configuration
                // check names it.
                log::debug!(
                    "Landlock: no rule for {} '{}': {e}",
                    r.what,
                    r.path.display()
                );
                continue;
            }
        };
        let is_dir = std::fs::metadata(&r.path).is_ok_and(|m| m.is_dir());
        let access = if is_dir {
            r.access
        } else {
            // Rights that only make sense on directories cannot be given
            // to a file.
            r.access & AccessFs::from_file(TARGET_ABI)
        };
        if access.is_empty() {
            continue;
        }
        created = created.add_rule(PathBeneath::new(fd, access))?;
    }
    let status = created.no_new_privs(no_new_privs).restrict_self()?;
    let outcome = match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockOutcome::Full,
        RulesetStatus::PartiallyEnforced => LandlockOutcome::Partial,
        RulesetStatus::NotEnforced => LandlockOutcome::Unsupported,
    };
    if outcome == LandlockOutcome::Unsupported && mode == LandlockMode::Require {
        return Err(ConfineError::LandlockRequired);
    }
    Ok(outcome)
}

/// Sets `PR_SET_NO_NEW_PRIVS` on the calling thread.
pub fn set_no_new_privs() -> Result<(), ConfineError> {
    // SAFETY: prctl(2) with PR_SET_NO_NEW_PRIVS takes integer arguments
    // only; the result is checked.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(ConfineError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The capabilities the VMM keeps (see the module documentation).
pub const KEPT_CAPABILITIES: &[caps::Capability] = &[caps::Capability::CAP_DAC_OVERRIDE];

/// Drops every capability but [`KEPT_CAPABILITIES`] from the calling
/// thread's bounding, ambient, inheritable, effective and permitted sets.
pub fn drop_capabilities() -> Result<(), ConfineError> {
    use caps::{CapSet, CapsHashSet};
    let permitted = caps::read(None, CapSet::Permitted)?;
    let keep: CapsHashSet = KEPT_CAPABILITIES
        .iter()
        .copied()
        .filter(|c| permitted.contains(c))
        .collect();
    // The bounding set needs CAP_SETPCAP, so it goes first. Each drop is
    // tried without reading the set first (dropping an absent capability
    // succeeds): one call per capability, not two. A capability this
    // kernel does not know fails both the drop and the read.
    if caps::has_cap(None, CapSet::Effective, caps::Capability::CAP_SETPCAP)? {
        for c in caps::all() {
            if KEPT_CAPABILITIES.contains(&c) {
                continue;
            }
            if let Err(e) = caps::drop(None, CapSet::Bounding, c) {
                if caps::has_cap(None, CapSet::Bounding, c).is_ok() {
                    return Err(e.into());
                }
            }
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    caps::set(None, CapSet::Effective, &keep)?;
    caps::set(None, CapSet::Permitted, &keep)?;
    Ok(())
}

/// What the API thread applies to itself, set by `main` before it starts
/// the API server; none until then (an embedder's API thread is not
/// confined by this module).
static API_THREAD: std::sync::OnceLock<Options> = std::sync::OnceLock::new();

/// Sets what API threads started from now on apply to themselves (see
/// [`api_thread_start`]). Only the first call has an effect.
pub fn set_api_thread_options(opts: Options) {
    let _ = API_THREAD.set(opts);
}

/// The Landlock rules of the API thread, which opens no file: it lists
/// `/proc/self/fd` (its descriptor budget) and removes its socket when it
/// stops.
pub fn api_thread_rules(socket: &Path) -> Vec<Rule> {
    vec![
        Rule {
            path: "/proc".into(),
            access: AccessFs::ReadDir.into(),
            what: "descriptor count",
        },
        Rule {
            path: crate::config::socket_dir(socket),
            access: AccessFs::RemoveFile.into(),
            what: "API socket directory",
        },
    ]
}

/// Confines the calling thread as the API thread, with its socket at
/// `socket`: Landlock with [`api_thread_rules`], no-new-privs and the
/// capability drop, as `opts` asks.
pub fn confine_api_thread(opts: &Options, socket: &Path) -> Result<LandlockOutcome, ConfineError> {
    confine_thread(&api_thread_rules(socket), opts)
}

/// Confines the calling thread (and the threads it creates afterwards):
/// Landlock with `rules`, `PR_SET_NO_NEW_PRIVS` and the capability drop,
/// as `opts` asks. Does not check for other threads.
fn confine_thread(rules: &[Rule], opts: &Options) -> Result<LandlockOutcome, ConfineError> {
    let landlock = restrict(rules, opts.no_new_privs, opts.landlock)?;
    // Landlock's restrict_self sets it already when it runs; this covers
    // --landlock=off and kernels without Landlock.
    if opts.no_new_privs {
        set_no_new_privs()?;
    }
    if opts.drop_capabilities {
        drop_capabilities()?;
    }
    Ok(landlock)
}

/// The API thread's hook (`api::set_thread_hook`): confines the thread
/// (as [`set_api_thread_options`] said, if it was called), then installs
/// its seccomp filter. An error ends the thread before it serves.
pub fn api_thread_start(socket: &Path) -> Result<(), String> {
    if let Some(opts) = API_THREAD.get() {
        confine_api_thread(opts, socket).map_err(|e| format!("the API thread: {e}"))?;
    }
    crate::seccomp::install(crate::seccomp::ThreadKind::Api);
    Ok(())
}

/// Threads of this process, from `/proc/self/task`.
fn thread_count() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/task").ok()?.count())
}

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub landlock: LandlockOutcome,
    pub no_new_privs: bool,
    pub capabilities_dropped: bool,
}

/// Confines the process for `cfg`, with the KVM device at `kvm`: creates
/// the serial output file if it is missing (it could not be created
/// afterwards), then Landlock, `PR_SET_NO_NEW_PRIVS` and the capability
/// drop as `cfg.confine` asks. Must run before any other thread exists but
/// `confined` threads that confined themselves (the API thread); refuses
/// otherwise, unless all three are off (then it does nothing).
/// Logs what it did; where the kernel lacks Landlock and the mode is `on`,
/// logs a warning and goes on.
pub fn apply(cfg: &VmConfig, kvm: &Path, confined: usize) -> Result<Applied, ConfineError> {
    let opts = &cfg.confine;
    if opts.landlock == LandlockMode::Off && !opts.no_new_privs && !opts.drop_capabilities {
        // Nothing applies to the whole process, so other threads (a
        // profiler's, say heaptrack's) are no reason to refuse.
        log::warn!("Landlock: off (--landlock=off)");
        return Ok(Applied {
            landlock: LandlockOutcome::Off,
            no_new_privs: false,
            capabilities_dropped: false,
        });
    }
    match thread_count() {
        Some(n) if n > 1 + confined => return Err(ConfineError::Threads(n)),
        _ => {}
    }
    if let SerialOutput::File { path, .. } = &cfg.serial {
        if opts.landlock != LandlockMode::Off {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| ConfineError::SerialFile {
                    path: path.clone(),
                    source,
                })?;
        }
    }
    let mut rules = landlock_rules(cfg, kvm, &cfg.allow_paths);
    if let Ok(exe) = std::env::current_exe() {
        // A panic's backtrace reads the executable's symbols.
        rules.push(Rule {
            path: exe,
            access: AccessFs::ReadFile.into(),
            what: "arbor executable",
        });
    }
    let landlock = confine_thread(&rules, opts)?;
    match landlock {
        LandlockOutcome::Full => log::info!("Landlock: confined to {} paths", rules.len()),
        LandlockOutcome::Partial => log::warn!(
            "Landlock: this kernel enforces only part of the file system confinement \
             (an older Landlock ABI)"
        ),
        LandlockOutcome::Unsupported => log::warn!(
            "Landlock: not supported by this kernel; only the VMM's own path check \
             confines which files API clients may name (--landlock=require refuses to \
             start instead)"
        ),
        LandlockOutcome::Off => log::warn!("Landlock: off (--landlock=off)"),
    }
    Ok(Applied {
        landlock,
        no_new_privs: opts.no_new_privs,
        capabilities_dropped: opts.drop_capabilities,
    })
}

/// Whether the test hook [`SELFTEST_ENV`] asks to skip the VMM's own path
/// check.
pub fn selftest_skips_path_check() -> bool {
    std::env::var(SELFTEST_ENV).is_ok_and(|v| v == "skip-path-check")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("arbor-confine-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::canonicalize(&d).unwrap()
    }

    #[test]
    fn allows_is_by_component() {
        let p = PathPolicy::from_canonical(
            vec!["/srv/boot/vmlinux".into()],
            vec!["/srv/img".into(), "/data".into()],
        );
        assert!(p.allows(Path::new("/srv/img/a.img")));
        assert!(p.allows(Path::new("/srv/img/sub/dir/b.img")));
        assert!(p.allows(Path::new("/data")));
        assert!(p.allows(Path::new("/srv/boot/vmlinux")));
        assert!(!p.allows(Path::new("/srv/images/a.img")));
        assert!(!p.allows(Path::new("/srv/im")));
        assert!(!p.allows(Path::new("/srv/boot/vmlinux2")));
        assert!(!p.allows(Path::new("/srv/boot")));
        assert!(!p.allows(Path::new("/etc/shadow")));
        assert!(!p.allows(Path::new("/")));
        let none = PathPolicy::default();
        assert!(!none.allows(Path::new("/srv/img/a.img")));
        let root = PathPolicy::from_canonical(vec![], vec!["/".into()]);
        assert!(root.allows(Path::new("/etc/shadow")));
    }

    #[test]
    fn lexical_folds_dots() {
        assert_eq!(lexical(Path::new("/a/./b/../c")), Some("/a/c".into()));
        assert_eq!(lexical(Path::new("/../../etc")), Some("/etc".into()));
        assert_eq!(lexical(Path::new("rel/x")), None);
    }

    #[test]
    fn check_resolves_links_and_dots() {
        let base = scratch("check");
        let allowed = base.join("allowed");
        let outside = base.join("outside");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(allowed.join("in.img"), [0u8; 512]).unwrap();
        std::fs::write(outside.join("out.img"), [0u8; 512]).unwrap();
        symlink(outside.join("out.img"), allowed.join("link.img")).unwrap();
        symlink(allowed.join("in.img"), outside.join("link-in.img")).unwrap();
        let p = PathPolicy::from_canonical(vec![], vec![allowed.clone()]);
        let s = |p: PathBuf| p.display().to_string();

        let ok = p.check(&s(allowed.join("in.img"))).unwrap().unwrap();
        assert_eq!(ok, allowed.join("in.img"));
        // A link from outside into the allowed directory is fine: what is
        // opened is the canonical path.
        let ok = p.check(&s(outside.join("link-in.img"))).unwrap().unwrap();
        assert_eq!(ok, allowed.join("in.img"));
        // Out through a link or through "..".
        let e = p.check(&s(allowed.join("link.img"))).unwrap_err();
        assert_eq!(e.resolved, Some(outside.join("out.img")));
        let msg = e.to_string();
        assert!(
            msg.contains("link.img") && msg.contains("--allow-path"),
            "{msg}"
        );
        let dotted = format!("{}/../outside/out.img", allowed.display());
        assert!(p.check(&dotted).is_err());
        assert!(p.check("/etc/shadow").is_err());
        // Missing: under the directory the error is the open error,
        // elsewhere the same refusal as for an existing file.
        let missing = p.check(&s(allowed.join("missing.img"))).unwrap();
        assert_eq!(missing.unwrap_err().kind(), std::io::ErrorKind::NotFound);
        let e = p.check(&s(outside.join("missing.img"))).unwrap_err();
        assert_eq!(e.resolved, None);
        // A named file, and nothing next to it.
        let named = PathPolicy::from_canonical(vec![outside.join("out.img")], vec![]);
        assert!(named.check(&s(outside.join("out.img"))).is_ok());
        assert!(named.check(&s(outside.join("link-in.img"))).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn policy_for_config_resolves_named_files() {
        let base = scratch("policy");
        let k = base.join("vmlinux");
        std::fs::write(&k, b"k").unwrap();
        let disk = base.join("d.img");
        std::fs::write(&disk, [0u8; 512]).unwrap();
        let dir = base.join("hot");
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = VmConfig {
            kernel: k.clone(),
            disks: vec![api::types::DiskConfig {
                path: disk.display().to_string(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let p = PathPolicy::for_config(&cfg, &[dir.join("."), base.join("missing")]);
        assert!(p.allows(&k));
        assert!(p.allows(&disk));
        assert!(p.allows(&dir.join("x.img")));
        assert!(!p.allows(&base.join("other.img")));
        assert_eq!(p.dirs(), std::slice::from_ref(&dir));
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn rules_follow_the_config() {
        let cfg = VmConfig {
            kernel: "/k".into(),
            initramfs: Some("/i".into()),
            serial: SerialOutput::file("/log/console"),
            api_socket: Some("/run/arbor/api.sock".into()),
            disks: vec![
                api::types::DiskConfig {
                    path: "/img/rw.img".into(),
                    ..Default::default()
                },
                api::types::DiskConfig {
                    path: "/img/ro.img".into(),
                    readonly: true,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let rules = landlock_rules(&cfg, Path::new("/dev/kvm"), &["/hot".into()]);
        let get = |p: &str| {
            rules
                .iter()
                .find(|r| r.path == Path::new(p))
                .map(|r| r.access)
                .unwrap_or_else(|| panic!("no rule for {p}: {rules:?}"))
        };
        let rw = AccessFs::ReadFile | AccessFs::WriteFile;
        assert_eq!(get("/dev/kvm"), rw | AccessFs::IoctlDev);
        assert_eq!(get("/img/rw.img"), rw | AccessFs::IoctlDev);
        assert_eq!(get("/img/ro.img"), AccessFs::ReadFile | AccessFs::IoctlDev);
        assert_eq!(get("/k"), AccessFs::ReadFile);
        assert_eq!(get("/i"), AccessFs::ReadFile);
        assert_eq!(get("/log/console"), AccessFs::WriteFile);
        assert_eq!(
            get("/hot"),
            rw | AccessFs::IoctlDev | AccessFs::MakeSock | AccessFs::RemoveFile
        );
        assert_eq!(get("/run/arbor"), AccessFs::MakeSock | AccessFs::RemoveFile);
        assert_eq!(get("/dev/vfio"), rw | AccessFs::IoctlDev);
        assert_eq!(get("/sys/devices"), AccessFs::ReadFile);
        assert_eq!(get("/sys/kernel/iommu_groups"), AccessFs::ReadDir);
        // Nothing executable, nothing creatable but the socket.
        for r in &rules {
            assert!(!r.access.contains(AccessFs::Execute), "{r:?}");
            assert!(!r.access.contains(AccessFs::MakeReg), "{r:?}");
        }
        let rel = VmConfig {
            api_socket: Some("api.sock".into()),
            ..cfg
        };
        let rules = landlock_rules(&rel, Path::new("/dev/kvm"), &[]);
        assert!(rules.iter().any(|r| r.path == Path::new(".")));
    }

    /// A test runs on a thread of the harness: with two threads or more,
    /// `apply` refuses before it changes anything (a thread started
    /// earlier would escape the confinement).
    #[test]
    fn apply_refuses_when_other_threads_exist() {
        let cfg = VmConfig::default();
        match apply(&cfg, Path::new("/dev/kvm"), 0) {
            Err(ConfineError::Threads(n)) => assert!(n >= 2),
            other => panic!("{other:?}"),
        }
        // Nothing was changed: this thread may still read anything.
        assert!(std::fs::read_dir("/").is_ok());
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        assert!(status.contains("NoNewPrivs:\t0"), "{status}");
    }

    /// With every step off there is nothing to apply to the process, and
    /// other threads do not matter.
    #[test]
    fn apply_with_everything_off_ignores_other_threads() {
        let mut cfg = VmConfig::default();
        cfg.confine.landlock = LandlockMode::Off;
        cfg.confine.no_new_privs = false;
        cfg.confine.drop_capabilities = false;
        let a = apply(&cfg, Path::new("/dev/kvm"), 0).unwrap();
        assert_eq!(a.landlock, LandlockOutcome::Off);
        assert!(!a.no_new_privs && !a.capabilities_dropped);
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        assert!(status.contains("NoNewPrivs:\t0"), "{status}");
    }

    #[test]
    fn options_parse() {
        assert_eq!(parse_landlock("on").unwrap(), LandlockMode::On);
        assert_eq!(parse_landlock("require").unwrap(), LandlockMode::Require);
        assert_eq!(parse_landlock("off").unwrap(), LandlockMode::Off);
        assert!(parse_landlock("yes").is_err());
        assert!(parse_on_off("--no-new-privs", "on").unwrap());
        assert!(!parse_on_off("--no-new-privs", "off").unwrap());
        assert!(parse_on_off("--no-new-privs", "1").is_err());
        assert!(parse_capabilities("drop").unwrap());
        assert!(!parse_capabilities("keep").unwrap());
        assert!(parse_capabilities("none").is_err());
    }

    /// Landlock applies to the thread that restricts itself and to the
    /// threads it starts afterwards. Done on a thread of its own, so the
    /// other tests are not confined. Opening the way the device does
    /// (`open_disk`), with no path check in front: only Landlock refuses.
    #[test]
    fn landlock_refuses_outside_paths_in_every_later_thread() {
        let base = scratch("landlock");
        let allowed = base.join("allowed");
        let outside = base.join("outside");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(allowed.join("in.img"), [0u8; 512]).unwrap();
        std::fs::write(outside.join("out.img"), [0u8; 512]).unwrap();
        let cfg = VmConfig {
            kernel: base.join("no-kernel"),
            ..Default::default()
        };
        let rules = landlock_rules(&cfg, Path::new("/dev/kvm"), std::slice::from_ref(&allowed));
        let (a, o) = (allowed.join("in.img"), outside.join("out.img"));
        let result = std::thread::spawn(move || {
            let outcome = restrict(&rules, true, LandlockMode::On).unwrap();
            // A thread started after the restriction, as the VMM's are.
            std::thread::spawn(move || {
                let open = |p: &Path, ro: bool| {
                    devices::virtio::block::open_disk(p, ro)
                        .map(|_| ())
                        .map_err(|e| e.raw_os_error())
                };
                // What the VMM reads after confinement still reads.
                let fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count());
                let mem = std::fs::read_to_string("/proc/meminfo").map(|s| s.len());
                let cpus = std::fs::read_to_string("/sys/devices/system/cpu/online");
                let host = crate::config::host_memory();
                assert!(fds.as_ref().is_ok_and(|n| *n > 0), "/proc/self/fd: {fds:?}");
                assert!(mem.as_ref().is_ok_and(|n| *n > 0), "/proc/meminfo: {mem:?}");
                assert!(cpus.is_ok(), "cpu/online: {cpus:?}");
                assert!(host.is_some());
                // And what it does not need is refused (where Landlock is).
                let etc = std::fs::read_to_string("/etc/hostname").map_err(|e| e.raw_os_error());
                (
                    outcome,
                    open(&a, false),
                    open(&o, true),
                    open(&o, false),
                    etc,
                )
            })
            .join()
            .unwrap()
        })
        .join()
        .unwrap();
        match result.0 {
            LandlockOutcome::Unsupported => {
                eprintln!("SKIPPED: this kernel has no Landlock");
            }
            _ => {
                assert_eq!(result.1, Ok(()), "inside the allowed directory");
                assert_eq!(result.2, Err(Some(libc::EACCES)), "outside, read-only");
                assert_eq!(result.3, Err(Some(libc::EACCES)), "outside, read-write");
                if Path::new("/etc/hostname").exists() {
                    assert_eq!(result.4, Err(Some(libc::EACCES)), "/etc/hostname");
                }
            }
        }
        // This thread was never confined.
        assert!(devices::virtio::block::open_disk(&outside.join("out.img"), true).is_ok());
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// The API thread's own domain: it lists `/proc/self/fd` and removes a
    /// file in its socket's directory, and opens nothing (not even under
    /// its socket's directory or `/proc`). No-new-privs and the capability
    /// drop come with it; the caller's thread stays as it was.
    #[test]
    fn api_thread_confines_itself_to_its_socket_and_descriptor_count() {
        let base = scratch("api-thread");
        std::fs::create_dir_all(&base).unwrap();
        let socket = base.join("api.sock");
        std::fs::write(&socket, b"").unwrap();
        std::fs::write(base.join("other"), b"x").unwrap();
        let opts = Options {
            landlock: LandlockMode::On,
            no_new_privs: true,
            drop_capabilities: false,
        };
        let (s, b) = (socket.clone(), base.clone());
        let (outcome, fds, read_here, read_proc, removed, nnp) = std::thread::spawn(move || {
            let outcome = confine_api_thread(&opts, &s).unwrap();
            let fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count());
            let err = |r: std::io::Result<String>| r.map(|_| ()).map_err(|e| e.raw_os_error());
            let read_here = err(std::fs::read_to_string(b.join("other")));
            let read_proc = err(std::fs::read_to_string("/proc/self/status"));
            let removed = std::fs::remove_file(&s).map_err(|e| e.raw_os_error());
            // SAFETY: PR_GET_NO_NEW_PRIVS takes no pointer.
            let nnp = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
            (outcome, fds, read_here, read_proc, removed, nnp)
        })
        .join()
        .unwrap();
        assert!(fds.as_ref().is_ok_and(|n| *n > 0), "/proc/self/fd: {fds:?}");
        assert_eq!(removed, Ok(()), "its socket");
        assert_eq!(nnp, 1);
        if outcome == LandlockOutcome::Unsupported {
            eprintln!("SKIPPED: this kernel has no Landlock");
        } else {
            assert_eq!(read_here, Err(Some(libc::EACCES)), "a file by its socket");
            assert_eq!(read_proc, Err(Some(libc::EACCES)), "a file in /proc");
        }
        // This thread was never confined.
        assert!(std::fs::read_to_string(base.join("other")).is_ok());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
