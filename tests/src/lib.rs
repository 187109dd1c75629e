//! Helpers for Arbor's integration tests: find the `arbor` binary and the
//! guest kit, start a VM, and wait on lines of the guest's serial log; with
//! the kit's user-space initramfs, run shell commands in the guest
//! ([`Guest::run`]).
//!
//! Timeouts: guests on this project's development machines run under an
//! emulated KVM and need tens of seconds to boot; on hardware KVM they boot
//! in well under a second. Every wait is bounded by `ARBOR_TEST_TIMEOUT`
//! seconds (default 180), never by a fixed sleep.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Root of the repository.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Reads `text()` every `every` until it contains `needle` and returns
/// it; panics with what it read (named `what`) after [`timeout`].
fn poll_text(text: impl Fn() -> String, needle: &str, what: &str, every: Duration) -> String {
    let deadline = Instant::now() + timeout();
    loop {
        let t = text();
        if t.contains(needle) {
            return t;
        }
        assert!(Instant::now() < deadline, "{what} lacks {needle:?}:\n{t}");
        std::thread::sleep(every);
    }
}

/// The timeout for one wait, from `ARBOR_TEST_TIMEOUT` (seconds).
pub fn timeout() -> Duration {
    let secs = std::env::var("ARBOR_TEST_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    Duration::from_secs(secs)
}

/// The `arbor` binary: `ARBOR_BIN`, or the one built next to this test.
pub fn arbor_bin() -> PathBuf {
    if let Ok(p) = std::env::var("ARBOR_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/arbor
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let bin = dir.join("arbor");
    assert!(
        bin.exists(),
        "{} not found: build it first with `cargo build --workspace` (or set ARBOR_BIN)",
        bin.display()
    );
    bin
}

/// Whether this host can run guests at all. Tests that boot guests skip,
/// with a printed reason, only when `/dev/kvm` is missing.
pub fn kvm_available() -> bool {
    if Path::new("/dev/kvm").exists() {
        true
    } else {
        eprintln!("SKIPPED: /dev/kvm is not present on this host");
        false
    }
}

/// The guest kit's outputs (see resources/guest-kit/build.sh).
pub struct GuestKit {
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub initramfs: PathBuf,
    /// Busybox, `arbor-guest` and a shell on ttyS0 (may be missing: see
    /// [`user_initramfs`]).
    pub initramfs_user: PathBuf,
    pub cmdline: String,
}

/// The guest kit's directory: `ARBOR_GUEST_DIR` or `<repo>/target/guest`.
pub fn guest_dir() -> PathBuf {
    std::env::var("ARBOR_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target/guest"))
}

/// Finds the guest kit in [`guest_dir`].
pub fn guest_kit() -> GuestKit {
    let dir = guest_dir();
    let kit = GuestKit {
        vmlinux: dir.join("vmlinux"),
        bzimage: dir.join("bzImage"),
        initramfs: dir.join("initramfs.cpio"),
        initramfs_user: dir.join("initramfs-user.cpio"),
        cmdline: std::fs::read_to_string(dir.join("cmdline"))
            .unwrap_or_else(|e| {
                panic!(
                    "guest kit missing in {} ({e}): run resources/guest-kit/build.sh",
                    dir.display()
                )
            })
            .trim()
            .to_string(),
    };
    for p in [&kit.vmlinux, &kit.bzimage, &kit.initramfs] {
        assert!(
            p.exists(),
            "{} missing: run resources/guest-kit/build.sh",
            p.display()
        );
    }
    kit
}

#[derive(Default)]
struct Log {
    text: String,
    closed: bool,
}

/// The kit's user-space initramfs; panics with how to build it if missing.
pub fn user_initramfs() -> PathBuf {
    let p = guest_kit().initramfs_user;
    assert!(
        p.exists(),
        "{} missing: run resources/guest-kit/install-deps.sh (busybox-static), then build.sh",
        p.display()
    );
    p
}

/// A running `arbor` whose stdout (the guest console) is collected.
pub struct Guest {
    child: Child,
    log: Arc<(Mutex<Log>, Condvar)>,
    stderr: Arc<(Mutex<Log>, Condvar)>,
    started: Instant,
    name: String,
    /// The guest's serial input (user-space guests only).
    stdin: Mutex<Option<ChildStdin>>,
    /// Commands sent by [`Guest::run`], for unique markers.
    runs: AtomicU64,
}

/// The line the user-space initramfs prints when its shell on ttyS0 is up.
pub const SHELL_READY: &str = "arbor-guest: shell on ttyS0";

fn collect(
    stream: impl std::io::Read + Send + 'static,
    log: Arc<(Mutex<Log>, Condvar)>,
    echo: Option<String>,
) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let s = String::from_utf8_lossy(&line).replace('\r', "");
                    if let Some(tag) = &echo {
                        eprint!("[{tag}] {s}");
                    }
                    let (m, c) = &*log;
                    m.lock().unwrap().text.push_str(&s);
                    c.notify_all();
                }
            }
        }
        let (m, c) = &*log;
        m.lock().unwrap().closed = true;
        c.notify_all();
    });
}

/// `arbor` arguments booting `kernel` with `initramfs`, the kit's command
/// line plus `extra_cmdline`, `cpus` vCPUs, 512 MiB, then `extra`.
fn kit_args(
    kernel: &Path,
    initramfs: &Path,
    cpus: u8,
    extra_cmdline: &str,
    extra: &[&str],
) -> Vec<String> {
    let kit = guest_kit();
    let mut args: Vec<String> = vec![
        "--kernel".into(),
        kernel.display().to_string(),
        "--initramfs".into(),
        initramfs.display().to_string(),
        "--cmdline".into(),
        format!("{} {}", kit.cmdline, extra_cmdline)
            .trim()
            .to_string(),
        "--cpus".into(),
        cpus.to_string(),
        "--memory".into(),
        "512M".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

impl Guest {
    /// Starts `arbor` with `args`; `name` tags its echoed console lines.
    /// Unless `args` has an `--allow-path`, the system's temporary
    /// directory (where [`Scratch`] directories live) and the guest kit's
    /// directory are allowed, so tests may hot-plug their scratch files and
    /// create VMs over the API.
    pub fn start(name: &str, args: &[String]) -> Guest {
        Guest::start_env(name, args, &[])
    }

    /// Like [`Guest::start`], with extra environment variables.
    pub fn start_env(name: &str, args: &[String], env: &[(&str, &str)]) -> Guest {
        Guest::spawn(name, &[], args, env, false)
    }

    /// Like [`Guest::start`], run through `wrapper` (a command that execs
    /// its arguments, e.g. `ip netns exec NS`), so `arbor` keeps the pid.
    pub fn start_wrapped(name: &str, wrapper: &[String], args: &[String]) -> Guest {
        Guest::spawn(name, wrapper, args, &[], false)
    }

    fn spawn(
        name: &str,
        wrapper: &[String],
        args: &[String],
        env: &[(&str, &str)],
        input: bool,
    ) -> Guest {
        let mut cmd = match wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(arbor_bin());
                c
            }
            None => Command::new(arbor_bin()),
        };
        if std::env::var_os("ARBOR_LOG").is_none() {
            cmd.env("ARBOR_LOG", "info");
        }
        cmd.envs(env.iter().copied());
        if !args.iter().any(|a| a.starts_with("--allow-path")) {
            cmd.arg("--allow-path").arg(std::env::temp_dir());
            // A VM created over the API names the kit's files.
            let kit = guest_dir();
            if kit.is_dir() {
                cmd.arg("--allow-path").arg(kit);
            }
        }
        let mut child = cmd
            .args(args)
            .stdin(if input { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn arbor");
        let stdin = child.stdin.take();
        let log = Arc::new((Mutex::new(Log::default()), Condvar::new()));
        let stderr = Arc::new((Mutex::new(Log::default()), Condvar::new()));
        let echo = std::env::var("ARBOR_TEST_ECHO")
            .ok()
            .map(|_| name.to_string());
        collect(
            child.stdout.take().expect("stdout"),
            log.clone(),
            echo.clone(),
        );
        collect(child.stderr.take().expect("stderr"), stderr.clone(), echo);
        Guest {
            child,
            log,
            stderr,
            started: Instant::now(),
            name: name.to_string(),
            stdin: Mutex::new(stdin),
            runs: AtomicU64::new(0),
        }
    }

    /// Boots the kit's vmlinux with the user-space initramfs
    /// (`initramfs-user.cpio`: busybox, `arbor-guest`, a shell on ttyS0),
    /// `cpus` vCPUs, 512 MiB, the kit's command line plus `extra_cmdline`,
    /// and `extra` arguments; the guest's serial input is connected so that
    /// [`Guest::run`] works. Does not wait: see [`Guest::wait_shell`].
    pub fn boot_user(name: &str, cpus: u8, extra_cmdline: &str, extra: &[&str]) -> Guest {
        Guest::boot_user_wrapped(name, &[], cpus, extra_cmdline, extra)
    }

    /// [`Guest::boot_user`] run through `wrapper` (see
    /// [`Guest::start_wrapped`]).
    pub fn boot_user_wrapped(
        name: &str,
        wrapper: &[String],
        cpus: u8,
        extra_cmdline: &str,
        extra: &[&str],
    ) -> Guest {
        let kit = guest_kit();
        let args = kit_args(&kit.vmlinux, &user_initramfs(), cpus, extra_cmdline, extra);
        Guest::spawn(name, wrapper, &args, &[], true)
    }

    /// [`Guest::boot`] (the kit's kernel-log initramfs) run through
    /// `wrapper` (see [`Guest::start_wrapped`]).
    pub fn boot_wrapped(
        name: &str,
        wrapper: &[String],
        cpus: u8,
        extra_cmdline: &str,
        extra: &[&str],
    ) -> Guest {
        let kit = guest_kit();
        let args = kit_args(&kit.vmlinux, &kit.initramfs, cpus, extra_cmdline, extra);
        Guest::spawn(name, wrapper, &args, &[], false)
    }

    /// Waits until the user-space guest's shell on ttyS0 is up; returns the
    /// time since `arbor` started. Input sent before that is lost (the
    /// guest's UART driver drops what arrived before the tty was opened).
    /// Bounded by twice [`timeout`]: a boot to user space takes a kernel
    /// boot plus busybox init's start (measured here: 30 s more on a loaded
    /// machine).
    pub fn wait_shell(&self) -> Duration {
        self.wait_for_any_within(&["Run /init as init process"], timeout());
        self.wait_for_any_within(&[SHELL_READY], timeout());
        self.elapsed()
    }

    /// Runs `cmd` (one shell command line) in a user-space guest through
    /// the shell on its serial console and returns its exit status and its
    /// output (stdout and stderr together). Panics on timeout
    /// ([`timeout`]) or when the VMM exits; see [`Guest::try_run`].
    pub fn run(&self, cmd: &str) -> (i32, String) {
        self.try_run(cmd, timeout())
            .unwrap_or_else(|e| panic!("[{}] {e}", self.name))
    }

    /// Like [`Guest::run`] with an explicit time limit, returning an error
    /// (with the console's tail) instead of panicking.
    ///
    /// The command runs as `{ CMD
    /// } 2>&1` between two `echo`s of markers unique to this call; the
    /// markers are split by quotes in what is sent (`AR''BOR-...`), so only
    /// the shell's output, never an echo of the input, can match them.
    /// Kernel messages printed on the console meanwhile are part of the
    /// output. After a timeout the command may still be running in the
    /// guest.
    pub fn try_run(&self, cmd: &str, limit: Duration) -> Result<(i32, String), String> {
        let n = self.runs.fetch_add(1, Ordering::Relaxed);
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tag = format!("{:x}-{n}-{nonce:x}", self.child.id());
        let begin = format!("ARBOR-B-{tag}\n");
        let end = format!("ARBOR-E-{tag}-");
        let line = format!("echo AR''BOR-B-{tag}; {{ {cmd}\n}} 2>&1; echo AR''BOR-E-{tag}-$?\n");
        let mark = self.log.0.lock().unwrap().text.len();
        {
            let mut input = self.stdin.lock().unwrap();
            let w = input
                .as_mut()
                .ok_or("this guest has no serial input (boot it with Guest::boot_user)")?;
            w.write_all(line.as_bytes())
                .and_then(|_| w.flush())
                .map_err(|e| format!("writing to the guest's console: {e}"))?;
        }
        let deadline = Instant::now() + limit;
        let (m, c) = &*self.log;
        let mut log = m.lock().unwrap();
        loop {
            let tail = log.text.get(mark..).unwrap_or("");
            if let Some(b) = tail.find(&begin) {
                let out_start = b + begin.len();
                if let Some(e) = tail[out_start..].find(&end) {
                    let rest = &tail[out_start + e + end.len()..];
                    if let Some(nl) = rest.find('\n') {
                        let status = rest[..nl]
                            .trim()
                            .parse::<i32>()
                            .map_err(|_| format!("bad status {:?} for {cmd:?}", &rest[..nl]))?;
                        let out = tail[out_start..out_start + e].to_string();
                        return Ok((status, out));
                    }
                }
            }
            let now = Instant::now();
            if log.closed || now >= deadline {
                let why = if log.closed {
                    "arbor exited"
                } else {
                    "timed out"
                };
                let tail = tail.to_string();
                drop(log);
                return Err(format!(
                    "{why} after {limit:?} running {cmd:?}\n--- console since the command ---\n{tail}\n--- stderr ---\n{}",
                    self.stderr()
                ));
            }
            log = c.wait_timeout(log, deadline - now).unwrap().0;
        }
    }

    /// Boots `kernel` from the guest kit with the kit's command line plus
    /// `extra_cmdline`, and `extra` arguments.
    pub fn boot(name: &str, kernel: &Path, cpus: u8, extra_cmdline: &str, extra: &[&str]) -> Guest {
        let kit = guest_kit();
        let args = kit_args(kernel, &kit.initramfs, cpus, extra_cmdline, extra);
        Guest::start(name, &args)
    }

    /// The console output so far.
    pub fn console(&self) -> String {
        self.log.0.lock().unwrap().text.clone()
    }

    /// The VMM's stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.0.lock().unwrap().text.clone()
    }

    /// Waits (bounded by [`timeout`]) until the VMM's stderr contains
    /// `needle`, and returns it: a line the VMM wrote before answering a
    /// request may reach this process's reader thread after the answer.
    pub fn wait_stderr(&self, needle: &str) -> String {
        poll_text(
            || self.stderr(),
            needle,
            "stderr",
            Duration::from_millis(20),
        )
    }

    /// Waits until the console contains `needle`; returns the whole line.
    /// Panics with the console so far on timeout or VMM exit.
    pub fn wait_for(&self, needle: &str) -> String {
        self.wait_for_any(&[needle]).1
    }

    /// Waits until the console contains one of `needles`; returns which and
    /// the line it is on.
    pub fn wait_for_any(&self, needles: &[&str]) -> (usize, String) {
        self.wait_for_any_within(needles, timeout())
    }

    /// [`Guest::wait_for_any`] with an explicit bound.
    fn wait_for_any_within(&self, needles: &[&str], limit: Duration) -> (usize, String) {
        let deadline = Instant::now() + limit;
        let (m, c) = &*self.log;
        let mut log = m.lock().unwrap();
        loop {
            for (i, n) in needles.iter().enumerate() {
                if let Some(pos) = log.text.find(n) {
                    let start = log.text[..pos].rfind('\n').map(|p| p + 1).unwrap_or(0);
                    let end = log.text[pos..]
                        .find('\n')
                        .map(|p| p + pos)
                        .unwrap_or(log.text.len());
                    return (i, log.text[start..end].to_string());
                }
            }
            let now = Instant::now();
            if log.closed || now >= deadline {
                let why = if log.closed {
                    "arbor exited"
                } else {
                    "timed out"
                };
                let text = log.text.clone();
                drop(log);
                panic!(
                    "[{}] {why} after {:?} waiting for {:?}\n--- console ---\n{}\n--- stderr ---\n{}",
                    self.name,
                    self.started.elapsed(),
                    needles,
                    text,
                    self.stderr()
                );
            }
            log = c.wait_timeout(log, deadline - now).unwrap().0;
        }
    }

    /// Seconds since the VMM was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits for `arbor` to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + timeout();
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                // Let the readers drain.
                let (m, c) = &*self.log;
                let mut log = m.lock().unwrap();
                let until = Instant::now() + Duration::from_secs(5);
                while !log.closed && Instant::now() < until {
                    log = c.wait_timeout(log, Duration::from_millis(100)).unwrap().0;
                }
                return st;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "[{}] arbor did not exit in time\n--- console ---\n{}\n--- stderr ---\n{}",
                    self.name,
                    self.console(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Process id of `arbor`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `arbor` with `args` to completion (for inputs that must fail fast).
pub fn run_arbor(args: &[&str]) -> (Option<i32>, String) {
    run_arbor_env(args, &[])
}

/// Like [`run_arbor`], with extra environment variables.
pub fn run_arbor_env(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(arbor_bin())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run arbor");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A scratch directory for one test, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("arbor-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        Scratch(d)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A disk request for `path` with id `id`, placed by `port` or exact
/// `pci_path` (neither: by policy).
pub fn disk_at(
    path: &Path,
    id: &str,
    port: Option<&str>,
    pci_path: Option<&str>,
) -> api::types::DiskConfig {
    api::types::DiskConfig {
        path: path.display().to_string(),
        readonly: false,
        lock: true,
        id: Some(id.into()),
        serial: None,
        port: port.map(String::from),
        pci_path: pci_path.map(String::from),
        function: None,
    }
}

/// Arguments for every hotplug mechanism in reach of automatic placement:
/// the default topology's eight native root ports (`rp0`-`rp7`, root slots
/// 01-08) and `br0`, a PCIe-to-PCI bridge with 32 ACPI slots and an I/O
/// window, at root slot 09; cold-plugged devices take root slots 0a
/// onwards, and every free root slot hot-plugs by ACPI (the default until
/// 1 Dec 2026).
pub const WITH_ACPI_BRIDGE: [&str; 20] = [
    "--pci-port",
    "id=rp0,type=root-port",
    "--pci-port",
    "id=rp1,type=root-port",
    "--pci-port",
    "id=rp2,type=root-port",
    "--pci-port",
    "id=rp3,type=root-port",
    "--pci-port",
    "id=rp4,type=root-port",
    "--pci-port",
    "id=rp5,type=root-port",
    "--pci-port",
    "id=rp6,type=root-port",
    "--pci-port",
    "id=rp7,type=root-port",
    "--pci-port",
    "id=br0,type=pci-bridge,io-reserve=4K",
    "--acpi-root-slots",
    "all",
];

/// [`WITH_ACPI_BRIDGE`] in a [`vmm::VmConfig`]: its ports, and ACPI hotplug
/// on every free root slot.
pub fn with_acpi_bridge(cfg: &mut vmm::VmConfig) {
    cfg.ports = WITH_ACPI_BRIDGE
        .chunks(2)
        .filter(|pair| pair[0] == "--pci-port")
        .map(|pair| vmm::config::parse_port(pair[1]).expect("a valid port spec"))
        .collect();
    cfg.acpi_root_slots = None;
}

/// Boots the guest kit's vmlinux (1 vCPU, [`WITH_ACPI_BRIDGE`]) with an API
/// socket at `sock`.
pub fn boot_with_api(name: &str, sock: &Path) -> Guest {
    let kit = guest_kit();
    let sock = sock.display().to_string();
    let mut args = vec!["--api-socket", sock.as_str()];
    args.extend(WITH_ACPI_BRIDGE);
    Guest::boot(name, &kit.vmlinux, 1, "", &args)
}

/// A configuration booting the guest kit's vmlinux in-process (the
/// embedding API), console to `serial`.
pub fn kit_vm_config(serial: vmm::SerialOutput) -> vmm::VmConfig {
    let kit = guest_kit();
    vmm::VmConfig {
        kernel: kit.vmlinux,
        initramfs: Some(kit.initramfs),
        cmdline: kit.cmdline,
        serial,
        ..Default::default()
    }
}

/// Waits (bounded by [`timeout`]) until the API socket `p` exists and the
/// VMM behind it has answered a first request.
pub fn wait_for_socket(p: &Path) {
    let deadline = Instant::now() + timeout();
    while !p.exists() {
        assert!(
            Instant::now() < deadline,
            "socket {} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // `arbor` serves its API before it builds the VM: `vm.info` is
    // answered once the VMM's loop runs, so the VM (its disks, their
    // locks, its devices) exists when this returns. The answer itself
    // does not matter (there may be no VM).
    let _ = api::client::Client::new(p)
        .with_timeout(timeout())
        .vm_info();
}

/// A sparse raw disk of `mib` MiB (the guest sees `mib * 2048` sectors).
pub fn raw_disk(path: &Path, mib: u64) {
    let f = std::fs::File::create(path).expect("create disk");
    f.set_len(mib << 20).expect("size disk");
}

/// A raw disk with an MBR partition table holding two partitions.
pub fn mbr_disk(path: &Path, mib: u64) {
    raw_disk(path, mib);
    let mut child = Command::new("sfdisk")
        .arg("--quiet")
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("sfdisk (apt-get install fdisk)");
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().expect("sfdisk stdin");
        stdin
            .write_all(b"label: dos\n,8M,L\n,,L\n")
            .expect("write sfdisk script");
    }
    assert!(child.wait().expect("sfdisk").success(), "sfdisk failed");
}

/// An ext4 image of `mib` MiB whose root holds `/dev` and the guest kit's
/// `/init` (taken from the kit's initramfs).
pub fn ext4_root(path: &Path, mib: u64, scratch: &Scratch) {
    let kit = guest_kit();
    let tree = scratch.path("rootfs");
    std::fs::create_dir_all(tree.join("dev")).expect("rootfs dir");
    let cpio = std::fs::File::open(&kit.initramfs).expect("open initramfs");
    let out = Command::new("cpio")
        .args(["-i", "--quiet", "--no-absolute-filenames", "init"])
        .current_dir(&tree)
        .stdin(cpio)
        .output()
        .expect("cpio");
    assert!(
        out.status.success(),
        "cpio: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(tree.join("init").exists(), "no /init in the initramfs");
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&tree)
        .arg(path)
        .arg(format!("{mib}M")));
}

/// A field of `dumpe2fs -h` for an ext4 image.
pub fn ext4_field(path: &Path, field: &str) -> String {
    let out = Command::new("dumpe2fs")
        .arg("-h")
        .arg(path)
        .output()
        .expect("dumpe2fs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no '{field}' in dumpe2fs output:\n{text}"))
}

/// The BDF the guest uses for `path`, from the `PCI bridge to [bus NN]`
/// lines the guest printed for the bridges it enumerated.
pub fn guest_bdf(path: &str, console: &str) -> String {
    let p: pci::PciPath = path.parse().expect("PCI path");
    let map = pci::path::parse_bridge_map(console);
    pci::path::resolve_with_bridge_map(&p, &map)
        .unwrap_or_else(|e| {
            panic!("cannot resolve {path} against the guest's bridges: {e}\n{map:?}")
        })
        .to_string()
}

/// Waits until the console has `n` occurrences of `needle` after byte
/// offset `from`; returns the console text after `from`.
pub fn wait_count(g: &Guest, from: usize, needle: &str, n: usize) -> String {
    let deadline = Instant::now() + timeout();
    loop {
        let c = g.console();
        let tail = c.get(from..).unwrap_or("").to_string();
        if tail.matches(needle).count() >= n {
            return tail;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {n} x {needle:?}; console after mark:\n{tail}\nstderr:\n{}",
            g.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The gpio vfio-user server (the `vfio_user` crate's example device, a
/// test peer), built once and cached under the target directory by
/// `resources/vfio-user/build-gpio.sh`.
pub fn gpio_server_bin() -> PathBuf {
    let out = Command::new(repo_root().join("resources/vfio-user/build-gpio.sh"))
        .output()
        .expect("run build-gpio.sh");
    assert!(
        out.status.success(),
        "build-gpio.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
    assert!(path.is_file(), "no gpio server at {}", path.display());
    path
}

/// One gpio server process serving one connection on `DIR/NAME.sock`; its
/// log (level info) goes to `DIR/NAME.log`. Killed on drop.
pub struct GpioServer {
    child: Child,
    /// The server's UNIX socket.
    pub socket: PathBuf,
    log: PathBuf,
}

impl GpioServer {
    /// Starts `bin` and waits (bounded) for its socket.
    pub fn start(bin: &Path, dir: &Path, name: &str) -> GpioServer {
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(bin)
            .arg("--socket-path")
            .arg(&socket)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("server log"))
            .spawn()
            .expect("start the gpio server");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "{name}: no socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        GpioServer { child, socket, log }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until the server's log contains `needle`.
    pub fn wait_log(&self, needle: &str) -> String {
        poll_text(
            || self.log(),
            needle,
            "server log",
            Duration::from_millis(50),
        )
    }

    /// An add request for this server's function with id `id`, placed
    /// by the VMM (set `port`, `pci_path` or `function` to place it).
    pub fn config(&self, id: &str) -> api::types::UserDeviceConfig {
        api::types::UserDeviceConfig {
            socket: self.socket.display().to_string(),
            id: Some(id.into()),
            port: None,
            pci_path: None,
            function: None,
        }
    }
}

impl Drop for GpioServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
