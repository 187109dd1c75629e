//! VM configuration: the struct an embedder fills in, and the `arbor`
//! command line that produces it. Validation happens here, before anything
//! is created, so a bad option changes nothing.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use api::types::{DiskConfig, RngConfig};
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

/// Everything needed to build and boot a VM.
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
    /// The PCI topology; empty means the default topology.
    pub ports: Vec<PortSpec>,
    /// Where automatically placed hot-plugged devices go first.
    pub placement_order: Vec<PlaceKind>,
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
            ports: Vec::new(),
            placement_order: PlaceKind::DEFAULT_ORDER.to_vec(),
            seccomp: crate::seccomp::SeccompMode::Off,
            allow_paths: Vec::new(),
            check_paths: false,
            confine: crate::confine::Options::default(),
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
        let topology = self.topology()?;
        let mut ids: Vec<&str> = Vec::new();
        // The checked disks stay open (and locked) until every one is
        // checked, so the same image given twice read-write is refused here.
        let mut _opened = Vec::new();
        for d in &self.disks {
            _opened.push(check_disk(&d.path, d.readonly, d.lock)?);
        }
        let given = self
            .disks
            .iter()
            .map(|d| (&d.id, &d.port, &d.pci_path))
            .chain(self.rngs.iter().map(|r| (&r.id, &r.port, &r.pci_path)));
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
/// native hotplug (`rp0`-`rp7`, root slots 01-08) and a PCIe-to-PCI bridge
/// with ACPI hotplug on the root bus (`br0`, slot 09); the root bus keeps
/// its other slots (ACPI hotplug too).
pub fn default_ports() -> Vec<PortSpec> {
    let mut v: Vec<PortSpec> = (0..8)
        .map(|i| PortSpec::new(format!("rp{i}"), PortKind::RootPort))
        .collect();
    v.push(PortSpec::new("br0", PortKind::PciBridge));
    v
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
        let opts = TopologyOptions::new((1..32).collect(), mmio32, mmio64, None);
        Topology::build(&specs, &opts).map_err(|e| ConfigError(format!("PCI topology: {e}")))
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
    Run(Box<VmConfig>),
    Help,
    Version,
}

/// The `arbor --help` text.
pub const USAGE: &str = "\
usage: arbor --kernel PATH [options]

  --kernel PATH        guest kernel: ELF vmlinux (PVH entry) or bzImage
  --initramfs PATH     initial ramdisk
  --cmdline STRING     kernel command line (default: console=ttyS0)
  --cpus N             number of vCPUs, 1-254 (default 1)
  --memory SIZE        guest memory, e.g. 512M or 2G (default 512M)
  --serial WHERE       stdout (default), off, or file=PATH[,max=SIZE] (default max 16M)
  --disk OPTIONS       virtio-blk disk: path=FILE[,readonly=on][,serial=S][,id=ID]
                       [,port=ID][,pci_path=PATH][,lock=off]; repeatable. The
                       image is locked as QEMU locks it (lock=off: not at all)
  --rng [OPTIONS]      virtio-rng device: [id=ID][,port=ID][,pci_path=PATH]; repeatable
  --pci-port OPTIONS   id=ID,type=root-port|switch|pci-bridge[,parent=ID]
                       [,hotplug=native|acpi|none][,downstream=N][,slot=N]
                       [,bus-reserve=N][,mem-reserve=SIZE][,pref64-reserve=SIZE]
                       [,io-reserve=SIZE]; repeatable
  --hotplug-order LIST automatic placement order of hot-plugged devices, a
                       permutation of native,acpi,root (default native,acpi,root)
  --api-socket PATH    serve the HTTP API on this UNIX socket
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
";

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
    let mut kernel = None;
    let mut it = args.into_iter().map(Into::into).peekable();
    let mut seen: Vec<String> = Vec::new();
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
        if !flag.starts_with("--") {
            return err(format!("unexpected argument '{arg}' (see --help)"));
        }
        let known = [
            "--kernel",
            "--initramfs",
            "--cmdline",
            "--cpus",
            "--memory",
            "--serial",
            "--api-socket",
            "--shutdown-grace",
            "--disk",
            "--rng",
            "--remove-timeout",
            "--pci-port",
            "--hotplug-order",
            "--seccomp",
            "--allow-path",
            "--landlock",
            "--no-new-privs",
            "--capabilities",
        ];
        if !known.contains(&flag.as_str()) {
            return err(format!("unknown option '{flag}' (see --help)"));
        }
        let repeatable =
            flag == "--disk" || flag == "--rng" || flag == "--pci-port" || flag == "--allow-path";
        if seen.contains(&flag) && !repeatable {
            return err(format!("option '{flag}' given twice"));
        }
        seen.push(flag.clone());
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
        match flag.as_str() {
            "--kernel" => kernel = Some(PathBuf::from(value)),
            "--initramfs" => cfg.initramfs = Some(PathBuf::from(value)),
            "--cmdline" => cfg.cmdline = value,
            "--cpus" => {
                cfg.cpus = value.parse().map_err(|_| {
                    ConfigError(format!("--cpus '{value}' is not a number from 1 to 254"))
                })?
            }
            "--memory" => cfg.memory = parse_size(&value)?,
            "--disk" => cfg.disks.push(
                DiskConfig::from_kv(&value).map_err(|e| ConfigError(format!("--disk: {e}")))?,
            ),
            "--rng" => {
                let r = if value.is_empty() {
                    RngConfig::default()
                } else {
                    RngConfig::from_kv(&value).map_err(|e| ConfigError(format!("--rng: {e}")))?
                };
                cfg.rngs.push(r)
            }
            "--api-socket" => {
                if value.is_empty() {
                    return err("--api-socket needs a path");
                }
                cfg.api_socket = Some(PathBuf::from(value))
            }
            "--shutdown-grace" => cfg.shutdown_grace = parse_seconds(&flag, &value)?,
            "--remove-timeout" => cfg.remove_timeout = parse_seconds(&flag, &value)?,
            "--pci-port" => cfg.ports.push(parse_port(&value)?),
            "--hotplug-order" => cfg.placement_order = parse_order(&value)?,
            "--serial" => cfg.serial = parse_serial(&value)?,
            "--seccomp" => {
                cfg.seccomp = value
                    .parse()
                    .map_err(|e| ConfigError(format!("--seccomp: {e}")))?
            }
            "--allow-path" => {
                if value.is_empty() {
                    return err("--allow-path needs a directory");
                }
                cfg.allow_paths.push(PathBuf::from(value))
            }
            "--landlock" => cfg.confine.landlock = crate::confine::parse_landlock(&value)?,
            "--no-new-privs" => {
                cfg.confine.no_new_privs = crate::confine::parse_on_off(&flag, &value)?
            }
            "--capabilities" => {
                cfg.confine.drop_capabilities = crate::confine::parse_capabilities(&value)?
            }
            _ => unreachable!("flag checked against the known list"),
        }
    }
    cfg.kernel = kernel.ok_or_else(|| ConfigError("--kernel is required".into()))?;
    cfg.check_paths = true;
    Ok(Command::Run(Box::new(cfg)))
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
