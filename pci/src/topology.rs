//! PCI Express topology: what firmware does before the OS runs.
//!
//! The VMM describes ports with [`PortSpec`]s (root ports, switches, PCI bridges and their
//! parents). [`Topology::build`] validates the tree and assigns, like firmware:
//!
//! - slots: root-level ports take the root bus slots given in
//!   [`TopologyOptions::root_slots`] in spec order (unless a slot is requested); anything
//!   below a PCI Express port (root port or switch downstream port) is device 0 of the
//!   port's secondary bus; a switch's downstream ports are devices 0..N-1 of its upstream
//!   port's secondary bus; a bridge below a PCI bridge takes the requested slot or the first
//!   free one from 1 to 31 (then 0), children and devices sharing the 32 slots;
//! - [`PciPath`]s, from the slots;
//! - bus numbers, depth-first in slot order (the order Linux scans in), with
//!   [`PortSpec::bus_reserve`] extra buses below a port;
//! - forwarding windows, carved from the top of the host windows: each port's window covers
//!   its children's windows plus its own reservation (the space for the devices in its open
//!   slots, see [`PortNode::reserve`]); memory windows have 1 MiB granularity, I/O windows
//!   4 KiB and exist only where an I/O reservation asks for one. Within a window, children
//!   and the own reservation are naturally aligned so a BAR as large as a reservation fits;
//! - physical slot numbers of the native hot-plug slots (unique).
//!
//! Switch `sw` is its upstream port; its downstream ports are `sw.0` .. `sw.{N-1}`, and
//! the switch spec's hotplug mode, reservations and physical slot number apply to them.
//! A `pci-bridge` under a PCI Express port (or on the root bus) is a PCIe-to-PCI bridge;
//! under a PCI bridge it is a conventional PCI bridge.
//!
//! [`Topology::create_devices`] then builds the [`PciePort`] devices, pre-programmed as
//! firmware leaves them (bus numbers, windows, memory/bus-master enables, presence of the
//! slots holding a child port), in the order they must be added to the [`PciRoot`].

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use crate::allocator::BarAllocator;
use crate::bus::{PciRoot, SharedPciDevice, NUM_SLOTS};
use crate::config::BridgeWindows;
use crate::interrupt::MsiInterruptGroup;
use crate::path::{PciPath, PciSlot};
use crate::port::{
    PciePort, PciePortKind, PciePortParams, IO_WINDOW_GRANULE, MAX_PHYSICAL_SLOT,
    MEM_WINDOW_GRANULE,
};
use crate::PciError;

/// Default number of downstream ports of a switch parsed from `"switch"`.
pub const DEFAULT_SWITCH_DOWNSTREAM: u8 = 4;
/// Most downstream ports a switch can have (devices of one bus).
pub const MAX_SWITCH_DOWNSTREAM: u8 = 32;
/// Default 32-bit non-prefetchable reservation of a port with open device slots.
pub const DEFAULT_MMIO32_RESERVE: u64 = 8 << 20;
/// Default 64-bit prefetchable reservation of a port with open device slots.
pub const DEFAULT_MMIO64_RESERVE: u64 = 64 << 20;
/// Default first physical slot number of native hot-plug slots (above the 0..31 used for
/// root bus slots).
pub const DEFAULT_FIRST_PHYSICAL_SLOT: u16 = 32;
/// Highest bus number.
pub const MAX_BUS: u16 = 255;

/// Port type of a [`PortSpec`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PortKind {
    /// A root port on the root bus (`root-port`).
    #[default]
    RootPort,
    /// A switch (`switch`): an upstream port and `downstream` downstream ports.
    Switch {
        /// Number of downstream ports, 1..=32.
        downstream: u8,
    },
    /// A PCI bridge (`pci-bridge`): PCIe-to-PCI below a PCI Express port or on the root
    /// bus, conventional below another PCI bridge.
    PciBridge,
}

impl FromStr for PortKind {
    type Err = TopologyError;

    /// `root-port`, `switch` (with [`DEFAULT_SWITCH_DOWNSTREAM`] downstream ports) or
    /// `pci-bridge`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "root-port" => Ok(PortKind::RootPort),
            "switch" => Ok(PortKind::Switch {
                downstream: DEFAULT_SWITCH_DOWNSTREAM,
            }),
            "pci-bridge" => Ok(PortKind::PciBridge),
            _ => Err(TopologyError::BadKind(s.to_string())),
        }
    }
}

impl fmt::Display for PortKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PortKind::RootPort => "root-port",
            PortKind::Switch { .. } => "switch",
            PortKind::PciBridge => "pci-bridge",
        })
    }
}

/// Hot-plug mechanism of a port's slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HotplugMode {
    /// PCI Express native hot-plug (slot registers + interrupt, Linux `pciehp`).
    Native,
    /// ACPI hot-plug (the VMM describes the slots in the DSDT, Linux `acpiphp`).
    Acpi,
    /// No hot-plug: devices can only be cold-plugged.
    None,
}

impl FromStr for HotplugMode {
    type Err = TopologyError;

    /// `native`, `acpi` or `none`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "native" => Ok(HotplugMode::Native),
            "acpi" => Ok(HotplugMode::Acpi),
            "none" => Ok(HotplugMode::None),
            _ => Err(TopologyError::BadHotplug(s.to_string())),
        }
    }
}

impl fmt::Display for HotplugMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HotplugMode::Native => "native",
            HotplugMode::Acpi => "acpi",
            HotplugMode::None => "none",
        })
    }
}

/// One port (or switch) requested by the user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortSpec {
    /// Unique id; a switch `sw` also defines `sw.0` .. `sw.{N-1}`.
    pub id: String,
    /// Port type.
    pub kind: PortKind,
    /// Parent port id; `None` for the root bus.
    pub parent: Option<String>,
    /// Hot-plug mode; default native for root ports and switch downstream ports, acpi for
    /// PCI bridges (a switch's mode applies to its downstream ports).
    pub hotplug: Option<HotplugMode>,
    /// Slot on the parent bus (root bus: must be one of the root slots; below a PCI Express
    /// port: 0; below a PCI bridge: 0..=31). For a switch: its upstream port's slot.
    pub slot: Option<u8>,
    /// Extra bus numbers below the port (default [`TopologyOptions::default_bus_reserve`]).
    pub bus_reserve: Option<u8>,
    /// 32-bit non-prefetchable reservation for devices in the port's open slots.
    pub mmio32_reserve: Option<u64>,
    /// 64-bit prefetchable reservation for devices in the port's open slots.
    pub mmio64_reserve: Option<u64>,
    /// I/O reservation; the port has an I/O window only if it or a descendant has one.
    pub io_reserve: Option<u64>,
    /// Physical slot number of the native hot-plug slot (a switch: of its first downstream
    /// port, the others following); default: allocated from
    /// [`TopologyOptions::first_physical_slot`].
    pub physical_slot: Option<u16>,
}

impl PortSpec {
    /// A spec with every option at its default.
    pub fn new(id: impl Into<String>, kind: PortKind) -> Self {
        PortSpec {
            id: id.into(),
            kind,
            ..Default::default()
        }
    }

    /// Set the parent.
    pub fn with_parent(mut self, parent: impl Into<String>) -> Self {
        self.parent = Some(parent.into());
        self
    }

    /// Set the hot-plug mode.
    pub fn with_hotplug(mut self, mode: HotplugMode) -> Self {
        self.hotplug = Some(mode);
        self
    }
}

/// Host resources and defaults for [`Topology::build`]. Windows are `(base, size)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopologyOptions {
    /// Root bus slots available to root-level ports, in assignment order.
    pub root_slots: Vec<u8>,
    /// Host 32-bit memory window (below 4 GiB).
    pub mmio32: (u64, u64),
    /// Host 64-bit memory window.
    pub mmio64: (u64, u64),
    /// Host I/O window, if any.
    pub io: Option<(u64, u64)>,
    /// Default extra buses below a port.
    pub default_bus_reserve: u8,
    /// Default 32-bit reservation of a port with open device slots.
    pub default_mmio32_reserve: u64,
    /// Default 64-bit reservation of a port with open device slots.
    pub default_mmio64_reserve: u64,
    /// Default I/O reservation of a port with open device slots (`None`: no I/O).
    pub default_io_reserve: Option<u64>,
    /// First physical slot number handed out to native hot-plug slots.
    pub first_physical_slot: u16,
    /// How many of the root bus's free slots offer ACPI hotplug (the
    /// highest-numbered ones); `None`: all of them.
    pub root_acpi_slots: Option<usize>,
}

impl TopologyOptions {
    /// Options with the given host resources and the default reservations (no extra bus,
    /// 8 MiB 32-bit, 64 MiB 64-bit, no I/O, physical slots from 32).
    pub fn new(
        root_slots: Vec<u8>,
        mmio32: (u64, u64),
        mmio64: (u64, u64),
        io: Option<(u64, u64)>,
    ) -> Self {
        TopologyOptions {
            root_slots,
            mmio32,
            mmio64,
            io,
            default_bus_reserve: 0,
            default_mmio32_reserve: DEFAULT_MMIO32_RESERVE,
            default_mmio64_reserve: DEFAULT_MMIO64_RESERVE,
            default_io_reserve: None,
            first_physical_slot: DEFAULT_FIRST_PHYSICAL_SLOT,
            root_acpi_slots: None,
        }
    }
}

/// Windows as `(base, size)`; `None` when absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortWindows {
    /// 32-bit non-prefetchable memory.
    pub mmio32: Option<(u64, u64)>,
    /// 64-bit prefetchable memory.
    pub mmio64: Option<(u64, u64)>,
    /// I/O.
    pub io: Option<(u64, u64)>,
}

impl PortWindows {
    /// As the inclusive ranges of a type 1 header ([`BridgeWindows`]).
    pub fn to_bridge_windows(&self) -> BridgeWindows {
        let r = |w: Option<(u64, u64)>| {
            w.filter(|(_, s)| *s > 0)
                .map(|(b, s)| (b, b.saturating_add(s - 1)))
        };
        BridgeWindows {
            io: r(self.io),
            mem: r(self.mmio32),
            prefetch: r(self.mmio64),
        }
    }
}

/// Host windows left to the root bus after the ports took theirs, `(base, size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostWindows {
    /// 32-bit memory.
    pub mmio32: (u64, u64),
    /// 64-bit memory.
    pub mmio64: (u64, u64),
    /// I/O.
    pub io: Option<(u64, u64)>,
}

/// A port as placed by [`Topology::build`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortNode {
    /// Id (`sw.N` for switch downstream ports; the switch id for its upstream port).
    pub id: String,
    /// Device kind.
    pub kind: PciePortKind,
    /// Hot-plug mode of the open slots ([`HotplugMode::None`] for switch upstream ports).
    pub hotplug: HotplugMode,
    /// Parent port id (`None`: root bus).
    pub parent: Option<String>,
    /// Child port ids, in slot order.
    pub children: Vec<String>,
    /// Path of the port function.
    pub path: PciPath,
    /// Primary bus.
    pub primary_bus: u8,
    /// Secondary bus.
    pub secondary_bus: u8,
    /// Subordinate bus.
    pub subordinate_bus: u8,
    /// Forwarding windows (cover the children's windows and the reservation).
    pub windows: PortWindows,
    /// The part of the windows reserved for devices in the open slots (the rest belongs to
    /// child ports); [`PortNode::bar_allocator`] allocates from it.
    pub reserve: PortWindows,
    /// Physical slot number of the native hot-plug slot.
    pub physical_slot: Option<u16>,
    /// Port number (Link Capabilities).
    pub port_number: u8,
    device_slots: Vec<u8>,
}

impl PortNode {
    /// Slots of the secondary bus open to devices (hot-plug per [`PortNode::hotplug`], or
    /// cold-plug): `[0]` for a PCI Express port without a child port, the slots not taken
    /// by child bridges for a PCI bridge, none for a switch upstream port.
    pub fn device_slots(&self) -> &[u8] {
        &self.device_slots
    }

    /// Whether the port has a native hot-plug slot.
    pub fn native_hotplug(&self) -> bool {
        self.hotplug == HotplugMode::Native && self.kind.is_downstream_port()
    }

    /// Path of function 0 of the device in `slot` of the secondary bus, if the slot is open.
    pub fn device_path(&self, slot: u8) -> Option<PciPath> {
        self.device_slots
            .contains(&slot)
            .then(|| self.path.child(PciSlot { slot, function: 0 }))
    }

    /// An allocator for the BARs of the devices in the open slots, over
    /// [`PortNode::reserve`], with the behind-a-bridge placement rules.
    pub fn bar_allocator(&self) -> Result<BarAllocator, PciError> {
        BarAllocator::behind_bridge(self.reserve.io, self.reserve.mmio32, self.reserve.mmio64)
    }

    /// The [`PciePort`] parameters of this node.
    pub fn port_params(&self) -> PciePortParams {
        let mut p = PciePortParams::new(self.kind);
        if self.native_hotplug() {
            p = p.with_native_hotplug(self.physical_slot.unwrap_or(0));
        }
        p.port_number = self.port_number;
        p.io_window = self.windows.io.is_some();
        p
    }
}

/// A port device created by [`Topology::create_devices`].
#[derive(Clone, Debug)]
pub struct PortDevice {
    /// Port id.
    pub id: String,
    /// Where to attach it.
    pub path: PciPath,
    /// The typed device (hot-plug events, slot state).
    pub port: Arc<Mutex<PciePort>>,
}

impl PortDevice {
    /// The device as the bus holds it.
    pub fn shared(&self) -> SharedPciDevice {
        self.port.clone()
    }
}

/// Errors of [`Topology::build`] and the topology queries.
/// The id of the root bus: `vm.info` names it, add requests take it as `port`; no port may
/// use it.
pub const ROOT_BUS_ID: &str = "root";

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopologyError {
    /// Unknown port type name.
    #[error("unknown port type '{0}' (expected root-port, switch or pci-bridge)")]
    BadKind(String),
    /// Unknown hot-plug mode name.
    #[error("unknown hotplug mode '{0}' (expected native, acpi or none)")]
    BadHotplug(String),
    /// Empty or malformed id.
    #[error(
        "invalid port id '{0}': an id must be non-empty and contain no ',', '=', '/' or whitespace"
    )]
    BadId(String),
    /// The id the root bus has (`vm.info`, `port` in add requests).
    #[error("port id '{0}' is reserved for the root bus")]
    ReservedId(String),
    /// Two ports with the same id.
    #[error("port id '{0}' is used more than once (a switch 'sw' also defines the ids 'sw.0', 'sw.1', ...)")]
    DuplicateId(String),
    /// The parent does not exist.
    #[error("port '{id}' names parent '{parent}', which is not a port")]
    UnknownParent {
        /// The port.
        id: String,
        /// The missing parent.
        parent: String,
    },
    /// The parent links form a cycle.
    #[error("ports form a parent cycle (each port's parent follows it): {}", cycle_text(.0))]
    Cycle(Vec<String>),
    /// The parent cannot hold this kind of port.
    #[error("port '{id}' cannot sit {}: {reason}", where_text(.parent))]
    InvalidParent {
        /// The port.
        id: String,
        /// The parent (`None`: root bus).
        parent: Option<String>,
        /// Why.
        reason: &'static str,
    },
    /// The parent has no room left.
    #[error("port '{id}' does not fit under '{parent}': {reason}")]
    ParentFull {
        /// The port.
        id: String,
        /// The parent.
        parent: String,
        /// Why.
        reason: &'static str,
    },
    /// More root-level ports than root slots.
    #[error("no root bus slot left for port '{id}' (only {available} root bus slots are available to ports)")]
    RootSlotsExhausted {
        /// The port.
        id: String,
        /// Number of root slots given.
        available: usize,
    },
    /// A root slot outside the available ones was requested.
    #[error("port '{id}' asks for root bus slot {slot}, which is not available to ports")]
    RootSlotUnavailable {
        /// The port.
        id: String,
        /// The slot.
        slot: u8,
    },
    /// A root slot number above 31 in the options.
    #[error("root bus slot {0} is out of range (slots are 0 to 31)")]
    InvalidRootSlot(u8),
    /// A slot requested twice.
    #[error("port '{id}' asks for slot {slot} {}, which port '{other}' already uses", where_text(.parent))]
    SlotTaken {
        /// The port.
        id: String,
        /// The slot.
        slot: u8,
        /// The parent (`None`: root bus).
        parent: Option<String>,
        /// The port already there.
        other: String,
    },
    /// A slot the parent bus cannot have.
    #[error("port '{id}' cannot use slot {slot}: {reason}")]
    BadSlot {
        /// The port.
        id: String,
        /// The slot.
        slot: u8,
        /// Why.
        reason: &'static str,
    },
    /// A switch with 0 or more than 32 downstream ports.
    #[error("switch '{id}' must have 1 to 32 downstream ports, not {count}")]
    BadDownstreamCount {
        /// The switch.
        id: String,
        /// The requested count.
        count: u8,
    },
    /// A hot-plug mode the port kind cannot provide.
    #[error("port '{id}' cannot use {mode} hotplug: a PCI bridge has no PCI Express slot (use acpi or none)")]
    UnsupportedHotplug {
        /// The port.
        id: String,
        /// The mode.
        mode: HotplugMode,
    },
    /// A physical slot number above 8191.
    #[error("port '{id}' cannot use physical slot number {slot} (the maximum is 8191)")]
    BadPhysicalSlot {
        /// The port.
        id: String,
        /// The number.
        slot: u32,
    },
    /// Two native slots with the same physical slot number.
    #[error("physical slot number {slot} is used by both '{first}' and '{second}'")]
    DuplicatePhysicalSlot {
        /// The number.
        slot: u16,
        /// First port.
        first: String,
        /// Second port.
        second: String,
    },
    /// More than 255 buses needed.
    #[error("bus numbers are exhausted at port '{id}': the topology needs more than 255 buses")]
    BusesExhausted {
        /// The first port without a bus.
        id: String,
    },
    /// A host window is too small.
    #[error("the host {window} window is too small for the ports: they need {needed:#x} bytes but it has {available:#x}")]
    WindowsExhausted {
        /// Which window.
        window: &'static str,
        /// Bytes needed (with alignment).
        needed: u64,
        /// Window size.
        available: u64,
    },
    /// An I/O reservation without a host I/O window.
    #[error("port '{id}' reserves I/O space but the host bridge has no I/O window")]
    NoIoWindow {
        /// The port.
        id: String,
    },
    /// A malformed host window.
    #[error(
        "the host {0} window is invalid (it wraps around, or the 32-bit window ends above 4 GiB)"
    )]
    BadHostWindow(&'static str),
    /// No such port.
    #[error("no port named '{0}'")]
    UnknownPort(String),
    /// The slot is not open for devices under that port.
    #[error("slot {slot} under port '{id}' is not open for devices")]
    SlotNotOpen {
        /// The port.
        id: String,
        /// The slot.
        slot: u8,
    },
    /// The path's parent is not a port of the topology.
    #[error("PCI path '{0}' is not below a port of the topology")]
    NotUnderPort(String),
    /// The path is a port.
    #[error("PCI path '{path}' is port '{id}' itself")]
    PathIsPort {
        /// The path.
        path: String,
        /// The port there.
        id: String,
    },
}

fn cycle_text(ids: &[String]) -> String {
    let mut s = ids.join(" -> ");
    if let Some(first) = ids.first() {
        s.push_str(" -> ");
        s.push_str(first);
    }
    s
}

fn where_text(parent: &Option<String>) -> String {
    match parent {
        Some(p) => format!("under '{p}'"),
        None => "on the root bus".to_string(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Root,
    SwitchUp,
    SwitchDown,
    Bridge,
}

#[derive(Clone, Debug)]
struct Draft {
    id: String,
    role: Role,
    hotplug: HotplugMode,
    parent_id: Option<String>,
    parent: Option<usize>,
    slot_req: Option<u8>,
    slot: u8,
    bus_reserve: Option<u8>,
    mmio32_reserve: Option<u64>,
    mmio64_reserve: Option<u64>,
    io_reserve: Option<u64>,
    psn_req: Option<u16>,
    port_number: u8,
    children: Vec<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Res {
    Mem32,
    Mem64,
    Io,
}

impl Res {
    const ALL: [Res; 3] = [Res::Mem32, Res::Mem64, Res::Io];

    fn granule(self) -> u64 {
        match self {
            Res::Io => IO_WINDOW_GRANULE,
            _ => MEM_WINDOW_GRANULE,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Res::Mem32 => "32-bit memory",
            Res::Mem64 => "64-bit memory",
            Res::Io => "I/O",
        }
    }

    fn set(self, w: &mut PortWindows, v: Option<(u64, u64)>) {
        match self {
            Res::Mem32 => w.mmio32 = v,
            Res::Mem64 => w.mmio64 = v,
            Res::Io => w.io = v,
        }
    }
}

/// Relative layout of one resource within a window.
#[derive(Clone, Debug, Default)]
struct Layout {
    size: u64,
    align: u64,
    /// Offsets of the children with a non-empty window, by node index.
    children: Vec<(usize, u64)>,
    /// Offset and size of the own reservation.
    own: Option<(u64, u64)>,
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    // `a` is a power of two.
    v.checked_add(a - 1).map(|x| x & !(a - 1))
}

fn pow2_floor(v: u64) -> u64 {
    if v == 0 {
        0
    } else {
        1 << (63 - v.leading_zeros())
    }
}

/// Lay out `items` (tag, size, align) in decreasing alignment order; `None` on overflow.
fn pack(items: &mut [(Option<usize>, u64, u64)], granule: u64) -> Option<Layout> {
    items.sort_by_key(|&(_, _, a)| std::cmp::Reverse(a));
    let mut layout = Layout {
        align: granule,
        ..Default::default()
    };
    let mut off = 0u64;
    for &(tag, size, align) in items.iter() {
        off = align_up(off, align)?;
        match tag {
            Some(child) => layout.children.push((child, off)),
            None => layout.own = Some((off, size)),
        }
        layout.align = layout.align.max(align);
        off = off.checked_add(size)?;
    }
    layout.size = align_up(off, granule)?;
    Some(layout)
}

/// The placed topology; see the module docs.
#[derive(Clone, Debug)]
pub struct Topology {
    nodes: Vec<PortNode>,
    by_id: HashMap<String, usize>,
    by_path: HashMap<PciPath, usize>,
    remaining: HostWindows,
    last_bus: u8,
    root_acpi_slots: Option<usize>,
}

impl Topology {
    /// Validate `specs` and place every port; see the module docs.
    pub fn build(specs: &[PortSpec], opts: &TopologyOptions) -> Result<Topology, TopologyError> {
        for &s in &opts.root_slots {
            if s >= NUM_SLOTS {
                return Err(TopologyError::InvalidRootSlot(s));
            }
        }
        let check = |name: &'static str, (b, s): (u64, u64), limit: u64| match b.checked_add(s) {
            Some(end) if end <= limit => Ok(()),
            _ => Err(TopologyError::BadHostWindow(name)),
        };
        check("32-bit memory", opts.mmio32, 1 << 32)?;
        check("64-bit memory", opts.mmio64, u64::MAX)?;
        if let Some(io) = opts.io {
            check("I/O", io, u64::MAX)?;
        }

        let mut drafts = Self::expand(specs)?;
        Self::resolve_parents(&mut drafts)?;
        Self::check_parents(&drafts)?;
        let roots = Self::assign_slots(&mut drafts, &opts.root_slots)?;
        let order = Self::dfs_order(&drafts, &roots);

        // Bus numbers, depth-first in slot order.
        let mut buses = vec![(0u8, 0u8, 0u8); drafts.len()];
        let mut next: u16 = 1;
        for &r in &roots {
            Self::number(&drafts, r, 0, &mut next, &mut buses, opts)?;
        }
        let last_bus = (next - 1) as u8;

        // Nodes in depth-first order.
        let mut index_of = vec![0usize; drafts.len()];
        for (pos, &d) in order.iter().enumerate() {
            index_of[d] = pos;
        }
        let mut nodes: Vec<PortNode> = Vec::with_capacity(order.len());
        let mut root_port_number = 0u8;
        for &d in &order {
            let dr = &drafts[d];
            let slot = PciSlot {
                slot: dr.slot,
                function: 0,
            };
            let path = match dr.parent {
                Some(p) => nodes[index_of[p]].path.child(slot),
                None => PciPath::root(slot),
            };
            let kind = match dr.role {
                Role::Root => PciePortKind::RootPort,
                Role::SwitchUp => PciePortKind::SwitchUpstream,
                Role::SwitchDown => PciePortKind::SwitchDownstream,
                Role::Bridge => match dr.parent.map(|p| drafts[p].role) {
                    Some(Role::Bridge) => PciePortKind::PciBridge,
                    _ => PciePortKind::PcieToPciBridge,
                },
            };
            let mut children = dr.children.clone();
            children.sort_by_key(|&c| drafts[c].slot);
            let child_slots: Vec<u8> = children.iter().map(|&c| drafts[c].slot).collect();
            let device_slots = match dr.role {
                Role::Root | Role::SwitchDown if children.is_empty() => vec![0],
                Role::Bridge => (0..NUM_SLOTS)
                    .filter(|s| !child_slots.contains(s))
                    .collect(),
                _ => Vec::new(),
            };
            let port_number = match dr.role {
                Role::Root => {
                    root_port_number = root_port_number.wrapping_add(1);
                    root_port_number - 1
                }
                _ => dr.port_number,
            };
            let (primary_bus, secondary_bus, subordinate_bus) = buses[d];
            nodes.push(PortNode {
                id: dr.id.clone(),
                kind,
                hotplug: dr.hotplug,
                parent: dr.parent.map(|p| drafts[p].id.clone()),
                children: children.iter().map(|&c| drafts[c].id.clone()).collect(),
                path,
                primary_bus,
                secondary_bus,
                subordinate_bus,
                windows: PortWindows::default(),
                reserve: PortWindows::default(),
                physical_slot: None,
                port_number,
                device_slots,
            });
        }
        // Parent/child links by node index.
        let parent_of: Vec<Option<usize>> = order
            .iter()
            .map(|&d| drafts[d].parent.map(|p| index_of[p]))
            .collect();
        let drafts_in_order: Vec<&Draft> = order.iter().map(|&d| &drafts[d]).collect();

        let remaining = Self::place_windows(&mut nodes, &parent_of, &drafts_in_order, opts)?;
        Self::assign_physical_slots(&mut nodes, &drafts_in_order, opts)?;

        let by_id = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id.clone(), i))
            .collect();
        let by_path = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.path.clone(), i))
            .collect();
        Ok(Topology {
            nodes,
            by_id,
            by_path,
            remaining,
            last_bus,
            root_acpi_slots: opts.root_acpi_slots,
        })
    }

    fn expand(specs: &[PortSpec]) -> Result<Vec<Draft>, TopologyError> {
        let mut drafts: Vec<Draft> = Vec::new();
        let mut ids: HashMap<String, usize> = HashMap::new();
        let mut add = |drafts: &mut Vec<Draft>, d: Draft| {
            if ids.insert(d.id.clone(), drafts.len()).is_some() {
                return Err(TopologyError::DuplicateId(d.id));
            }
            drafts.push(d);
            Ok(drafts.len() - 1)
        };
        for s in specs {
            if s.id.is_empty()
                || s.id
                    .chars()
                    .any(|c| c.is_whitespace() || matches!(c, ',' | '=' | '/'))
            {
                return Err(TopologyError::BadId(s.id.clone()));
            }
            if s.id == ROOT_BUS_ID {
                return Err(TopologyError::ReservedId(s.id.clone()));
            }
            if let Some(psn) = s.physical_slot {
                if psn > MAX_PHYSICAL_SLOT {
                    return Err(TopologyError::BadPhysicalSlot {
                        id: s.id.clone(),
                        slot: u32::from(psn),
                    });
                }
            }
            let base = Draft {
                id: s.id.clone(),
                role: Role::Root,
                hotplug: HotplugMode::Native,
                parent_id: s.parent.clone(),
                parent: None,
                slot_req: s.slot,
                slot: 0,
                bus_reserve: s.bus_reserve,
                mmio32_reserve: s.mmio32_reserve,
                mmio64_reserve: s.mmio64_reserve,
                io_reserve: s.io_reserve,
                psn_req: s.physical_slot,
                port_number: 0,
                children: Vec::new(),
            };
            match s.kind {
                PortKind::RootPort => {
                    add(
                        &mut drafts,
                        Draft {
                            hotplug: s.hotplug.unwrap_or(HotplugMode::Native),
                            ..base
                        },
                    )?;
                }
                PortKind::PciBridge => {
                    let hotplug = s.hotplug.unwrap_or(HotplugMode::Acpi);
                    if hotplug == HotplugMode::Native {
                        return Err(TopologyError::UnsupportedHotplug {
                            id: s.id.clone(),
                            mode: hotplug,
                        });
                    }
                    add(
                        &mut drafts,
                        Draft {
                            role: Role::Bridge,
                            hotplug,
                            ..base
                        },
                    )?;
                }
                PortKind::Switch { downstream } => {
                    if downstream == 0 || downstream > MAX_SWITCH_DOWNSTREAM {
                        return Err(TopologyError::BadDownstreamCount {
                            id: s.id.clone(),
                            count: downstream,
                        });
                    }
                    let hotplug = s.hotplug.unwrap_or(HotplugMode::Native);
                    let up = add(
                        &mut drafts,
                        Draft {
                            role: Role::SwitchUp,
                            hotplug: HotplugMode::None,
                            bus_reserve: None,
                            mmio32_reserve: None,
                            mmio64_reserve: None,
                            io_reserve: None,
                            psn_req: None,
                            ..base.clone()
                        },
                    )?;
                    for j in 0..downstream {
                        let psn = match s.physical_slot {
                            Some(p) => {
                                let n = u32::from(p) + u32::from(j);
                                if n > u32::from(MAX_PHYSICAL_SLOT) {
                                    return Err(TopologyError::BadPhysicalSlot {
                                        id: format!("{}.{j}", s.id),
                                        slot: n,
                                    });
                                }
                                Some(n as u16)
                            }
                            None => None,
                        };
                        let d = add(
                            &mut drafts,
                            Draft {
                                id: format!("{}.{j}", s.id),
                                role: Role::SwitchDown,
                                hotplug,
                                parent_id: Some(s.id.clone()),
                                parent: Some(up),
                                slot_req: Some(j),
                                psn_req: psn,
                                port_number: j,
                                ..base.clone()
                            },
                        )?;
                        drafts[up].children.push(d);
                    }
                }
            }
        }
        Ok(drafts)
    }

    fn resolve_parents(drafts: &mut [Draft]) -> Result<(), TopologyError> {
        let ids: HashMap<String, usize> = drafts
            .iter()
            .enumerate()
            .map(|(i, d)| (d.id.clone(), i))
            .collect();
        for d in drafts.iter_mut() {
            if d.role == Role::SwitchDown {
                continue;
            }
            if let Some(pid) = &d.parent_id {
                let p = *ids.get(pid).ok_or_else(|| TopologyError::UnknownParent {
                    id: d.id.clone(),
                    parent: pid.clone(),
                })?;
                d.parent = Some(p);
            }
        }
        // Cycles: walk up from every port.
        for i in 0..drafts.len() {
            let mut seen: Vec<usize> = Vec::new();
            let mut cur = Some(i);
            while let Some(c) = cur {
                if let Some(pos) = seen.iter().position(|&x| x == c) {
                    // Child -> parent order, starting from the member defined first.
                    let members = &seen[pos..];
                    let first = (0..members.len()).min_by_key(|&k| members[k]).unwrap_or(0);
                    let mut cycle: Vec<String> =
                        members.iter().map(|&x| drafts[x].id.clone()).collect();
                    cycle.rotate_left(first);
                    return Err(TopologyError::Cycle(cycle));
                }
                seen.push(c);
                cur = drafts[c].parent;
            }
        }
        for i in 0..drafts.len() {
            if drafts[i].role != Role::SwitchDown {
                if let Some(p) = drafts[i].parent {
                    drafts[p].children.push(i);
                }
            }
        }
        Ok(())
    }

    fn check_parents(drafts: &[Draft]) -> Result<(), TopologyError> {
        for d in drafts {
            if d.role == Role::SwitchDown {
                continue;
            }
            let parent_role = d.parent.map(|p| drafts[p].role);
            let reason = match (d.role, parent_role) {
                (_, Some(Role::SwitchUp)) => Some(
                    "a switch upstream port only holds its own downstream ports (name one of them, e.g. 'sw.0')",
                ),
                (Role::Root, Some(_)) => {
                    Some("a root port sits on the root bus and cannot have a parent")
                }
                (Role::SwitchUp, None) | (Role::SwitchUp, Some(Role::Bridge)) => {
                    Some("a switch must sit below a root port or a switch downstream port")
                }
                _ => None,
            };
            if let Some(reason) = reason {
                return Err(TopologyError::InvalidParent {
                    id: d.id.clone(),
                    parent: d.parent_id.clone(),
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Assign slots; returns the root-level drafts sorted by slot.
    fn assign_slots(drafts: &mut [Draft], root_slots: &[u8]) -> Result<Vec<usize>, TopologyError> {
        // Slots taken per parent (None = root bus).
        let mut taken: HashMap<Option<usize>, Vec<(u8, usize)>> = HashMap::new();
        let user = |d: &Draft| d.role != Role::SwitchDown;
        // Pass 1: requested slots (and the fixed ones of downstream ports).
        for i in 0..drafts.len() {
            let parent = drafts[i].parent;
            let Some(slot) = drafts[i].slot_req else {
                continue;
            };
            let id = drafts[i].id.clone();
            let parent_role = parent.map(|p| drafts[p].role);
            match parent_role {
                None if !root_slots.contains(&slot) => {
                    return Err(TopologyError::RootSlotUnavailable { id, slot });
                }
                None => {}
                Some(Role::Root | Role::SwitchDown) if user(&drafts[i]) && slot != 0 => {
                    return Err(TopologyError::BadSlot {
                        id,
                        slot,
                        reason: "below a PCI Express port only device 0 exists",
                    });
                }
                Some(_) if slot >= NUM_SLOTS => {
                    return Err(TopologyError::BadSlot {
                        id,
                        slot,
                        reason: "slots are 0 to 31",
                    });
                }
                _ => {}
            }
            let list = taken.entry(parent).or_default();
            if let Some(&(_, other)) = list.iter().find(|(s, _)| *s == slot) {
                return Err(Self::slot_conflict(drafts, i, slot, other));
            }
            list.push((slot, i));
            drafts[i].slot = slot;
        }
        // Pass 2: free slots in spec order.
        for i in 0..drafts.len() {
            if drafts[i].slot_req.is_some() {
                continue;
            }
            let parent = drafts[i].parent;
            let list = taken.entry(parent).or_default();
            let used = |s: u8| list.iter().any(|(x, _)| *x == s);
            let slot = match parent.map(|p| drafts[p].role) {
                None => root_slots
                    .iter()
                    .copied()
                    .find(|&s| !used(s))
                    .ok_or_else(|| TopologyError::RootSlotsExhausted {
                        id: drafts[i].id.clone(),
                        available: root_slots.len(),
                    })?,
                Some(Role::Root | Role::SwitchDown) => {
                    if used(0) {
                        return Err(Self::full(drafts, i));
                    }
                    0
                }
                _ => (1..NUM_SLOTS)
                    .chain(std::iter::once(0))
                    .find(|&s| !used(s))
                    .ok_or_else(|| Self::full(drafts, i))?,
            };
            list.push((slot, i));
            drafts[i].slot = slot;
        }
        let mut roots: Vec<usize> = (0..drafts.len())
            .filter(|&i| drafts[i].parent.is_none())
            .collect();
        roots.sort_by_key(|&i| drafts[i].slot);
        Ok(roots)
    }

    fn slot_conflict(drafts: &[Draft], i: usize, slot: u8, other: usize) -> TopologyError {
        let d = &drafts[i];
        let parent_role = d.parent.map(|p| drafts[p].role);
        if matches!(parent_role, Some(Role::Root | Role::SwitchDown)) {
            return Self::pcie_port_full(d);
        }
        TopologyError::SlotTaken {
            id: d.id.clone(),
            slot,
            parent: d.parent_id.clone(),
            other: drafts[other].id.clone(),
        }
    }

    fn pcie_port_full(d: &Draft) -> TopologyError {
        TopologyError::ParentFull {
            id: d.id.clone(),
            parent: d.parent_id.clone().unwrap_or_default(),
            reason: "a PCI Express port has a single device slot and another port already uses it",
        }
    }

    fn full(drafts: &[Draft], i: usize) -> TopologyError {
        let d = &drafts[i];
        match d.parent.map(|p| drafts[p].role) {
            Some(Role::Bridge) => TopologyError::ParentFull {
                id: d.id.clone(),
                parent: d.parent_id.clone().unwrap_or_default(),
                reason: "all 32 slots of its bus are taken",
            },
            _ => Self::pcie_port_full(d),
        }
    }

    fn dfs_order(drafts: &[Draft], roots: &[usize]) -> Vec<usize> {
        let mut order = Vec::with_capacity(drafts.len());
        let mut stack: Vec<usize> = roots.iter().rev().copied().collect();
        while let Some(i) = stack.pop() {
            order.push(i);
            let mut kids = drafts[i].children.clone();
            kids.sort_by_key(|&c| drafts[c].slot);
            stack.extend(kids.into_iter().rev());
        }
        order
    }

    fn number(
        drafts: &[Draft],
        i: usize,
        primary: u8,
        next: &mut u16,
        buses: &mut [(u8, u8, u8)],
        opts: &TopologyOptions,
    ) -> Result<(), TopologyError> {
        let exhausted = || TopologyError::BusesExhausted {
            id: drafts[i].id.clone(),
        };
        let secondary = *next;
        if secondary > MAX_BUS {
            return Err(exhausted());
        }
        *next += 1;
        let mut kids = drafts[i].children.clone();
        kids.sort_by_key(|&c| drafts[c].slot);
        for c in kids {
            Self::number(drafts, c, secondary as u8, next, buses, opts)?;
        }
        let reserve = drafts[i].bus_reserve.unwrap_or(opts.default_bus_reserve);
        let reserve = if drafts[i].role == Role::SwitchUp {
            0
        } else {
            reserve
        };
        let sub = (*next - 1).max(secondary + u16::from(reserve));
        if sub > MAX_BUS {
            return Err(exhausted());
        }
        *next = sub + 1;
        buses[i] = (primary, secondary as u8, sub as u8);
        Ok(())
    }

    fn own_reserve(node: &PortNode, d: &Draft, res: Res, opts: &TopologyOptions) -> u64 {
        if node.kind == PciePortKind::SwitchUpstream {
            return 0;
        }
        let open = !node.device_slots.is_empty();
        match res {
            Res::Mem32 => {
                d.mmio32_reserve
                    .unwrap_or(if open { opts.default_mmio32_reserve } else { 0 })
            }
            Res::Mem64 => {
                d.mmio64_reserve
                    .unwrap_or(if open { opts.default_mmio64_reserve } else { 0 })
            }
            Res::Io => d
                .io_reserve
                .or(if open { opts.default_io_reserve } else { None })
                .unwrap_or(0),
        }
    }

    fn place_windows(
        nodes: &mut [PortNode],
        parent_of: &[Option<usize>],
        drafts: &[&Draft],
        opts: &TopologyOptions,
    ) -> Result<HostWindows, TopologyError> {
        let mut remaining = HostWindows {
            mmio32: opts.mmio32,
            mmio64: opts.mmio64,
            io: opts.io,
        };
        let mut kids: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
        for (c, p) in parent_of.iter().enumerate() {
            if let Some(p) = p {
                kids[*p].push(c);
            }
        }
        for res in Res::ALL {
            let granule = res.granule();
            let host = match res {
                Res::Mem32 => Some(opts.mmio32),
                Res::Mem64 => Some(opts.mmio64),
                Res::Io => opts.io,
            };
            let overflow = |needed: u64| TopologyError::WindowsExhausted {
                window: res.name(),
                needed,
                available: host.map(|h| h.1).unwrap_or(0),
            };
            // Bottom-up sizes (children come after their parent in depth-first order).
            let mut layouts: Vec<Layout> = vec![Layout::default(); nodes.len()];
            for i in (0..nodes.len()).rev() {
                let mut items: Vec<(Option<usize>, u64, u64)> = kids[i]
                    .iter()
                    .filter(|&&c| layouts[c].size > 0)
                    .map(|&c| (Some(c), layouts[c].size, layouts[c].align))
                    .collect();
                let own = Self::own_reserve(&nodes[i], drafts[i], res, opts);
                if own > 0 {
                    let size = align_up(own, granule).ok_or_else(|| overflow(own))?;
                    let align = if res == Res::Io {
                        granule
                    } else {
                        pow2_floor(size).max(granule)
                    };
                    items.push((None, size, align));
                }
                layouts[i] = pack(&mut items, granule).ok_or_else(|| overflow(u64::MAX))?;
            }
            // The root-level block.
            let mut items: Vec<(Option<usize>, u64, u64)> = (0..nodes.len())
                .filter(|&i| parent_of[i].is_none() && layouts[i].size > 0)
                .map(|i| (Some(i), layouts[i].size, layouts[i].align))
                .collect();
            let block = pack(&mut items, granule).ok_or_else(|| overflow(u64::MAX))?;
            if block.size == 0 {
                continue;
            }
            let Some((hbase, hsize)) = host else {
                let first = (0..nodes.len())
                    .find(|&i| Self::own_reserve(&nodes[i], drafts[i], res, opts) > 0)
                    .map(|i| nodes[i].id.clone())
                    .unwrap_or_default();
                return Err(TopologyError::NoIoWindow { id: first });
            };
            let exhausted = TopologyError::WindowsExhausted {
                window: res.name(),
                needed: block.size,
                available: hsize,
            };
            // Host windows were checked not to wrap.
            let end = hbase + hsize;
            let base = end
                .checked_sub(block.size)
                .map(|b| b & !(block.align - 1))
                .filter(|&b| b >= hbase)
                .ok_or(exhausted)?;
            let rem = (hbase, base - hbase);
            match res {
                Res::Mem32 => remaining.mmio32 = rem,
                Res::Mem64 => remaining.mmio64 = rem,
                Res::Io => remaining.io = Some(rem),
            }
            // Top-down absolute addresses.
            let mut bases: Vec<Option<u64>> = vec![None; nodes.len()];
            for &(c, off) in &block.children {
                bases[c] = Some(base + off);
            }
            for i in 0..nodes.len() {
                let Some(b) = bases[i] else {
                    continue;
                };
                res.set(&mut nodes[i].windows, Some((b, layouts[i].size)));
                if let Some((off, size)) = layouts[i].own {
                    res.set(&mut nodes[i].reserve, Some((b + off, size)));
                }
                for &(c, off) in &layouts[i].children {
                    bases[c] = Some(b + off);
                }
            }
        }
        Ok(remaining)
    }

    fn assign_physical_slots(
        nodes: &mut [PortNode],
        drafts: &[&Draft],
        opts: &TopologyOptions,
    ) -> Result<(), TopologyError> {
        let mut used: HashMap<u16, String> = HashMap::new();
        for (i, n) in nodes.iter_mut().enumerate() {
            if !n.native_hotplug() {
                continue;
            }
            if let Some(psn) = drafts[i].psn_req {
                if let Some(first) = used.get(&psn) {
                    return Err(TopologyError::DuplicatePhysicalSlot {
                        slot: psn,
                        first: first.clone(),
                        second: n.id.clone(),
                    });
                }
                used.insert(psn, n.id.clone());
                n.physical_slot = Some(psn);
            }
        }
        let mut next = u32::from(opts.first_physical_slot);
        for n in nodes.iter_mut() {
            if !n.native_hotplug() || n.physical_slot.is_some() {
                continue;
            }
            while next <= u32::from(MAX_PHYSICAL_SLOT) && used.contains_key(&(next as u16)) {
                next += 1;
            }
            if next > u32::from(MAX_PHYSICAL_SLOT) {
                return Err(TopologyError::BadPhysicalSlot {
                    id: n.id.clone(),
                    slot: next,
                });
            }
            used.insert(next as u16, n.id.clone());
            n.physical_slot = Some(next as u16);
            next += 1;
        }
        Ok(())
    }

    /// All ports, parents before children (depth-first in slot order), which is the order
    /// to attach them in.
    pub fn ports(&self) -> &[PortNode] {
        &self.nodes
    }

    /// Whether there are no ports.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The port named `id`.
    pub fn port(&self, id: &str) -> Option<&PortNode> {
        self.by_id.get(id).map(|&i| &self.nodes[i])
    }

    /// The port whose function is at `path`.
    pub fn port_at_path(&self, path: &PciPath) -> Option<&PortNode> {
        self.by_path.get(path).map(|&i| &self.nodes[i])
    }

    /// Path of function 0 of the device in `slot` below port `port_id`.
    pub fn device_path(&self, port_id: &str, slot: u8) -> Result<PciPath, TopologyError> {
        let node = self
            .port(port_id)
            .ok_or_else(|| TopologyError::UnknownPort(port_id.to_string()))?;
        node.device_path(slot).ok_or(TopologyError::SlotNotOpen {
            id: port_id.to_string(),
            slot,
        })
    }

    /// The port whose secondary bus `path` sits on, with the device's slot there. `None`
    /// for a root bus path or a path not below a port.
    pub fn port_for_path(&self, path: &PciPath) -> Option<(&PortNode, PciSlot)> {
        if path.parents().is_empty() {
            return None;
        }
        let parent = PciPath::new(path.parents().to_vec()).ok()?;
        self.port_at_path(&parent).map(|n| (n, path.last()))
    }

    /// Check that a device may be placed at `path`: `Ok(None)` on the root bus (if no port
    /// is there), `Ok(Some(port))` in an open slot of a port (any function), an error
    /// otherwise.
    pub fn check_device_path(&self, path: &PciPath) -> Result<Option<&PortNode>, TopologyError> {
        if let Some(n) = self.port_at_path(path) {
            return Err(TopologyError::PathIsPort {
                path: path.to_string(),
                id: n.id.clone(),
            });
        }
        // A port at slot S function 0 owns the whole slot.
        let f0 = {
            let mut slots = path.slots();
            if let Some(last) = slots.last_mut() {
                last.function = 0;
            }
            PciPath::new(slots).ok()
        };
        if let Some(n) = f0.as_ref().and_then(|p| self.port_at_path(p)) {
            return Err(TopologyError::PathIsPort {
                path: path.to_string(),
                id: n.id.clone(),
            });
        }
        if path.parents().is_empty() {
            return Ok(None);
        }
        let (node, slot) = self
            .port_for_path(path)
            .ok_or_else(|| TopologyError::NotUnderPort(path.to_string()))?;
        if !node.device_slots.contains(&slot.slot) {
            return Err(TopologyError::SlotNotOpen {
                id: node.id.clone(),
                slot: slot.slot,
            });
        }
        Ok(Some(node))
    }

    /// How many of the root bus's free slots offer ACPI hotplug (the
    /// highest-numbered ones); `None`: all ([`TopologyOptions::root_acpi_slots`]).
    pub fn root_acpi_slots(&self) -> Option<usize> {
        self.root_acpi_slots
    }

    /// Root bus slots used by ports.
    pub fn root_slots_used(&self) -> Vec<u8> {
        self.nodes
            .iter()
            .filter(|n| n.parent.is_none())
            .map(|n| n.path.last().slot)
            .collect()
    }

    /// Highest bus number assigned (0 without ports).
    pub fn last_bus(&self) -> u8 {
        self.last_bus
    }

    /// The parts of the host windows the ports did not take (the bottom of each window), for
    /// the root bus allocator.
    pub fn remaining_windows(&self) -> HostWindows {
        self.remaining
    }

    /// Build the port devices, programmed as firmware leaves them, parents first. `msi` is
    /// called once per port and returns its MSI group (needed for native hot-plug
    /// interrupts; `None` leaves the port without an MSI capability).
    pub fn create_devices(
        &self,
        msi: &mut dyn FnMut(&PortNode) -> Option<Arc<dyn MsiInterruptGroup>>,
    ) -> Result<Vec<PortDevice>, PciError> {
        let mut out = Vec::with_capacity(self.nodes.len());
        for n in &self.nodes {
            let mut port = PciePort::new(n.port_params(), msi(n))?;
            port.set_bus_numbers(n.primary_bus, n.secondary_bus, n.subordinate_bus);
            port.set_windows(&n.windows.to_bridge_windows());
            port.enable_forwarding();
            if port.has_native_hotplug() && n.device_slots.is_empty() {
                // The slot holds a child port from power-on.
                port.cold_plug(true);
            }
            out.push(PortDevice {
                id: n.id.clone(),
                path: n.path.clone(),
                port: Arc::new(Mutex::new(port)),
            });
        }
        Ok(out)
    }

    /// [`Topology::create_devices`], then attach every port to `root`.
    pub fn attach(
        &self,
        root: &mut PciRoot,
        msi: &mut dyn FnMut(&PortNode) -> Option<Arc<dyn MsiInterruptGroup>>,
    ) -> Result<Vec<PortDevice>, PciError> {
        let devices = self.create_devices(msi)?;
        for d in &devices {
            root.add_device(&d.path, d.shared())?;
        }
        Ok(devices)
    }
}

#[cfg(test)]
#[path = "topology_tests.rs"]
mod tests;
