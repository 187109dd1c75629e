//! VM configuration: the struct an embedder fills in, and the `arbor`
//! command line that produces it. Validation happens here, before anything
//! is created, so a bad option changes nothing.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use api::types::{DeviceConfig, UserDeviceConfig};
use api::types::{DiskConfig, NetConfig, RngConfig, VsockConfig};
use pci::placement::PlaceKind;
use pci::topology::{HotplugMode, PortKind, PortSpec, Topology, TopologyOptions};

use crate::layout::CMDLINE_MAX_SIZE;

/// Most vCPUs a VM may have (APIC IDs are 8-bit; 0xff is broadcast).
pub const MAX_VCPUS: u8 = 254;
/// Least memory a VM may have.
pub const MIN_MEMORY: u64 = 8 << 20;

/// Default bound of console output appended to a `--serial file=PATH`.
pub const DEFAULT_SERIAL_FILE_MAX: u64 = 16 << 20;

impl SerialOutput {
    /// Console output to `path`, bounded by [`DEFAULT_SERIAL_FILE_MAX`].
    pub fn file(path: impl Into<PathBuf>) -> Self {
        SerialOutput::File {
            path: path.into(),
            max: DEFAULT_SERIAL_FILE_MAX,
        }
    }
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM's standard output; input comes from standard input when it is
    /// a terminal.
    Stdout,
    /// Appended to a file, at most `max` bytes (the rest is dropped).
    File {
        /// The file (created if missing).
        path: PathBuf,
        /// Most bytes this VM appends to it ([`DEFAULT_SERIAL_FILE_MAX`] unless set).
        max: u64,
    },
    /// Discarded.
    Off,
}

const PORT_KEYS: &[&str] = &[
    "id",
    "type",
    "parent",
    "hotplug",
    "downstream",
    "slot",
    "bus-reserve",
    "mem-reserve",
    "pref64-reserve",
    "io-reserve",
];

/// Parses one `--pci-port` into the topology's typed spec:
/// `id=ID,type=root-port|switch|pci-bridge[,parent=ID]
/// [,hotplug=native|acpi|none][,downstream=N][,slot=N][,bus-reserve=N]
/// [,mem-reserve=SIZE][,pref64-reserve=SIZE][,io-reserve=SIZE]`.
pub fn parse_port(input: &str) -> Result<PortSpec, ConfigError> {
    let e = |m: String| ConfigError(format!("--pci-port '{input}': {m}"));
    let o = api::kv::parse(input, PORT_KEYS).map_err(|x| e(x.to_string()))?;
    let id = o.required("id").map_err(|x| e(x.to_string()))?.to_string();
    let kind_name = o.required("type").map_err(|x| e(x.to_string()))?;
    let mut kind: PortKind = kind_name.parse().map_err(|_| {
        e(format!(
            "unknown type '{kind_name}': expected root-port, switch or pci-bridge"
        ))
    })?;
    let hotplug = match o.get("hotplug") {
        None => None,
        Some(h) => Some(
            h.parse::<HotplugMode>()
                .map_err(|_| e(format!("hotplug '{h}': expected native, acpi or none")))?,
        ),
    };
    let num = |k: &str| -> Result<Option<u64>, ConfigError> {
        match o.get(k) {
            None => Ok(None),
            Some(v) => parse_size(v).map(Some).map_err(|x| e(format!("{k}: {x}"))),
        }
    };
    let small = |k: &str, max: u64| -> Result<Option<u8>, ConfigError> {
        match o.get(k) {
            None => Ok(None),
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= max)
                .map(|n| Some(n as u8))
                .ok_or_else(|| e(format!("{k} '{v}' is not a number from 0 to {max}"))),
        }
    };
    match (small("downstream", 32)?, &mut kind) {
        (Some(0), PortKind::Switch { .. }) => {
            return Err(e("a switch needs 1 to 32 downstream ports".into()))
        }
        (Some(n), PortKind::Switch { downstream }) => *downstream = n,
        (Some(_), _) => return Err(e("only a switch has downstream ports".into())),
        (None, _) => {}
    }
    Ok(PortSpec {
        id,
        kind,
        parent: o.string("parent"),
        hotplug,
        slot: small("slot", 31)?,
        bus_reserve: small("bus-reserve", 254)?,
        mmio32_reserve: num("mem-reserve")?,
        mmio64_reserve: num("pref64-reserve")?,
        io_reserve: num("io-reserve")?,
        ..Default::default()
    })
}

/// What the `arbor` process decides for every VM it builds, whatever the
/// configuration's source: set from its command line, never from
/// `vm.create` (an API client cannot widen what it may reach).
#[derive(Clone, Debug, Default)]
pub struct ProcessPolicy {
    /// Seccomp mode of every VM's threads.
    pub seccomp: crate::seccomp::SeccompMode,
    /// The `--allow-path` directories.
    pub allow_paths: Vec<PathBuf>,
    /// The paths API clients may name (the command line's files and the
    /// `--allow-path` directories); `None`: unchecked (embedders).
    pub paths: Option<crate::confine::PathPolicy>,
}

impl ProcessPolicy {
    /// The policy the command line `cfg` sets.
    pub fn from_command_line(cfg: &VmConfig) -> ProcessPolicy {
        ProcessPolicy {
            seccomp: cfg.seccomp,
            allow_paths: cfg.allow_paths.clone(),
            paths: cfg
                .check_paths
                .then(|| crate::confine::PathPolicy::for_config(cfg, &cfg.allow_paths)),
        }
    }

    /// Applies the policy to a configuration an API client sent
    /// (`vm.create`): the process's seccomp mode and allowed directories,
    /// and every file it names (kernel, initramfs, disks, console file)
    /// must be one the process may use, else the error names it.
    pub fn admit(&self, mut cfg: VmConfig) -> Result<VmConfig, ConfigError> {
        cfg.seccomp = self.seccomp;
        cfg.allow_paths = self.allow_paths.clone();
        cfg.check_paths = self.paths.is_some();
        if let Some(policy) = &self.paths {
            let mut named: Vec<(&str, String)> = vec![("kernel", path_text(&cfg.kernel))];
            named.extend(cfg.initramfs.iter().map(|p| ("initramfs", path_text(p))));
            named.extend(cfg.disks.iter().map(|d| ("disk", d.path.clone())));
            named.extend(
                cfg.user_devices
                    .iter()
                    .map(|u| ("user-device", u.socket.clone())),
            );
            if let SerialOutput::File { path, .. } = &cfg.serial {
                named.push(("serial", path_text(path)));
            }
            // The vsock socket does not exist yet: its directory must be allowed.
            if let Some(v) = &cfg.vsock {
                named.push(("vsock", vsock_dir(&v.socket)));
            }
            for (field, path) in named {
                if let Err(refused) = policy.check(&path) {
                    return err(format!("{field}: {refused}"));
                }
            }
        }
        Ok(cfg)
    }
}

/// The directory a socket at `socket` is created in (`.` for a bare name).
pub fn socket_dir(socket: &std::path::Path) -> std::path::PathBuf {
    match socket.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    }
}

/// The directory the vsock socket `socket` is created in.
pub fn vsock_dir(socket: &str) -> String {
    path_text(&socket_dir(std::path::Path::new(socket)))
}

fn path_text(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    pub memory: u64,
    pub serial: SerialOutput,
    /// UNIX socket for the HTTP API.
    pub api_socket: Option<PathBuf>,
    /// How long `vm.shutdown` waits for the guest after the power button.
    pub shutdown_grace: Duration,
    /// How long `vm.remove-device` waits for the guest to release a device.
    pub remove_timeout: Duration,
    /// Cold-plugged virtio-blk disks, in slot order.
    pub disks: Vec<DiskConfig>,
    /// Cold-plugged virtio-rng devices, after the disks.
    pub rngs: Vec<RngConfig>,
    /// Cold-plugged virtio-net NICs, after the rng devices.
    pub nets: Vec<NetConfig>,
    /// The PCI topology; empty means the default topology.
    pub ports: Vec<PortSpec>,
    /// Where automatically placed hot-plugged devices go first.
    pub placement_order: Vec<PlaceKind>,
    /// How many of the root bus's free slots offer ACPI hotplug, the
    /// highest-numbered ones (`--acpi-root-slots`); `None`: all of them.
    /// Each costs the guest time at boot (an ACPI device object and a
    /// hotplug slot); the others still take cold-plugged devices.
    pub acpi_root_slots: Option<u8>,
    /// Seccomp filters for Arbor's threads (process-wide; see
    /// `vmm::seccomp`). `VmConfig::default()` says `Off`, because an
    /// embedder's own threads are not covered and its process may need
    /// calls the lists do not allow; the `arbor` binary defaults to `On`.
    pub seccomp: crate::seccomp::SeccompMode,
    /// Directories whose files API clients may name (`--allow-path`).
    pub allow_paths: Vec<PathBuf>,
    /// Whether the VMM checks the paths API clients name against
    /// [`crate::confine::PathPolicy`] (the files this configuration names
    /// and `allow_paths`). `arbor` always checks; the default (off) is for
    /// embedders whose callers are trusted.
    pub check_paths: bool,
    /// Process protections `arbor` applies before creating the VM
    /// ([`crate::confine::apply`]; `Vm::new` does not apply them).
    pub confine: crate::confine::Options,
    /// Where the `arbor` process writes its event stream (`--event-monitor`).
    pub event_monitor: Option<EventMonitor>,
    /// The cold-plugged virtio-vsock device (at most one), after the rngs.
    pub vsock: Option<VsockConfig>,
    /// Cold-plugged vfio-user devices (`--user-device`), after the rngs.
    pub user_devices: Vec<UserDeviceConfig>,
    /// Cold-plugged host PCI functions (`--device`, kernel VFIO), after
    /// the vfio-user devices.
    pub vfio_devices: Vec<DeviceConfig>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            kernel: PathBuf::new(),
            initramfs: None,
            cmdline: "console=ttyS0".to_string(),
            cpus: 1,
            memory: 512 << 20,
            serial: SerialOutput::Stdout,
            api_socket: None,
            shutdown_grace: Duration::from_secs(5),
            remove_timeout: Duration::from_secs(10),
            disks: Vec::new(),
            rngs: Vec::new(),
            nets: Vec::new(),
            ports: Vec::new(),
            placement_order: PlaceKind::DEFAULT_ORDER.to_vec(),
            acpi_root_slots: Some(DEFAULT_ACPI_ROOT_SLOTS),
            seccomp: crate::seccomp::SeccompMode::Off,
            allow_paths: Vec::new(),
            check_paths: false,
            confine: crate::confine::Options::default(),
            event_monitor: None,
            vsock: None,
            user_devices: Vec::new(),
            vfio_devices: Vec::new(),
        }
    }
}

/// A configuration or command-line error: one sentence for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Parses a memory size: bytes, or a number with K, M, G (or KiB, MiB, GiB)
/// suffix, powers of 1024.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| ConfigError(format!("invalid size '{s}': expected e.g. 512M or 2G")))?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return err(format!("invalid size '{s}': unknown suffix '{suffix}'")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| ConfigError(format!("invalid size '{s}': too large")))
}

/// Parses a guest memory size: like [`parse_size`], except that a plain
/// number is MiB, as QEMU reads `-m 512`.
pub fn parse_memory(s: &str) -> Result<u64, ConfigError> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return parse_size(&format!("{t}M"));
    }
    parse_size(s)
}

/// Total memory of the host, from /proc/meminfo.
pub fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl VmConfig {
    /// Checks the configuration without touching any host resource beyond
    /// reading files' metadata; returns the PCI topology it describes.
    pub fn validate(&self) -> Result<Topology, ConfigError> {
        if self.cpus == 0 {
            return err("--cpus must be at least 1");
        }
        if self.cpus > MAX_VCPUS {
            return err(format!("--cpus must be at most {MAX_VCPUS}"));
        }
        if self.memory < MIN_MEMORY {
            return err(format!(
                "--memory {} MiB is too small: at least {} MiB is needed",
                self.memory >> 20,
                MIN_MEMORY >> 20
            ));
        }
        if let Some(host) = host_memory() {
            if self.memory > host {
                return err(format!(
                    "--memory {} MiB is more than this host has ({} MiB)",
                    self.memory >> 20,
                    host >> 20
                ));
            }
        }
        if self.cmdline.len() >= CMDLINE_MAX_SIZE {
            return err(format!(
                "the kernel command line is {} bytes long; the limit is {}",
                self.cmdline.len(),
                CMDLINE_MAX_SIZE - 1
            ));
        }
        if self.cmdline.bytes().any(|b| b == 0) {
            return err("the kernel command line contains a NUL byte");
        }
        check_file("kernel", &self.kernel)?;
        if let Some(initramfs) = &self.initramfs {
            check_file("initramfs", initramfs)?;
        }
        for d in &self.allow_paths {
            match std::fs::metadata(d) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return err(format!("--allow-path '{}' is not a directory", d.display())),
                Err(e) => return err(format!("--allow-path '{}': {e}", d.display())),
            }
        }
        // Whether each host function exists; its driver, IOMMU group and
        // the host's VFIO are checked when the device is opened.
        let mut functions: Vec<String> = Vec::new();
        for d in &self.vfio_devices {
            let bdf = devices::vfio::group::function_of(std::path::Path::new("/sys"), &d.path)
                .map_err(|e| ConfigError(format!("--device: {e}")))?;
            if functions.contains(&bdf) {
                return err(format!("--device: host PCI function {bdf} is given twice"));
            }
            // A request takes every function of its host device.
            if let Some(other) = functions.iter().find(|f| f.get(..10) == bdf.get(..10)) {
                return err(format!(
                    "--device: {bdf} and {other} are functions of one host device, which one \
                     --device takes whole (leave functions out with unassigned=)"
                ));
            }
            functions.push(bdf);
        }
        let topology = self.topology()?;
        let mut ids: Vec<&str> = Vec::new();
        // The checked disks stay open (and locked) until every one is
        // checked, so the same image given twice read-write is refused here.
        let mut _opened = Vec::new();
        for d in &self.disks {
            _opened.push(check_disk(&d.path, d.readonly, d.lock)?);
        }
        if let Some(v) = &self.vsock {
            v.validate()
                .map_err(|e| ConfigError(format!("--vsock: {}", e.message)))?;
        }
        let given = self
            .disks
            .iter()
            .map(|d| (&d.id, &d.port, &d.pci_path))
            .chain(self.rngs.iter().map(|r| (&r.id, &r.port, &r.pci_path)))
            .chain(self.vsock.iter().map(|v| (&v.id, &v.port, &v.pci_path)))
            .chain(
                self.user_devices
                    .iter()
                    .map(|u| (&u.id, &u.port, &u.pci_path)),
            )
            .chain(
                self.vfio_devices
                    .iter()
                    .map(|d| (&d.id, &d.port, &d.pci_path)),
            )
            .chain(self.nets.iter().map(|n| (&n.id, &n.port, &n.pci_path)));
        let mut fds: Vec<i32> = Vec::new();
        for n in &self.nets {
            n.validate()
                .map_err(|e| ConfigError(format!("--net: {}", e.message)))?;
            if let Some(fd) = n.fd {
                if fd <= 2 || fds.contains(&fd) {
                    return err(format!(
                        "--net fd={fd}: give a tap descriptor above 2, once"
                    ));
                }
                fds.push(fd);
            }
        }
        for (id, port, path) in given {
            if let Some(id) = id {
                if ids.contains(&id.as_str()) {
                    return err(format!("device id '{id}' is used twice"));
                }
                ids.push(id);
            }
            if let Some(p) = path {
                p.parse::<pci::PciPath>()
                    .map_err(|e| ConfigError(format!("pci_path '{p}': {e}")))?;
            }
            if let Some(port) = port {
                if topology.port(port).is_none() {
                    return err(format!("unknown port '{port}'"));
                }
            }
        }
        Ok(topology)
    }
}

/// The topology used when no `--pci-port` is given: eight root ports with
/// native hotplug (`rp0`-`rp7`, root slots 01-08); the root bus keeps its
/// other slots (09-1f) for cold-plugged devices and ACPI hotplug, and
/// forwards the I/O ports for devices with I/O BARs. A bridge with ACPI
/// slots (`--pci-port id=br0,type=pci-bridge`) is left out: under emulated
/// KVM its 32 slot objects cost the guest about 9 s of boot (see
/// `resources/bench/README.md`), and the root bus already offers ACPI
/// hotplug.
pub fn default_ports() -> Vec<PortSpec> {
    (0..8)
        .map(|i| PortSpec::new(format!("rp{i}"), PortKind::RootPort))
        .collect()
}

impl VmConfig {
    /// The ports: `--pci-port`s, or [`default_ports`] when there are none.
    pub fn effective_ports(&self) -> Vec<PortSpec> {
        if self.ports.is_empty() {
            default_ports()
        } else {
            self.ports.clone()
        }
    }

    /// Builds the PCI topology (bus numbers, windows, paths): pure, so bad
    /// topologies are refused before anything is created.
    pub fn topology(&self) -> Result<Topology, ConfigError> {
        let specs = self.effective_ports();
        let (mmio32, mmio64) = crate::layout::pci_windows(self.memory);
        let io = Some((crate::layout::PCI_IO_START, crate::layout::PCI_IO_SIZE));
        let mut opts = TopologyOptions::new((1..32).collect(), mmio32, mmio64, io);
        opts.root_acpi_slots = self.acpi_root_slots.map(usize::from);
        let topo = Topology::build(&specs, &opts)
            .map_err(|e| ConfigError(format!("PCI topology: {e}")))?;
        // The ports' windows are carved from the top of the host windows;
        // devices on the root bus need what is left.
        let rest = topo.remaining_windows();
        for (name, host, left, option, default) in [
            (
                "32-bit",
                mmio32.1,
                rest.mmio32.1,
                "mem-reserve",
                opts.default_mmio32_reserve,
            ),
            (
                "64-bit",
                mmio64.1,
                rest.mmio64.1,
                "pref64-reserve",
                opts.default_mmio64_reserve,
            ),
        ] {
            if left == 0 && !topo.is_empty() {
                return err(format!(
                    "PCI topology: the ports' windows take all {} MiB of the host's {name} \
                     MMIO window (each port with hotplug slots reserves {option}, {} MiB by \
                     default), leaving nothing for devices on the root bus: use fewer ports \
                     or lower their {option}=",
                    host >> 20,
                    default >> 20
                ));
            }
        }
        Ok(topo)
    }
}

/// Opens the disk the way the device will (without blocking, refusing
/// what cannot be a disk, and taking its image locks unless `lock` is
/// off), so a bad `--disk` or an image in use is a configuration error. A
/// relative path is taken from the VMM's working directory. The open file
/// holds the locks until it is dropped.
fn check_disk(path: &str, read_only: bool, lock: bool) -> Result<std::fs::File, ConfigError> {
    use devices::virtio::block::{lock_disk, open_disk};
    if path.is_empty() {
        return err("a disk needs a path");
    }
    let opened = open_disk(std::path::Path::new(path), read_only).and_then(|f| {
        if lock {
            lock_disk(&f, read_only)?;
        }
        Ok(f)
    });
    opened.map_err(|e| ConfigError(format!("cannot use disk '{path}': {e}")))
}

fn check_file(what: &str, path: &std::path::Path) -> Result<(), ConfigError> {
    if path.as_os_str().is_empty() {
        return err(format!("no {what} given"));
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => err(format!("{what} '{}' is not a regular file", path.display())),
        Err(e) => err(format!("cannot open {what} '{}': {e}", path.display())),
    }
}

/// Parses `--serial`: `stdout`, `off` (or `null`), or `file=PATH[,max=SIZE]` (a path with
/// commas is quoted: `file="/a,b.log"`).
pub fn parse_serial(value: &str) -> Result<SerialOutput, ConfigError> {
    match value {
        "stdout" => return Ok(SerialOutput::Stdout),
        "off" | "null" => return Ok(SerialOutput::Off),
        _ => {}
    }
    let e = |m: String| {
        ConfigError(format!(
            "--serial '{value}': {m} (expected stdout, off or file=PATH[,max=SIZE])"
        ))
    };
    let o = api::kv::parse(value, &["file", "max"]).map_err(|x| e(x.to_string()))?;
    let path = o.required("file").map_err(|x| e(x.to_string()))?;
    let max = match o.get("max") {
        Some(m) => parse_size(m).map_err(|x| e(x.0))?,
        None => DEFAULT_SERIAL_FILE_MAX,
    };
    Ok(SerialOutput::File {
        path: PathBuf::from(path),
        max,
    })
}

fn parse_order(value: &str) -> Result<Vec<PlaceKind>, ConfigError> {
    let mut out = Vec::new();
    for part in value.split(',') {
        let k: PlaceKind = part.trim().parse().map_err(|_| {
            ConfigError(format!(
                "--hotplug-order: unknown place '{}' (native, acpi or root)",
                part.trim()
            ))
        })?;
        if out.contains(&k) {
            return err(format!("--hotplug-order: '{}' given twice", part.trim()));
        }
        out.push(k);
    }
    Ok(out)
}

/// The default of `--acpi-root-slots`.
pub const DEFAULT_ACPI_ROOT_SLOTS: u8 = 2;

/// `--acpi-root-slots`: `all` or 0 to 31.
fn parse_acpi_root_slots(value: &str) -> Result<Option<u8>, ConfigError> {
    if value == "all" {
        return Ok(None);
    }
    match value.parse::<u8>() {
        Ok(n) if n <= 31 => Ok(Some(n)),
        _ => err(format!(
            "--acpi-root-slots '{value}' is not 'all' or a number from 0 to 31"
        )),
    }
}

fn parse_seconds(flag: &str, value: &str) -> Result<Duration, ConfigError> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0 && *s <= 3600.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| {
            ConfigError(format!(
                "{flag} '{value}' is not a number of seconds from 0 to 3600"
            ))
        })
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Build and boot the VM the options describe.
    Run(Box<VmConfig>),
    /// No VM yet: serve the API (`--api-socket` without `--kernel`) until
    /// `vm.create` brings one; only the process options are set.
    Serve(Box<VmConfig>),
    /// Print the configuration's JSON (`--print-config`) and exit.
    PrintConfig(Box<VmConfig>),
    Help,
    Version,
}

/// The `arbor --help` text.
pub const USAGE: &str = "\
usage: arbor --kernel PATH [options]
       arbor --api-socket PATH [--event-monitor ...]   (the VM comes by vm.create)
       arbor --kernel PATH [options] --print-config    (print the configuration's JSON)

  --kernel PATH        guest kernel: ELF vmlinux (PVH entry) or bzImage
  --initramfs PATH     initial ramdisk
  --cmdline STRING     kernel command line (default: console=ttyS0)
  --cpus N             number of vCPUs, 1-254 (default 1)
  --memory SIZE        guest memory, e.g. 512M or 2G; a plain number is MiB (default 512M)
  --serial WHERE       stdout (default), off, or file=PATH[,max=SIZE] (default max 16M)
  --disk OPTIONS       virtio-blk disk: path=FILE[,readonly=on][,serial=S][,id=ID]
                       [,port=ID][,pci_path=PATH][,function=F][,lock=off];
                       repeatable. The image is locked as QEMU locks it
                       (lock=off: not at all)
  --rng [OPTIONS]      virtio-rng device: [id=ID][,port=ID][,pci_path=PATH]
                       [,function=F]; repeatable
  --net OPTIONS        virtio-net NIC on an existing tap: tap=NAME|fd=N[,mac=MAC]
                       [,mtu=N][,id=ID][,port=ID][,pci_path=PATH][,function=F];
                       repeatable. fd=N: an open tap descriptor arbor inherited
  --vsock OPTIONS      virtio-vsock device: cid=N,socket=PATH[,id=ID][,port=ID]
                       [,pci_path=PATH][,function=F]; at most one. Host programs
                       connect to PATH and write \"CONNECT <port>\\n\"; guest
                       connections to host port P go to the UNIX socket PATH_P
  --user-device OPTIONS  the PCI function a vfio-user server serves:
                       socket=PATH[,id=ID][,port=ID][,pci_path=PATH][,function=F];
                       repeatable
  --device OPTIONS     a host PCI device bound to vfio-pci (kernel VFIO):
                       path=/sys/bus/pci/devices/DDDD:BB:DD.F[,id=ID][,port=ID]
                       [,pci_path=PATH][,function=F][,assigned=BDF+BDF]
                       [,unassigned=BDF+BDF]; repeatable. Takes every function
                       of the device and of its IOMMU groups but those named
                       unassigned (held from the host); a port of its own
                       per host group (function=F: a single function only)
  --pci-port OPTIONS   id=ID,type=root-port|switch|pci-bridge[,parent=ID]
                       [,hotplug=native|acpi|none][,downstream=N][,slot=N]
                       [,bus-reserve=N][,mem-reserve=SIZE][,pref64-reserve=SIZE]
                       [,io-reserve=SIZE]; repeatable
  --hotplug-order LIST automatic placement order of hot-plugged devices, a
                       permutation of native,acpi,root (default native,acpi,root)
  --acpi-root-slots N|all  how many of the root bus's free slots offer ACPI
                       hotplug, the highest-numbered ones (default 2; each
                       costs the guest time at boot)
  --api-socket PATH    serve the HTTP API on this UNIX socket
  --event-monitor path=FILE|fd=N
                       write the event stream (newline-delimited JSON) there
  --print-config       print the VM configuration as vm.create's JSON and exit
  --shutdown-grace S   seconds vm.shutdown waits after the power button (5)
  --remove-timeout S   seconds vm.remove-device waits for the guest (10)
  --seccomp MODE       on (default): a system call outside a thread's allow
                       list kills arbor (SIGSYS); log: only logged; off
  --allow-path DIR     API clients may name files under DIR (vm.add-disk);
                       repeatable. Without it they may name only the files
                       this command line names
  --landlock MODE      on (default: confine the process to the files named
                       here and the --allow-path directories where the
                       kernel has Landlock, warn where not), require
                       (refuse to start without Landlock), off
  --no-new-privs on|off  PR_SET_NO_NEW_PRIVS (default on)
  --capabilities drop|keep  drop every capability but CAP_DAC_OVERRIDE
                       before creating the VM (default drop)
  --help, --version

exit status: 0 guest powered off, 3 guest rebooted (or reset, e.g. a panic
with panic=-1), 1 VMM error, 2 usage error.

environment:
  ARBOR_LOG            log level on standard error: error, warn (default),
                       info, debug, trace or off, in any case. info shows
                       where devices were placed, hotplug requests and how
                       long the guest took, and guest power events
";

/// The options of a VM configuration: `--NAME` on the command line,
/// `"NAME"` in the JSON of `vm.create` and `--print-config`. A new VM
/// option is added here and in [`apply_option`] (and printed by
/// [`VmConfig::to_json`]): it is then a `vm.create` field as well, with
/// the same parsing and messages.
pub const VM_OPTIONS: &[&str] = &[
    "kernel",
    "initramfs",
    "cmdline",
    "cpus",
    "memory",
    "serial",
    "disk",
    "rng",
    "net",
    "pci-port",
    "hotplug-order",
    "acpi-root-slots",
    "shutdown-grace",
    "remove-timeout",
    "vsock",
    "user-device",
    "device",
];

/// Options that may be given more than once (arrays in JSON).
const REPEATABLE: &[&str] = &[
    "disk",
    "rng",
    "net",
    "pci-port",
    "allow-path",
    "user-device",
    "device",
];

/// Options of the `arbor` process rather than of a VM: command line only.
pub const PROCESS_OPTIONS: &[&str] = &[
    "api-socket",
    "event-monitor",
    "print-config",
    "seccomp",
    "allow-path",
    "landlock",
    "no-new-privs",
    "capabilities",
];

/// Applies one VM option (`name` without `--`) given as its command-line
/// text. The command line and `vm.create` both come here, so a value means
/// the same and is refused with the same message either way.
fn apply_option(cfg: &mut VmConfig, name: &str, value: String) -> Result<(), ConfigError> {
    match name {
        "kernel" => cfg.kernel = PathBuf::from(value),
        "initramfs" => cfg.initramfs = Some(PathBuf::from(value)),
        "cmdline" => cfg.cmdline = value,
        "cpus" => {
            cfg.cpus = value.parse().map_err(|_| {
                ConfigError(format!("--cpus '{value}' is not a number from 1 to 254"))
            })?
        }
        "memory" => cfg.memory = parse_memory(&value)?,
        "disk" => cfg
            .disks
            .push(DiskConfig::from_kv(&value).map_err(|e| ConfigError(format!("--disk: {e}")))?),
        "rng" => {
            let r = if value.is_empty() {
                RngConfig::default()
            } else {
                RngConfig::from_kv(&value).map_err(|e| ConfigError(format!("--rng: {e}")))?
            };
            cfg.rngs.push(r)
        }
        "net" => cfg
            .nets
            .push(NetConfig::from_kv(&value).map_err(|e| ConfigError(format!("--net: {e}")))?),
        "shutdown-grace" => cfg.shutdown_grace = parse_seconds("--shutdown-grace", &value)?,
        "remove-timeout" => cfg.remove_timeout = parse_seconds("--remove-timeout", &value)?,
        "pci-port" => cfg.ports.push(parse_port(&value)?),
        "hotplug-order" => cfg.placement_order = parse_order(&value)?,
        "acpi-root-slots" => cfg.acpi_root_slots = parse_acpi_root_slots(&value)?,
        "serial" => cfg.serial = parse_serial(&value)?,
        "vsock" => {
            cfg.vsock = Some(
                VsockConfig::from_kv(&value).map_err(|e| ConfigError(format!("--vsock: {e}")))?,
            )
        }
        "user-device" => cfg.user_devices.push(
            UserDeviceConfig::from_kv(&value)
                .map_err(|e| ConfigError(format!("--user-device: {e}")))?,
        ),
        "device" => {
            let d =
                DeviceConfig::from_kv(&value).map_err(|e| ConfigError(format!("--device: {e}")))?;
            d.validate()
                .map_err(|e| ConfigError(format!("--device: {}", e.message)))?;
            cfg.vfio_devices.push(d)
        }
        other => return err(format!("unknown option '--{other}' (see --help)")),
    }
    Ok(())
}

/// Parses `arbor`'s arguments (without the program name).
pub fn parse_args<I, S>(args: I) -> Result<Command, ConfigError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut cfg = VmConfig {
        seccomp: crate::seccomp::SeccompMode::On,
        ..VmConfig::default()
    };
    let mut it = args.into_iter().map(Into::into).peekable();
    let mut seen: Vec<String> = Vec::new();
    let mut print_config = false;
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        match flag.as_str() {
            "--help" | "-h" => return Ok(Command::Help),
            "--version" | "-V" => return Ok(Command::Version),
            _ => {}
        }
        let Some(name) = flag.strip_prefix("--") else {
            return err(format!("unexpected argument '{arg}' (see --help)"));
        };
        if !VM_OPTIONS.contains(&name) && !PROCESS_OPTIONS.contains(&name) {
            return err(format!("unknown option '{flag}' (see --help)"));
        }
        if seen.contains(&flag) && !REPEATABLE.contains(&name) {
            return err(format!("option '{flag}' given twice"));
        }
        seen.push(flag.clone());
        if name == "print-config" {
            if inline.is_some() {
                return err("--print-config takes no value");
            }
            print_config = true;
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None if flag == "--rng" => match it.peek() {
                Some(next) if !next.starts_with("--") => it.next().unwrap_or_default(),
                _ => String::new(),
            },
            None => it
                .next()
                .ok_or_else(|| ConfigError(format!("option '{flag}' needs a value")))?,
        };
        match name {
            "api-socket" => {
                if value.is_empty() {
                    return err("--api-socket needs a path");
                }
                cfg.api_socket = Some(PathBuf::from(value))
            }
            "seccomp" => {
                cfg.seccomp = value
                    .parse()
                    .map_err(|e| ConfigError(format!("--seccomp: {e}")))?
            }
            "allow-path" => {
                if value.is_empty() {
                    return err("--allow-path needs a directory");
                }
                cfg.allow_paths.push(PathBuf::from(value))
            }
            "landlock" => cfg.confine.landlock = crate::confine::parse_landlock(&value)?,
            "no-new-privs" => {
                cfg.confine.no_new_privs = crate::confine::parse_on_off(&flag, &value)?
            }
            "capabilities" => {
                cfg.confine.drop_capabilities = crate::confine::parse_capabilities(&value)?
            }
            "event-monitor" => cfg.event_monitor = Some(parse_event_monitor(&value)?),
            _ => apply_option(&mut cfg, name, value)?,
        }
    }
    let vm_options = seen
        .iter()
        .any(|f| VM_OPTIONS.contains(&&f[2..]) && f != "--kernel");
    // API clients' paths are always checked by `arbor`.
    cfg.check_paths = true;
    if cfg.kernel.as_os_str().is_empty() {
        // `arbor --api-socket PATH` alone: the VM comes later, by vm.create.
        if cfg.api_socket.is_some() && !vm_options && !print_config {
            return Ok(Command::Serve(Box::new(cfg)));
        }
        return err("--kernel is required");
    }
    if print_config {
        return Ok(Command::PrintConfig(Box::new(cfg)));
    }
    Ok(Command::Run(Box::new(cfg)))
}

/// Where `--event-monitor` writes the event stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventMonitor {
    /// A file, created or appended to.
    Path(PathBuf),
    /// A descriptor inherited from the parent.
    Fd(i32),
}

/// Parses `--event-monitor path=FILE|fd=N`.
pub fn parse_event_monitor(value: &str) -> Result<EventMonitor, ConfigError> {
    let e = |m: String| {
        ConfigError(format!(
            "--event-monitor '{value}': {m} (expected path=FILE or fd=N)"
        ))
    };
    let o = api::kv::parse(value, &["path", "fd"]).map_err(|x| e(x.to_string()))?;
    match (o.get("path"), o.get("fd")) {
        (Some(p), None) => Ok(EventMonitor::Path(PathBuf::from(p))),
        (None, Some(fd)) => fd
            .parse::<i32>()
            .ok()
            .filter(|n| *n >= 0)
            .map(EventMonitor::Fd)
            .ok_or_else(|| e(format!("fd '{fd}' is not a descriptor number"))),
        _ => Err(e("give exactly one of path and fd".into())),
    }
}

/// A value in an option string: quoted when it holds a comma.
fn kv_value(v: &str) -> String {
    if v.contains(',') || v.starts_with('"') {
        format!("\"{v}\"")
    } else {
        v.to_string()
    }
}

/// A size as the command line writes it: `512M`, `2G`, or bytes.
fn size_text(n: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if n != 0 && n.is_multiple_of(1u64 << shift) {
            return format!("{}{suffix}", n >> shift);
        }
    }
    // With a unit: a plain number is MiB for --memory.
    format!("{n}B")
}

/// The command-line text of a JSON scalar, for [`apply_option`].
fn scalar_text(name: &str, v: &serde_json::Value) -> Result<String, ConfigError> {
    match v {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        serde_json::Value::Array(items) if name == "hotplug-order" => {
            let parts: Result<Vec<String>, ConfigError> =
                items.iter().map(|i| scalar_text(name, i)).collect();
            Ok(parts?.join(","))
        }
        _ => err(format!("'{name}' must be a string or a number")),
    }
}

/// The option-string text of a JSON object of `key: value` pairs
/// (`{"id": "rp0", "type": "root-port"}` is `id=rp0,type=root-port`).
fn object_text(
    name: &str,
    o: &serde_json::Map<String, serde_json::Value>,
) -> Result<String, ConfigError> {
    let mut parts = Vec::new();
    // In the order the command line documents the keys, so messages that
    // quote the option read the same.
    let mut entries: Vec<(&String, &serde_json::Value)> = o.iter().collect();
    entries.sort_by_key(|(k, _)| PORT_KEYS.iter().position(|p| p == k).unwrap_or(usize::MAX));
    for (k, v) in entries {
        if v.is_null() {
            continue;
        }
        let text = match v {
            serde_json::Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
            other => scalar_text(&format!("{name}.{k}"), other)?,
        };
        parts.push(format!("{k}={}", kv_value(&text)));
    }
    Ok(parts.join(","))
}

impl VmConfig {
    /// Builds a configuration from the JSON of `vm.create` (or of
    /// `--print-config`): an object with one field per command-line
    /// option, named as the option without `--`, through the same parsing
    /// as the command line. A repeatable option is an array; `disk` and
    /// `rng` items are objects with the fields of `vm.add-disk` and
    /// `vm.add-rng` (or option strings), `pci-port` items objects with the
    /// keys of `--pci-port` (or option strings). Nothing is checked against
    /// the host here: see [`VmConfig::validate`].
    pub fn from_json(v: &serde_json::Value) -> Result<VmConfig, ConfigError> {
        let obj = v
            .as_object()
            .ok_or_else(|| ConfigError("the configuration must be a JSON object".into()))?;
        let mut cfg = VmConfig::default();
        for (name, value) in obj {
            if PROCESS_OPTIONS.contains(&name.as_str()) {
                return err(format!(
                    "'{name}' is an option of the arbor process (its command line), not of a VM"
                ));
            }
            if !VM_OPTIONS.contains(&name.as_str()) {
                return err(format!(
                    "unknown field '{name}' (the fields are the command-line options: {})",
                    VM_OPTIONS.join(", ")
                ));
            }
            if value.is_null() {
                continue;
            }
            if name == "vsock" && value.is_object() {
                cfg.vsock = Some(
                    serde_json::from_value(value.clone())
                        .map_err(|e| ConfigError(format!("--vsock: {e}")))?,
                );
                continue;
            }
            if !REPEATABLE.contains(&name.as_str()) {
                apply_option(&mut cfg, name, scalar_text(name, value)?)?;
                continue;
            }
            let items = value
                .as_array()
                .ok_or_else(|| ConfigError(format!("'{name}' must be an array")))?;
            for item in items {
                match (name.as_str(), item) {
                    (_, serde_json::Value::String(s)) => apply_option(&mut cfg, name, s.clone())?,
                    ("disk", serde_json::Value::Object(_)) => cfg.disks.push(
                        serde_json::from_value(item.clone())
                            .map_err(|e| ConfigError(format!("--disk: {e}")))?,
                    ),
                    ("rng", serde_json::Value::Object(_)) => cfg.rngs.push(
                        serde_json::from_value(item.clone())
                            .map_err(|e| ConfigError(format!("--rng: {e}")))?,
                    ),
                    ("device", serde_json::Value::Object(_)) => {
                        let d: DeviceConfig = serde_json::from_value(item.clone())
                            .map_err(|e| ConfigError(format!("--device: {e}")))?;
                        d.validate()
                            .map_err(|e| ConfigError(format!("--device: {}", e.message)))?;
                        cfg.vfio_devices.push(d)
                    }
                    ("user-device", serde_json::Value::Object(_)) => cfg.user_devices.push(
                        serde_json::from_value(item.clone())
                            .map_err(|e| ConfigError(format!("--user-device: {e}")))?,
                    ),
                    ("net", serde_json::Value::Object(_)) => cfg.nets.push(
                        serde_json::from_value(item.clone())
                            .map_err(|e| ConfigError(format!("--net: {e}")))?,
                    ),
                    (_, serde_json::Value::Object(o)) => {
                        apply_option(&mut cfg, name, object_text(name, o)?)?
                    }
                    _ => return err(format!("each '{name}' must be an object or a string")),
                }
            }
        }
        if cfg.kernel.as_os_str().is_empty() {
            return err("--kernel is required");
        }
        // A request must not name the VMM's own descriptors.
        if cfg.nets.iter().any(|n| n.fd.is_some()) {
            return err(
                "--net: 'fd' is not accepted in a VM configuration sent over the API \
                 (pass the tap with vm.add-net and SCM_RIGHTS instead)",
            );
        }
        Ok(cfg)
    }

    /// The JSON this configuration is (what `--print-config` prints and
    /// `vm.create` takes): every VM option with its value, defaults
    /// included; process options (`api-socket`, `event-monitor`) are left
    /// out. [`VmConfig::from_json`] gives the same configuration back.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::{json, Map, Value};
        let mut o = Map::new();
        o.insert("kernel".into(), json!(self.kernel.display().to_string()));
        if let Some(i) = &self.initramfs {
            o.insert("initramfs".into(), json!(i.display().to_string()));
        }
        o.insert("cmdline".into(), json!(self.cmdline));
        o.insert("cpus".into(), json!(self.cpus));
        o.insert("memory".into(), json!(size_text(self.memory)));
        let serial = match &self.serial {
            SerialOutput::Stdout => "stdout".to_string(),
            SerialOutput::Off => "off".to_string(),
            SerialOutput::File { path, max } => format!(
                "file={},max={}",
                kv_value(&path.display().to_string()),
                size_text(*max)
            ),
        };
        o.insert("serial".into(), json!(serial));
        // Fields left at their default (null) are left out.
        let object = |v: serde_json::Result<Value>| match v {
            Ok(Value::Object(mut m)) => {
                m.retain(|_, v| !v.is_null());
                Value::Object(m)
            }
            Ok(other) => other,
            Err(_) => Value::Null,
        };
        let disks: Vec<Value> = self
            .disks
            .iter()
            .map(|d| object(serde_json::to_value(d)))
            .collect();
        o.insert("disk".into(), Value::Array(disks));
        let rngs: Vec<Value> = self
            .rngs
            .iter()
            .map(|r| object(serde_json::to_value(r)))
            .collect();
        o.insert("rng".into(), Value::Array(rngs));
        let users: Vec<Value> = self
            .user_devices
            .iter()
            .map(|u| object(serde_json::to_value(u)))
            .collect();
        o.insert("user-device".into(), Value::Array(users));
        let vfio: Vec<Value> = self
            .vfio_devices
            .iter()
            .map(|d| object(serde_json::to_value(d)))
            .collect();
        o.insert("device".into(), Value::Array(vfio));
        let nets: Vec<Value> = self
            .nets
            .iter()
            .map(|n| object(serde_json::to_value(n)))
            .collect();
        o.insert("net".into(), Value::Array(nets));
        let ports: Vec<Value> = self.ports.iter().map(port_json).collect();
        o.insert("pci-port".into(), Value::Array(ports));
        let order: Vec<String> = self.placement_order.iter().map(|k| k.to_string()).collect();
        o.insert("hotplug-order".into(), json!(order.join(",")));
        o.insert(
            "acpi-root-slots".into(),
            match self.acpi_root_slots {
                Some(n) => json!(n),
                None => json!("all"),
            },
        );
        o.insert(
            "shutdown-grace".into(),
            json!(self.shutdown_grace.as_secs_f64()),
        );
        o.insert(
            "remove-timeout".into(),
            json!(self.remove_timeout.as_secs_f64()),
        );
        if let Some(v) = &self.vsock {
            o.insert("vsock".into(), object(serde_json::to_value(v)));
        }
        Value::Object(o)
    }
}

impl VmConfig {
    /// Makes every host path absolute from the working directory (what
    /// `--print-config` prints, so that the JSON means the same files to a
    /// VMM started elsewhere).
    pub fn absolutize(&mut self) {
        let abs = |p: &std::path::Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        if !self.kernel.as_os_str().is_empty() {
            self.kernel = abs(&self.kernel);
        }
        if let Some(i) = &self.initramfs {
            self.initramfs = Some(abs(i));
        }
        if let SerialOutput::File { path, .. } = &mut self.serial {
            *path = abs(path);
        }
        for d in &mut self.disks {
            if !d.path.is_empty() {
                if let Some(p) = abs(std::path::Path::new(&d.path)).to_str() {
                    d.path = p.to_string();
                }
            }
        }
        if let Some(v) = &mut self.vsock {
            if !v.socket.is_empty() {
                if let Some(p) = abs(std::path::Path::new(&v.socket)).to_str() {
                    v.socket = p.to_string();
                }
            }
        }
    }
}

/// A `--pci-port` as a JSON object with the option's keys.
fn port_json(p: &PortSpec) -> serde_json::Value {
    use serde_json::json;
    let mut o = serde_json::Map::new();
    o.insert("id".into(), json!(p.id));
    o.insert("type".into(), json!(p.kind.to_string()));
    if let Some(parent) = &p.parent {
        o.insert("parent".into(), json!(parent));
    }
    if let Some(h) = p.hotplug {
        o.insert("hotplug".into(), json!(h.to_string()));
    }
    if let PortKind::Switch { downstream } = p.kind {
        o.insert("downstream".into(), json!(downstream));
    }
    if let Some(s) = p.slot {
        o.insert("slot".into(), json!(s));
    }
    if let Some(b) = p.bus_reserve {
        o.insert("bus-reserve".into(), json!(b));
    }
    for (k, v) in [
        ("mem-reserve", p.mmio32_reserve),
        ("pref64-reserve", p.mmio64_reserve),
        ("io-reserve", p.io_reserve),
    ] {
        if let Some(v) = v {
            o.insert(k.into(), json!(size_text(v)));
        }
    }
    serde_json::Value::Object(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_option() {
        assert_eq!(parse_serial("stdout").unwrap(), SerialOutput::Stdout);
        assert_eq!(parse_serial("off").unwrap(), SerialOutput::Off);
        assert_eq!(parse_serial("null").unwrap(), SerialOutput::Off);
        assert_eq!(
            parse_serial("file=/tmp/c.log").unwrap(),
            SerialOutput::File {
                path: "/tmp/c.log".into(),
                max: DEFAULT_SERIAL_FILE_MAX
            }
        );
        assert_eq!(
            parse_serial("file=/tmp/c.log,max=64K").unwrap(),
            SerialOutput::File {
                path: "/tmp/c.log".into(),
                max: 64 << 10
            }
        );
        assert_eq!(
            parse_serial("file=\"/tmp/a,b\",max=0").unwrap(),
            SerialOutput::File {
                path: "/tmp/a,b".into(),
                max: 0
            }
        );
        for bad in [
            "",
            "tty",
            "file=",
            "max=1M",
            "file=/x,max=lots",
            "file=/x,size=1",
        ] {
            assert!(parse_serial(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999999T").is_err());
        // Guest memory: a plain number is MiB, as for QEMU's -m.
        assert_eq!(parse_memory("512").unwrap(), 512 << 20);
        assert_eq!(parse_memory(" 1G").unwrap(), 1 << 30);
        assert_eq!(parse_memory("4096B").unwrap(), 4096);
        assert!(parse_memory("").is_err());
        assert!(parse_memory("99999999999999999").is_err());
    }

    #[test]
    fn args() {
        let c = parse_args([
            "--kernel",
            "k",
            "--initramfs=i",
            "--cpus",
            "2",
            "--memory",
            "1G",
            "--serial",
            "file=/tmp/x",
            "--cmdline",
            "a b",
        ])
        .unwrap();
        let Command::Run(c) = c else { panic!() };
        assert_eq!(c.kernel, PathBuf::from("k"));
        assert_eq!(c.initramfs, Some(PathBuf::from("i")));
        assert_eq!(c.cpus, 2);
        assert_eq!(c.memory, 1 << 30);
        assert_eq!(c.serial, SerialOutput::file("/tmp/x"));
        assert_eq!(c.cmdline, "a b");
        assert_eq!(parse_args(["--help"]).unwrap(), Command::Help);
    }

    #[test]
    fn confinement_args() {
        use crate::confine::LandlockMode;
        let Command::Run(c) = parse_args(["--kernel", "k"]).unwrap() else {
            panic!()
        };
        assert!(c.check_paths, "arbor always checks API paths");
        assert!(c.allow_paths.is_empty());
        assert_eq!(c.confine, crate::confine::Options::default());
        assert_eq!(c.confine.landlock, LandlockMode::On);
        assert!(c.confine.no_new_privs && c.confine.drop_capabilities);
        let Command::Run(c) = parse_args([
            "--kernel",
            "k",
            "--allow-path",
            "/a",
            "--allow-path=/b",
            "--landlock=off",
            "--no-new-privs",
            "off",
            "--capabilities=keep",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            c.allow_paths,
            vec![PathBuf::from("/a"), PathBuf::from("/b")]
        );
        assert_eq!(c.confine.landlock, LandlockMode::Off);
        assert!(!c.confine.no_new_privs && !c.confine.drop_capabilities);
        for bad in [
            vec!["--kernel", "k", "--allow-path", ""],
            vec!["--kernel", "k", "--landlock=maybe"],
            vec!["--kernel", "k", "--landlock=on", "--landlock=off"],
            vec!["--kernel", "k", "--no-new-privs=yes"],
            vec!["--kernel", "k", "--capabilities=none"],
        ] {
            assert!(parse_args(bad.clone()).is_err(), "{bad:?}");
        }
        // An allowed directory must be one.
        assert!(VmConfig::default().allow_paths.is_empty());
        assert!(!VmConfig::default().check_paths);
        let dir = std::env::temp_dir().join(format!("arbor-cfg-allow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("k");
        std::fs::write(&k, b"x").unwrap();
        let with = |p: PathBuf| VmConfig {
            kernel: k.clone(),
            allow_paths: vec![p],
            ..Default::default()
        };
        assert!(with(dir.clone()).validate().is_ok());
        let e = with(k.clone()).validate().unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        let e = with(dir.join("missing"))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--allow-path") && e.contains("No such file"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_args() {
        for bad in [
            vec!["--cpus", "1"],
            vec!["--kernel"],
            vec!["--kernel", "k", "--bogus", "1"],
            vec!["--kernel", "k", "--cpus", "x"],
            vec!["--kernel", "k", "--cpus", "300"],
            vec!["--kernel", "k", "--kernel", "j"],
            vec!["--kernel", "k", "--serial", "tty"],
            vec!["--kernel", "k", "stray"],
        ] {
            assert!(parse_args(bad.clone()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn validation() {
        let dir = std::env::temp_dir().join(format!("arbor-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("k");
        std::fs::write(&k, b"x").unwrap();
        let ok = VmConfig {
            kernel: k.clone(),
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        let cases = [
            VmConfig {
                cpus: 0,
                ..ok.clone()
            },
            VmConfig {
                memory: 4 << 20,
                ..ok.clone()
            },
            VmConfig {
                memory: u64::MAX,
                ..ok.clone()
            },
            VmConfig {
                cmdline: "x".repeat(4096),
                ..ok.clone()
            },
            VmConfig {
                kernel: dir.join("missing"),
                ..ok.clone()
            },
            VmConfig {
                kernel: dir.clone(),
                ..ok.clone()
            },
            VmConfig {
                initramfs: Some(dir.join("missing")),
                ..ok.clone()
            },
        ];
        for c in cases {
            assert!(c.validate().is_err(), "{c:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn disks_that_cannot_be_disks() {
        let dir = std::env::temp_dir().join(format!("arbor-cfg-disk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("k");
        std::fs::write(&k, b"x").unwrap();
        let good = dir.join("good.img");
        std::fs::write(&good, [0u8; 1024]).unwrap();
        let empty = dir.join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        let odd = dir.join("odd.img");
        std::fs::write(&odd, [0u8; 1000]).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let with = |path: &std::path::Path, readonly: bool| VmConfig {
            kernel: k.clone(),
            disks: vec![DiskConfig {
                path: path.display().to_string(),
                readonly,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(with(&good, false).validate().is_ok());
        assert!(with(&good, true).validate().is_ok());
        for (path, ro, want) in [
            (&dir, true, "a directory"),
            (&fifo, true, "a FIFO"),
            (&fifo, false, "a FIFO"),
            (&empty, false, "empty"),
            (&odd, true, "(1000 bytes) is not a multiple of 512"),
            (&dir.join("missing"), false, "No such file"),
        ] {
            let e = with(path, ro).validate().unwrap_err().to_string();
            assert!(e.contains("cannot use disk") && e.contains(want), "{e}");
        }
        let e = with(std::path::Path::new("/dev/null"), true)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("a character device"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The command line and `vm.create` refuse the same inputs with the same
/// messages: every refusal of a command-line test here has a JSON twin.
#[cfg(test)]
mod json_tests {
    use super::*;
    use serde_json::{json, Value};

    /// Parse, then validate, as `arbor` does before building anything.
    fn cli(args: &[String]) -> Result<VmConfig, String> {
        match parse_args(args.iter().cloned()).map_err(|e| e.0)? {
            Command::Run(c) => c.validate().map(|_| *c).map_err(|e| e.0),
            other => Err(format!("unexpected {other:?}")),
        }
    }

    /// What `vm.create` does with a body before building anything.
    fn create(v: &Value) -> Result<VmConfig, String> {
        let c = VmConfig::from_json(v).map_err(|e| e.0)?;
        c.validate().map(|_| c).map_err(|e| e.0)
    }

    /// The JSON twin of a command line: `--NAME VALUE` is `"NAME": "VALUE"`,
    /// repeatable options are arrays of their option strings.
    fn twin(args: &[String]) -> Value {
        let mut o = serde_json::Map::new();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let name = flag.trim_start_matches("--").to_string();
            let value = it.next().cloned().unwrap_or_default();
            if REPEATABLE.contains(&name.as_str()) {
                o.entry(name)
                    .or_insert_with(|| Value::Array(Vec::new()))
                    .as_array_mut()
                    .unwrap()
                    .push(Value::String(value));
            } else {
                o.insert(name, Value::String(value));
            }
        }
        Value::Object(o)
    }

    struct Files {
        dir: PathBuf,
    }

    impl Files {
        fn new(tag: &str) -> Files {
            let dir =
                std::env::temp_dir().join(format!("arbor-cfg-json-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("k"), b"x").unwrap();
            std::fs::write(dir.join("good.img"), [0u8; 1024]).unwrap();
            std::fs::write(dir.join("empty.img"), b"").unwrap();
            std::fs::write(dir.join("odd.img"), [0u8; 1000]).unwrap();
            let fifo = std::ffi::CString::new(dir.join("fifo").to_str().unwrap()).unwrap();
            // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
            assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
            Files { dir }
        }

        fn p(&self, name: &str) -> String {
            self.dir.join(name).display().to_string()
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn net_options() {
        let f = Files::new("net");
        let k = f.p("k");
        let cfg = |args: &[&str]| {
            let mut v = vec!["--kernel", k.as_str()];
            v.extend_from_slice(args);
            match parse_args(v).unwrap() {
                Command::Run(c) => *c,
                _ => panic!("not a run"),
            }
        };
        let c = cfg(&["--net", "tap=tap0,mac=52:54:00:00:00:09,mtu=9000,id=n0"]);
        assert_eq!(c.nets[0].tap.as_deref(), Some("tap0"));
        assert_eq!(c.nets[0].mtu, Some(9000));
        // The JSON round trip keeps it; `fd` cannot come from a request.
        let back = VmConfig::from_json(&c.to_json()).unwrap();
        assert_eq!(back.nets, c.nets);
        let c = cfg(&["--net", "fd=7"]);
        let e = VmConfig::from_json(&c.to_json()).unwrap_err();
        assert!(e.0.contains("'fd' is not accepted"), "{e}");
        for bad in [&["--net", "fd=2"][..], &["--net", "fd=7", "--net", "fd=7"]] {
            let e = cfg(bad).validate().unwrap_err();
            assert!(e.0.contains("above 2, once"), "{e}");
        }
    }

    #[test]
    fn every_refusal_has_a_vm_create_twin() {
        let f = Files::new("every_refusa");
        let k = f.p("k");
        let dir = f.dir.display().to_string();
        let long = "x".repeat(3000);
        // (options after --kernel k, part of the expected message)
        let cases: Vec<(Vec<String>, &str)> = vec![
            (
                vec!["--cpus", "x"],
                "--cpus 'x' is not a number from 1 to 254",
            ),
            (vec!["--cpus", "300"], "--cpus '300' is not a number"),
            (vec!["--cpus", "0"], "--cpus must be at least 1"),
            (vec!["--cpus", "255"], "--cpus must be at most 254"),
            (vec!["--memory", "1M"], "too small"),
            (vec!["--memory", "4M"], "too small"),
            (vec!["--memory", "64T"], "more than this host has"),
            (vec!["--memory", "12Q"], "unknown suffix"),
            (vec!["--memory", "lots"], "invalid size"),
            (vec!["--cmdline", &long], "command line is 3000 bytes"),
            (
                vec!["--initramfs", "/nonexistent/initrd"],
                "cannot open initramfs",
            ),
            (vec!["--initramfs", &dir], "is not a regular file"),
            (vec!["--serial", "tty"], "--serial 'tty'"),
            (vec!["--serial", "file=/x,max=lots"], "--serial"),
            (vec!["--disk", &format!("path={dir}")], "a directory"),
            (
                vec!["--disk", &format!("path={},readonly=on", f.p("fifo"))],
                "a FIFO",
            ),
            (
                vec!["--disk", &format!("path={}", f.p("empty.img"))],
                "empty",
            ),
            (
                vec!["--disk", &format!("path={}", f.p("odd.img"))],
                "not a multiple of 512",
            ),
            (
                vec!["--disk", &format!("path={}", f.p("missing"))],
                "No such file",
            ),
            (
                vec!["--disk", "path=/dev/null,readonly=on"],
                "a character device",
            ),
            (
                vec!["--disk", "path=/x,ro=on"],
                "--disk: unknown option 'ro'",
            ),
            (
                vec!["--disk", "readonly=on"],
                "--disk: missing required option 'path'",
            ),
            (
                vec![
                    "--disk",
                    &format!("path={},id=a", f.p("good.img")),
                    "--rng",
                    "id=a",
                ],
                "device id 'a' is used twice",
            ),
            (
                vec!["--disk", &format!("path={},port=nowhere", f.p("good.img"))],
                "unknown port 'nowhere'",
            ),
            (
                vec![
                    "--disk",
                    &format!("path={}", f.p("good.img")),
                    "--disk",
                    &format!("path={},readonly=on", f.p("good.img")),
                ],
                "in use",
            ),
            (vec!["--rng", "pci_path=zz/zz"], "pci_path 'zz/zz'"),
            (
                vec!["--vsock", "cid=2,socket=/tmp/v"],
                "--vsock: 'cid' 2 is reserved",
            ),
            (
                vec!["--vsock", "cid=0,socket=/tmp/v"],
                "--vsock: 'cid' 0 is reserved",
            ),
            (
                vec!["--vsock", "cid=4294967295,socket=/tmp/v"],
                "--vsock: 'cid' 4294967295 is reserved",
            ),
            (
                vec!["--vsock", "cid=x,socket=/tmp/v"],
                "--vsock: invalid value 'x'",
            ),
            (
                vec!["--vsock", "socket=/tmp/v"],
                "--vsock: missing required option 'cid'",
            ),
            (
                vec!["--vsock", "cid=3"],
                "--vsock: missing required option 'socket'",
            ),
            (
                vec!["--vsock", "cid=3,socket=/tmp/v,id=a", "--rng", "id=a"],
                "device id 'a' is used twice",
            ),
            (
                vec!["--rng", "colour=red"],
                "--rng: unknown option 'colour'",
            ),
            (vec!["--net", "mac=52:54:00:00:00:01"], "needs 'tap'"),
            (vec!["--net", "tap=t0,mac=01:00:00:00:00:01"], "multicast"),
            (vec!["--net", "tap=t0,mac=52:54"], "invalid MAC address"),
            (vec!["--net", "tap=t0,mtu=67"], "MTU 67 is out of range"),
            (vec!["--net", "tap=t0,mtu=65536"], "out of range"),
            (
                vec!["--net", "tap=t0,speed=1"],
                "--net: unknown option 'speed'",
            ),
            (
                vec!["--net", "tap=a,id=n", "--rng", "id=n"],
                "device id 'n' is used twice",
            ),
            (
                vec!["--pci-port", "id=a,type=root-port,parent=ghost"],
                "ghost",
            ),
            (
                vec![
                    "--pci-port",
                    "id=a,type=pci-bridge,parent=b",
                    "--pci-port",
                    "id=b,type=pci-bridge,parent=a",
                ],
                "cycle",
            ),
            (
                vec![
                    "--pci-port",
                    "id=a,type=root-port",
                    "--pci-port",
                    "id=b,type=pci-bridge,parent=a",
                    "--pci-port",
                    "id=c,type=pci-bridge,parent=a",
                ],
                "PCI topology",
            ),
            (
                vec![
                    "--pci-port",
                    "id=a,type=root-port",
                    "--pci-port",
                    "id=a,type=root-port",
                ],
                "PCI topology",
            ),
            (
                vec![
                    "--pci-port",
                    "id=a,type=root-port",
                    "--pci-port",
                    "id=b,type=pci-bridge,parent=a,bus-reserve=254",
                    "--pci-port",
                    "id=c,type=pci-bridge,parent=b",
                ],
                "bus",
            ),
            (
                vec!["--pci-port", "id=a,type=switch,downstream=0"],
                "downstream",
            ),
            (vec!["--pci-port", "id=a,type=hub"], "unknown type 'hub'"),
            (
                vec!["--pci-port", "id=a,type=pci-bridge,hotplug=native"],
                "native",
            ),
            (
                vec!["--pci-port", "id=a,type=root-port,slot=99"],
                "slot '99'",
            ),
            (
                vec!["--hotplug-order", "native,sideways"],
                "unknown place 'sideways'",
            ),
            (vec!["--hotplug-order", "acpi,acpi"], "'acpi' given twice"),
            (
                vec!["--acpi-root-slots", "32"],
                "--acpi-root-slots '32' is not 'all' or a number from 0 to 31",
            ),
            (vec!["--acpi-root-slots", "-1"], "--acpi-root-slots '-1'"),
            (
                vec!["--acpi-root-slots", "some"],
                "--acpi-root-slots 'some'",
            ),
            (vec!["--shutdown-grace", "-1"], "--shutdown-grace '-1'"),
            (
                vec!["--remove-timeout", "forever"],
                "--remove-timeout 'forever'",
            ),
        ]
        .into_iter()
        .map(|(a, m)| (a.into_iter().map(String::from).collect(), m))
        .collect();
        for (opts, want) in &cases {
            let mut args = vec!["--kernel".to_string(), k.clone()];
            args.extend(opts.iter().cloned());
            let on_cli = cli(&args).expect_err(want);
            assert!(on_cli.contains(want), "{args:?}: {on_cli}");
            let body = twin(&args);
            let on_api = create(&body).expect_err(want);
            assert_eq!(on_api, on_cli, "{body}");
        }
        // One vsock: the command line refuses a second (JSON has one field).
        let twice: Vec<String> = ["--kernel", k.as_str(), "--vsock", "cid=3,socket=/tmp/v"]
            .iter()
            .chain(&["--vsock", "cid=4,socket=/tmp/w"])
            .map(|s| s.to_string())
            .collect();
        assert!(cli(&twice)
            .unwrap_err()
            .contains("option '--vsock' given twice"));
        // Kernels.
        for (kernel, want) in [
            ("/nonexistent/vmlinux", "cannot open kernel"),
            (dir.as_str(), "is not a regular file"),
        ] {
            let args = vec!["--kernel".to_string(), kernel.to_string()];
            let on_cli = cli(&args).unwrap_err();
            assert!(on_cli.contains(want), "{on_cli}");
            assert_eq!(create(&twin(&args)).unwrap_err(), on_cli);
        }
        assert_eq!(
            parse_args(Vec::<String>::new()).unwrap_err().0,
            VmConfig::from_json(&json!({})).unwrap_err().0
        );
    }

    #[test]
    fn typed_json_values_mean_the_same() {
        let f = Files::new("typed_json_v");
        let k = f.p("k");
        // Numbers for numbers, objects for devices and ports, arrays for
        // the order: the same values, the same messages.
        for (field, value, args) in [
            ("cpus", json!(0), vec!["--cpus", "0"]),
            ("cpus", json!(300), vec!["--cpus", "300"]),
            ("memory", json!(1), vec!["--memory", "1"]),
            (
                "shutdown-grace",
                json!(-1.5),
                vec!["--shutdown-grace", "-1.5"],
            ),
            (
                "pci-port",
                json!([{"id": "a", "type": "root-port", "parent": "ghost"}]),
                vec!["--pci-port", "id=a,type=root-port,parent=ghost"],
            ),
            (
                "pci-port",
                json!([{"id": "a", "type": "switch", "downstream": 0}]),
                vec!["--pci-port", "id=a,type=switch,downstream=0"],
            ),
            (
                "hotplug-order",
                json!(["acpi", "acpi"]),
                vec!["--hotplug-order", "acpi,acpi"],
            ),
        ] {
            let mut cli_args = vec!["--kernel".to_string(), k.clone()];
            cli_args.extend(args.iter().map(|s| s.to_string()));
            let on_cli = cli(&cli_args).unwrap_err();
            let body = json!({"kernel": k, field: value});
            assert_eq!(create(&body).unwrap_err(), on_cli, "{body}");
        }
        let disk = json!({"kernel": k, "disk": [{"path": f.p("odd.img"), "readonly": true}]});
        let on_cli = cli(&[
            "--kernel".into(),
            k.clone(),
            "--disk".into(),
            format!("path={},readonly=on", f.p("odd.img")),
        ])
        .unwrap_err();
        assert_eq!(create(&disk).unwrap_err(), on_cli);
        // What only JSON can get wrong names the field.
        for (body, want) in [
            (json!([1]), "must be a JSON object"),
            (json!({"kernel": k, "cpu": 1}), "unknown field 'cpu'"),
            (
                json!({"kernel": k, "api-socket": "/s"}),
                "'api-socket' is an option of the arbor process",
            ),
            (
                json!({"kernel": k, "disk": {"path": "/x"}}),
                "'disk' must be an array",
            ),
            (
                json!({"kernel": k, "cpus": true}),
                "'cpus' must be a string or a number",
            ),
            (
                json!({"kernel": k, "disk": [{"path": "/x", "ro": true}]}),
                "--disk: unknown field `ro`",
            ),
        ] {
            let e = VmConfig::from_json(&body).unwrap_err().0;
            assert!(e.contains(want), "{body}: {e}");
        }
    }

    #[test]
    fn print_config_round_trips() {
        let f = Files::new("print_config");
        let args: Vec<String> = [
            "--kernel",
            &f.p("k"),
            "--initramfs",
            &f.p("k"),
            "--cmdline",
            "console=ttyS0 a=b,c",
            "--cpus",
            "3",
            "--memory",
            "1536M",
            "--serial",
            "file=\"/tmp/a,b.log\",max=64K",
            "--disk",
            &format!(
                "path={},readonly=on,serial=S1,id=d0,pci_path=05,lock=off",
                f.p("good.img")
            ),
            "--rng",
            "id=r0,port=rp1",
            "--rng",
            "--vsock",
            "cid=7,socket=/tmp/arbor-v.sock,id=vs",
            "--pci-port",
            "id=rp0,type=root-port,hotplug=native,mem-reserve=16M",
            "--pci-port",
            "id=sw0,type=switch,parent=rp0,downstream=3,bus-reserve=4",
            "--pci-port",
            "id=br0,type=pci-bridge,slot=7,io-reserve=4K,pref64-reserve=1G",
            "--hotplug-order",
            "root,acpi",
            "--acpi-root-slots",
            "3",
            "--shutdown-grace",
            "2.5",
            "--remove-timeout",
            "30",
            "--user-device",
            &format!("socket={},id=g0,port=br0", f.p("k")),
            "--device",
            "path=/sys/bus/pci/devices/0000:03:00.0,id=nic0,port=rp1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let Command::Run(c) = parse_args(args.clone()).unwrap() else {
            panic!()
        };
        let json = c.to_json();
        // Process options (seccomp, allowed paths) come from the process's
        // policy, not from the JSON.
        let policy = ProcessPolicy::from_command_line(&c);
        let back = policy.admit(VmConfig::from_json(&json).unwrap()).unwrap();
        assert_eq!(back, *c, "{json:#}");
        // And through its text, as `--print-config` prints it.
        let text = serde_json::to_string_pretty(&json).unwrap();
        let again = VmConfig::from_json(&serde_json::from_str(&text).unwrap()).unwrap();
        assert_eq!(policy.admit(again).unwrap(), *c);
        assert_eq!(c.acpi_root_slots, Some(3));
        // `all` survives the round trip too.
        let mut all = (*c).clone();
        all.acpi_root_slots = None;
        let back = VmConfig::from_json(&all.to_json()).unwrap();
        assert_eq!(policy.admit(back).unwrap().acpi_root_slots, None);
        let mut args = args;
        args.push("--print-config".into());
        assert!(matches!(parse_args(args).unwrap(), Command::PrintConfig(_)));
    }

    /// `--acpi-root-slots` limits the root bus's ACPI hotplug slots to the
    /// highest free ones (2 by default); `all` keeps every free slot.
    #[test]
    fn acpi_root_slots_limit_the_plan() {
        let f = Files::new("acpi_root_slots");
        let plan = |extra: &[&str]| {
            let mut args = vec!["--kernel".to_string(), f.p("k")];
            args.extend(extra.iter().map(|s| s.to_string()));
            let Command::Run(c) = parse_args(args).unwrap() else {
                panic!()
            };
            pci::placement::HotplugPlan::new(&c.topology().unwrap(), &[])
                .root_slots()
                .to_vec()
        };
        assert_eq!(plan(&[]), vec![0x1e, 0x1f]);
        assert_eq!(
            plan(&["--acpi-root-slots", "all"]),
            (9..32).collect::<Vec<u8>>()
        );
        assert_eq!(plan(&["--acpi-root-slots", "0"]), Vec::<u8>::new());
        assert_eq!(
            plan(&["--acpi-root-slots", "8"]),
            (0x18..0x20).collect::<Vec<u8>>()
        );
    }

    #[test]
    fn vm_create_is_held_to_the_process_policy() {
        let f = Files::new("policy");
        let allowed = std::path::PathBuf::from(f.p("k"))
            .parent()
            .unwrap()
            .to_path_buf();
        let cli = parse_args([
            "--api-socket".to_string(),
            "/tmp/p.sock".into(),
            "--allow-path".into(),
            allowed.display().to_string(),
        ])
        .unwrap();
        let Command::Serve(cli) = cli else { panic!() };
        let policy = ProcessPolicy::from_command_line(&cli);
        // Inside the allowed directory: admitted, with the process's modes.
        let ok = policy
            .admit(VmConfig::from_json(&json!({"kernel": f.p("k")})).unwrap())
            .unwrap();
        assert_eq!(ok.seccomp, crate::seccomp::SeccompMode::On);
        assert!(ok.check_paths);
        assert_eq!(ok.allow_paths, vec![allowed.clone()]);
        // Each named file outside it is refused, naming the field.
        for (body, field) in [
            (json!({"kernel": "/etc/hostname"}), "kernel"),
            (
                json!({"kernel": f.p("k"), "initramfs": "/etc/hostname"}),
                "initramfs",
            ),
            (
                json!({"kernel": f.p("k"), "disk": [{"path": "/etc/shadow"}]}),
                "disk",
            ),
            (
                json!({"kernel": f.p("k"), "serial": "file=/etc/x.log"}),
                "serial",
            ),
        ] {
            let e = policy
                .admit(VmConfig::from_json(&body).unwrap())
                .unwrap_err()
                .0;
            assert!(e.starts_with(&format!("{field}: path '/etc/")), "{e}");
            assert!(e.contains("--allow-path"), "{e}");
        }
        // Embedders: no policy, nothing checked or changed.
        let free = ProcessPolicy::default()
            .admit(VmConfig::from_json(&json!({"kernel": "/etc/hostname"})).unwrap())
            .unwrap();
        assert!(!free.check_paths);
    }

    #[test]
    fn api_socket_alone_serves_without_a_vm() {
        let c = parse_args(["--api-socket", "/tmp/s.sock"]).unwrap();
        assert!(matches!(c, Command::Serve(_)), "{c:?}");
        let c = parse_args(["--api-socket", "/tmp/s", "--event-monitor", "fd=3"]).unwrap();
        let Command::Serve(c) = c else { panic!() };
        assert_eq!(c.event_monitor, Some(EventMonitor::Fd(3)));
        // VM options without a kernel still need one.
        let e = parse_args(["--api-socket", "/tmp/s", "--cpus", "2"]).unwrap_err();
        assert_eq!(e.0, "--kernel is required");
        for bad in ["", "fd=x", "fd=-1", "path=/a,fd=3", "file=/a"] {
            let e = parse_event_monitor(bad).unwrap_err();
            assert!(e.0.starts_with("--event-monitor"), "{bad}: {e}");
        }
        assert_eq!(
            parse_event_monitor("path=/tmp/ev").unwrap(),
            EventMonitor::Path("/tmp/ev".into())
        );
    }
}
