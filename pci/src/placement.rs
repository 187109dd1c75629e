//! Where devices go and how the guest hears about them: the hotplug plan and the placement
//! policy.
//!
//! Pure: no KVM, no threads, no locks. The VMM says which paths hold a device (an
//! `occupied` callback) and the module answers with a [`Place`] or a [`PlacementError`].
//!
//! - [`HotplugPlan`]: every hotplug-capable slot and its [`SlotMechanism`], fixed once the
//!   cold-plugged devices are placed (the DSDT describes it to the guest). The root bus is
//!   ACPI bus selector (`bsel`) 0 and offers every slot 1..=31 that neither a port nor a
//!   cold-plugged device uses; ports with [`HotplugMode::Acpi`] get the selectors 1, 2, ...
//!   in [`Topology::ports`] order and offer their open slots not cold-plugged; ports with
//!   [`HotplugMode::Native`] signal through their own slot registers.
//! - [`choose`]: an exact path, the first free slot of a named port, the first free root slot
//!   (cold plug), or the first free hotplug slot in a [`PlaceKind`] order (hotplug).
//! - [`choose_slots`]: the slots of a kernel VFIO assignment (one per host device): a PCI
//!   Express root port or switch downstream port per host IOMMU group by default, never a
//!   slot behind a conventional PCI bridge; overrides that merge groups behind one warn.
//!
//! ## Multifunction slots
//!
//! A request may name a function (the last path element `SS.F`, or `function`). The slot's
//! state follows from which of its functions are occupied:
//!
//! - *empty*: no function;
//! - *staged*: some of functions 1-7, no function 0. The guest cannot see them (Linux finds
//!   functions 1-7 only through function 0) and is not told;
//! - *committed*: function 0 is there. A hot-plugged function 0 commits its slot: the VMM
//!   raises one hotplug event for the whole slot, and function 0 reports the multifunction
//!   bit when other functions are present.
//!
//! Hot plug: functions 1-7 join an empty or staged slot; function 0 joins an empty or staged
//! slot (committing it); nothing joins a committed slot ([`PlacementError::SlotCommitted`],
//! [`PlacementError::SingleFunction`]). Cold plug: any free function of a slot (the guest
//! scans at boot), but every slot must have its function 0 in the end ([`check_cold_slots`]).
//! [`removal`] says what removing a function takes: function 0 takes the whole slot,
//! another function goes alone only while its slot is staged.

use std::fmt;
use std::str::FromStr;

use crate::bus::{NUM_FUNCTIONS, NUM_SLOTS};
use crate::path::{PciPath, PciSlot};
use crate::topology::{HotplugMode, PortNode, Topology, ROOT_BUS_ID};

/// How the guest hears that a slot's occupant changed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SlotMechanism {
    /// Native PCIe hotplug on this port (its single slot).
    Native {
        /// The port id.
        port: String,
    },
    /// ACPI hotplug: the bus selector and the slot number on that bus.
    Acpi {
        /// Bus selector (0: the root bus).
        bsel: u32,
        /// Slot on that bus.
        slot: u8,
    },
    /// Cold plug only.
    None,
}

/// A bus with ACPI hotplug slots. `bsel` 0 is the root bus (`port` `None`); ACPI-hotplug
/// ports get 1, 2, ... in [`Topology::ports`] order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiHotplugBus {
    /// The port whose secondary bus this is; `None` for the root bus.
    pub port: Option<String>,
    /// The bus selector.
    pub bsel: u32,
    /// The hotplug slots, ascending.
    pub slots: Vec<u8>,
}

/// Every hotplug-capable slot and its mechanism, computed once after cold-plugged devices
/// are placed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HotplugPlan {
    /// ACPI buses in bsel order; the root bus is always first.
    acpi: Vec<AcpiHotplugBus>,
    /// Ports with native hotplug, topology order.
    native: Vec<String>,
}

/// Path of function 0 of `slot` on the root bus.
fn root_path(slot: u8) -> PciPath {
    PciPath::root(PciSlot { slot, function: 0 })
}

/// Whether `path` is a device (any function) in `slot` of the secondary bus of `node`.
fn is_in_slot_of(path: &PciPath, node: &PortNode, slot: u8) -> bool {
    path.last().slot == slot && path.parents() == node.path.slots().as_slice()
}

impl HotplugPlan {
    /// The plan for `topology` once the devices at `cold` (cold-plugged, any function) are
    /// placed. Root-bus ACPI slots: slots 1..=31 used neither by a port nor by a cold-plugged
    /// device, the highest [`Topology::root_acpi_slots`] of them. ACPI port slots: the port's
    /// [`PortNode::device_slots`] minus cold-plugged ones. Native ports: every port with
    /// [`HotplugMode::Native`].
    pub fn new(topology: &Topology, cold: &[PciPath]) -> HotplugPlan {
        let port_slots = topology.root_slots_used();
        let mut root_slots: Vec<u8> = (1..NUM_SLOTS)
            .filter(|s| !port_slots.contains(s))
            .filter(|s| !cold.iter().any(|c| c.len() == 1 && c.last().slot == *s))
            .collect();
        if let Some(n) = topology.root_acpi_slots() {
            let skip = root_slots.len().saturating_sub(n);
            root_slots.drain(..skip);
        }
        let mut acpi = vec![AcpiHotplugBus {
            port: None,
            bsel: 0,
            slots: root_slots,
        }];
        let mut native = Vec::new();
        let mut next = 1u32;
        for node in topology.ports() {
            match node.hotplug {
                HotplugMode::Acpi => {
                    let slots = node
                        .device_slots()
                        .iter()
                        .copied()
                        .filter(|s| !cold.iter().any(|c| is_in_slot_of(c, node, *s)))
                        .collect();
                    acpi.push(AcpiHotplugBus {
                        port: Some(node.id.clone()),
                        bsel: next,
                        slots,
                    });
                    next += 1;
                }
                HotplugMode::Native => native.push(node.id.clone()),
                HotplugMode::None => {}
            }
        }
        HotplugPlan { acpi, native }
    }

    fn acpi_bus(&self, port: Option<&str>) -> Option<&AcpiHotplugBus> {
        self.acpi.iter().find(|b| b.port.as_deref() == port)
    }

    /// The mechanism for a device at `path` sitting under `port` (`None`: the root bus): a
    /// native port gives [`SlotMechanism::Native`] whatever the slot; an ACPI port gives
    /// [`SlotMechanism::Acpi`] if the slot is one of its plan slots; the root bus gives
    /// `Acpi { bsel: 0, .. }` if the slot is a root hotplug slot; anything else `None`.
    pub fn mechanism(&self, port: Option<&str>, path: &PciPath) -> SlotMechanism {
        let slot = path.last().slot;
        if let Some(id) = port {
            if self.native.iter().any(|n| n == id) {
                return SlotMechanism::Native {
                    port: id.to_string(),
                };
            }
        }
        match self.acpi_bus(port) {
            Some(bus) if bus.slots.contains(&slot) => SlotMechanism::Acpi {
                bsel: bus.bsel,
                slot,
            },
            _ => SlotMechanism::None,
        }
    }

    /// ACPI buses in bsel order (root first).
    pub fn acpi_buses(&self) -> &[AcpiHotplugBus] {
        &self.acpi
    }

    /// The bus selector of the root bus (`None`) or of an ACPI-hotplug port.
    pub fn bsel(&self, port: Option<&str>) -> Option<u32> {
        self.acpi_bus(port).map(|b| b.bsel)
    }

    /// Root-bus ACPI hotplug slots.
    pub fn root_slots(&self) -> &[u8] {
        self.acpi_bus(None).map_or(&[], |b| b.slots.as_slice())
    }

    /// Native hotplug ports, topology order.
    pub fn native_ports(&self) -> &[String] {
        &self.native
    }

    /// The (port, path) an ACPI (bsel, slot) pair names, if the plan has that slot.
    pub fn acpi_slot(
        &self,
        topology: &Topology,
        bsel: u32,
        slot: u8,
    ) -> Option<(Option<String>, PciPath)> {
        let bus = self.acpi.iter().find(|b| b.bsel == bsel)?;
        if !bus.slots.contains(&slot) {
            return None;
        }
        match &bus.port {
            None => Some((None, root_path(slot))),
            Some(id) => {
                let path = topology.port(id)?.device_path(slot)?;
                Some((Some(id.clone()), path))
            }
        }
    }
}

/// Kinds of place for the automatic order (`--hotplug-order native,acpi,root`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlaceKind {
    /// Ports with native PCIe hotplug.
    Native,
    /// Ports (bridges) with ACPI hotplug.
    Acpi,
    /// The root bus's ACPI hotplug slots.
    Root,
}

impl PlaceKind {
    /// Native ports first, then ACPI bridges, then the root bus.
    pub const DEFAULT_ORDER: [PlaceKind; 3] = [PlaceKind::Native, PlaceKind::Acpi, PlaceKind::Root];
}

impl FromStr for PlaceKind {
    type Err = String;

    /// `native`, `acpi` or `root`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "native" => Ok(PlaceKind::Native),
            "acpi" => Ok(PlaceKind::Acpi),
            "root" => Ok(PlaceKind::Root),
            _ => Err(format!(
                "unknown placement kind '{s}' (expected native, acpi or root)"
            )),
        }
    }
}

impl fmt::Display for PlaceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PlaceKind::Native => "native",
            PlaceKind::Acpi => "acpi",
            PlaceKind::Root => "root",
        })
    }
}

/// What a caller asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlaceRequest<'a> {
    /// The port to place the device under (`None`: no preference).
    pub port: Option<&'a str>,
    /// The exact path, as the user wrote it.
    pub pci_path: Option<&'a str>,
    /// The function asked for (`function=F`); `None`: the function `pci_path` names, or
    /// function 0 of an empty slot. With `port` or automatic placement, an explicit function
    /// goes to the first slot partly filled that can take it (so functions staged one after
    /// another share a slot), else to an empty one.
    pub function: Option<u8>,
    /// Whether the device is hot-plugged (the VM runs).
    pub hotplug: bool,
}

/// The chosen place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    /// The chosen function of the chosen slot. A hot-plugged function 1-7 is staged (its
    /// slot has no function 0 yet); a hot-plugged function 0 commits its slot.
    pub path: PciPath,
    /// The port the device sits under; `None` is the root bus.
    pub port: Option<String>,
    /// How the guest hears about the device: [`HotplugPlan::mechanism`] for a hot-plugged
    /// device, [`SlotMechanism::None`] for a cold-plugged one (the guest finds it at boot).
    pub mechanism: SlotMechanism,
}

/// Why a device cannot be placed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PlacementError {
    /// A malformed path, or one where no device may go.
    #[error("pci_path '{path}': {reason}")]
    BadPath {
        /// The path as given.
        path: String,
        /// Why it is refused.
        reason: String,
    },
    /// No port has this id.
    #[error("unknown port '{0}'")]
    UnknownPort(String),
    /// The port holds other ports and has no slot for a device.
    #[error("port '{0}' has no device slot (it holds other ports)")]
    NoDeviceSlot(String),
    /// Every slot of the port is taken.
    #[error("every slot of port '{0}' is taken")]
    PortFull(String),
    /// Automatic placement found nothing free.
    #[error(
        "no free slot: a hot-plugged device needs a free hotplug slot (native port, ACPI bridge slot or root bus hotplug slot), a cold-plugged one a free root bus slot"
    )]
    NoFreeSlot,
    /// A device is already at this path.
    #[error("slot {0} is taken")]
    SlotTaken(PciPath),
    /// A hot-plugged device asked for a slot without a hotplug mechanism.
    #[error("{0} is not a hotplug slot")]
    NotHotplugSlot(PciPath),
    /// A function number above 7.
    #[error("function {0} is out of range (a slot has functions 0 to 7)")]
    BadFunction(u8),
    /// A function asked to join a slot whose function 0 is a multifunction device already
    /// announced to the guest.
    #[error(
        "slot {slot} is committed (function 0 is there, the guest was told of functions {functions}): functions 1-7 join a slot before its function 0; remove function 0 to remove the whole slot"
    )]
    SlotCommitted {
        /// Function 0 of the slot.
        slot: PciPath,
        /// Its functions, comma separated.
        functions: String,
    },
    /// A function asked to join a slot whose function 0 is alone (single-function).
    #[error(
        "function {function} cannot join slot {slot}: its function 0 is single-function (the guest would not scan function {function}); add functions 1-7 before function 0"
    )]
    SingleFunction {
        /// Function 0 of the slot.
        slot: PciPath,
        /// The function asked for.
        function: u8,
    },
    /// Removal of a function other than 0 of a committed slot.
    #[error(
        "{path} is function {function} of committed slot {slot}: a committed slot is removed whole, by removing function 0 ('{slot_device}')"
    )]
    FunctionOfCommittedSlot {
        /// The function's path.
        path: PciPath,
        /// Its number.
        function: u8,
        /// Function 0 of the slot.
        slot: PciPath,
        /// The device at function 0 (filled in by the caller; empty if unknown).
        slot_device: String,
    },
    /// No isolating port is free for an assignment's host groups.
    #[error(
        "no free port for host IOMMU group {groups} ({slots} slot(s)): each host group gets its own PCI Express root port or switch downstream port (a switch for several devices), never a slot behind a PCI bridge; add one (--pci-port), free one, or name a port or pci_path"
    )]
    NoGroupPort {
        /// The groups, comma separated.
        groups: String,
        /// Slots needed.
        slots: usize,
    },
    /// `pci_path` for an assignment of several host devices.
    #[error(
        "the request takes {0} host devices (one IOMMU group): it needs {0} slots, so give 'port' (a switch or a port with free slots), not 'pci_path'"
    )]
    PathForGroup(usize),
    /// A function number for whole host devices.
    #[error(
        "'function' (or a pci_path naming a function) places a single function: this request takes whole host devices, whose functions keep their numbers in one guest slot (leave functions out with 'unassigned')"
    )]
    WholeDevice,
    /// A cold-plugged slot without function 0.
    #[error(
        "slot {slot} has function(s) {functions} but no function 0: the guest finds functions 1-7 only through function 0; add a device at {slot}"
    )]
    NoFunctionZero {
        /// Function 0 of the slot.
        slot: PciPath,
        /// Its functions, comma separated.
        functions: String,
    },
}

/// What removing a function takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Removal {
    /// Function 0 of a committed slot: the whole slot goes, through the guest (one hotplug
    /// request). Every function's path, function 0 first.
    Slot(Vec<PciPath>),
    /// A function of a staged slot: the guest never saw it; it is dropped at once.
    Staged(PciPath),
}

/// What removing the function at `path` takes, given the occupied functions: function 0
/// takes its whole slot; another function goes alone only while its slot is staged (no
/// function 0), else [`PlacementError::FunctionOfCommittedSlot`].
pub fn removal(
    path: &PciPath,
    occupied: &dyn Fn(&PciPath) -> bool,
) -> Result<Removal, PlacementError> {
    let mask = slot_functions(path, occupied);
    let function = path.last().function;
    if function == 0 {
        let all = functions_of(mask | 1)
            .into_iter()
            .map(|f| path.with_function(f))
            .collect();
        return Ok(Removal::Slot(all));
    }
    if mask & 1 != 0 {
        return Err(PlacementError::FunctionOfCommittedSlot {
            path: path.clone(),
            function,
            slot: path.slot_path(),
            slot_device: String::new(),
        });
    }
    Ok(Removal::Staged(path.clone()))
}

/// Checks the cold-plugged functions at `paths` once all are placed: every slot with a
/// function has its function 0 ([`PlacementError::NoFunctionZero`] names the first that has
/// not).
pub fn check_cold_slots(paths: &[PciPath]) -> Result<(), PlacementError> {
    let mut slots: std::collections::BTreeMap<PciPath, u8> = std::collections::BTreeMap::new();
    for p in paths {
        *slots.entry(p.slot_path()).or_default() |= 1 << p.last().function;
    }
    match slots.into_iter().find(|(_, mask)| mask & 1 == 0) {
        Some((slot, mask)) => Err(PlacementError::NoFunctionZero {
            slot,
            functions: function_list(mask),
        }),
        None => Ok(()),
    }
}

/// The occupied functions of the slot of `path`, as a bit mask (bit F: function F).
pub fn slot_functions(path: &PciPath, occupied: &dyn Fn(&PciPath) -> bool) -> u8 {
    (0..NUM_FUNCTIONS)
        .filter(|f| occupied(&path.with_function(*f)))
        .fold(0u8, |m, f| m | (1 << f))
}

/// The functions of a mask, ascending.
pub fn functions_of(mask: u8) -> Vec<u8> {
    (0..NUM_FUNCTIONS)
        .filter(|f| mask & (1 << f) != 0)
        .collect()
}

fn function_list(mask: u8) -> String {
    functions_of(mask)
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether function `function` may join a slot whose functions are `mask`: it is free, and
/// for a hot-plugged one, function 0 is not there (the slot is not committed).
fn accepts(mask: u8, function: u8, hotplug: bool) -> bool {
    mask & (1 << function) == 0 && !(hotplug && mask & 1 != 0)
}

/// The first slot among `candidates` (function 0 paths, in order) for the request: with an
/// explicit `function`, a partly filled slot that accepts it, else an empty one; without one,
/// an empty slot. Returns the path of the function.
fn pick(
    candidates: impl Iterator<Item = PciPath> + Clone,
    function: Option<u8>,
    hotplug: bool,
    occupied: &dyn Fn(&PciPath) -> bool,
) -> Option<PciPath> {
    let f = function.unwrap_or(0);
    if function.is_some() {
        let partly = candidates.clone().find(|p| {
            let mask = slot_functions(p, occupied);
            mask != 0 && accepts(mask, f, hotplug)
        });
        if let Some(p) = partly {
            return Some(p.with_function(f));
        }
    }
    candidates
        .into_iter()
        .find(|p| slot_functions(p, occupied) == 0)
        .map(|p| p.with_function(f))
}

/// Why no slot among `candidates` takes an explicit `function` when one has it free: the
/// first such slot's refusal ([`PlacementError::SingleFunction`] or
/// [`PlacementError::SlotCommitted`]), rather than "full".
fn refusal(
    candidates: impl Iterator<Item = PciPath>,
    function: Option<u8>,
    hotplug: bool,
    occupied: &dyn Fn(&PciPath) -> bool,
) -> Option<PlacementError> {
    let f = function?;
    candidates
        .map(|p| (slot_functions(&p, occupied), p))
        .find(|(mask, _)| *mask != 0 && mask & (1 << f) == 0)
        .and_then(|(mask, p)| committed_refusal(&p, mask, f, hotplug))
}

/// The refusal of function `function` by a slot whose functions are `mask`, if its function
/// 0 is there and the function is hot-plugged.
fn committed_refusal(
    path: &PciPath,
    mask: u8,
    function: u8,
    hotplug: bool,
) -> Option<PlacementError> {
    if !hotplug || mask & 1 == 0 {
        return None;
    }
    let slot = path.slot_path();
    Some(if mask == 1 {
        PlacementError::SingleFunction { slot, function }
    } else {
        PlacementError::SlotCommitted {
            slot,
            functions: function_list(mask),
        }
    })
}

/// Function 0 paths of the root bus slots a cold-plugged device may use: 1..=31 where no
/// port sits (slot 0 holds the host bridge).
fn cold_root_candidates(topology: &Topology) -> impl Iterator<Item = PciPath> + Clone {
    let ports = topology.root_slots_used();
    (1..NUM_SLOTS)
        .filter(move |s| !ports.contains(s))
        .map(root_path)
}

/// Function 0 paths of `slots` of `node`, in order.
fn slot_paths<'a>(
    node: &'a PortNode,
    slots: &'a [u8],
) -> impl Iterator<Item = PciPath> + Clone + 'a {
    slots.iter().filter_map(|s| node.device_path(*s))
}

/// The device path `text` names, validated against the topology and `want` (the port the
/// caller named, if any).
fn exact_path(
    topology: &Topology,
    text: &str,
    want: Option<&str>,
    function: Option<u8>,
) -> Result<(PciPath, Option<String>), PlacementError> {
    let bad = |reason: String| PlacementError::BadPath {
        path: text.to_string(),
        reason,
    };
    let mut path: PciPath = text
        .parse()
        .map_err(|e: crate::PciPathError| bad(e.to_string()))?;
    if let Some(f) = function {
        if f >= NUM_FUNCTIONS {
            return Err(PlacementError::BadFunction(f));
        }
        let named = path.last().function;
        if named != 0 && named != f {
            return Err(bad(format!(
                "it names function {named} but 'function' is {f}"
            )));
        }
        path = path.with_function(f);
    }
    let node = topology
        .check_device_path(&path)
        .map_err(|e| bad(e.to_string()))?;
    let under = node.map(|n| n.id.clone());
    if let Some(want) = want {
        if under.as_deref() != Some(want) {
            return Err(bad(format!("it is not a slot of port '{want}'")));
        }
    }
    if under.is_none() && path.last().slot == 0 {
        return Err(bad("slot 00 holds the host bridge".into()));
    }
    Ok((path, under))
}

/// The first free slot of port `id`. For a hot-plugged device a free slot with a hotplug
/// mechanism is preferred; if every free slot lacks one, the first free slot is returned
/// (and refused later as [`PlacementError::NotHotplugSlot`]).
fn slot_of_port(
    topology: &Topology,
    plan: &HotplugPlan,
    occupied: &dyn Fn(&PciPath) -> bool,
    id: &str,
    req: &PlaceRequest<'_>,
) -> Result<PciPath, PlacementError> {
    let node = topology
        .port(id)
        .ok_or_else(|| PlacementError::UnknownPort(id.to_string()))?;
    if node.device_slots().is_empty() {
        return Err(PlacementError::NoDeviceSlot(id.to_string()));
    }
    let all = slot_paths(node, node.device_slots());
    let first = pick(all.clone(), req.function, req.hotplug, occupied).ok_or_else(|| {
        refusal(all.clone(), req.function, req.hotplug, occupied)
            .unwrap_or_else(|| PlacementError::PortFull(id.to_string()))
    })?;
    if req.hotplug {
        let with_hotplug = all.filter(|p| plan.mechanism(Some(id), p) != SlotMechanism::None);
        if let Some(p) = pick(with_hotplug, req.function, true, occupied) {
            return Ok(p);
        }
    }
    Ok(first)
}

/// The first root-bus slot with ACPI hotplug for the request.
fn free_hotplug_root_path(
    plan: &HotplugPlan,
    occupied: &dyn Fn(&PciPath) -> bool,
    function: Option<u8>,
) -> Option<PciPath> {
    pick(
        plan.root_slots().iter().map(|s| root_path(*s)),
        function,
        true,
        occupied,
    )
}

/// The first hotplug slot for the request in `order`.
fn automatic(
    topology: &Topology,
    plan: &HotplugPlan,
    order: &[PlaceKind],
    occupied: &dyn Fn(&PciPath) -> bool,
    function: Option<u8>,
) -> Option<(PciPath, Option<String>)> {
    for kind in order {
        let found = match kind {
            PlaceKind::Root => free_hotplug_root_path(plan, occupied, function).map(|p| (p, None)),
            PlaceKind::Native => plan.native_ports().iter().find_map(|id| {
                let node = topology.port(id)?;
                let path = pick(
                    slot_paths(node, node.device_slots()),
                    function,
                    true,
                    occupied,
                )?;
                Some((path, Some(id.clone())))
            }),
            PlaceKind::Acpi => plan.acpi_buses().iter().find_map(|bus| {
                let id = bus.port.as_ref()?;
                let node = topology.port(id)?;
                let path = pick(slot_paths(node, &bus.slots), function, true, occupied)?;
                Some((path, Some(id.clone())))
            }),
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

/// Chooses where a new device goes:
///
/// 1. an exact `pci_path` (an open slot per [`Topology::check_device_path`], a slot of
///    `port` if both are given, not slot 00 of the root bus; `function`, if given, replaces
///    a function 0 of the path and must equal another);
/// 2. else the first free slot of `port` ([`PlacementError::UnknownPort`],
///    [`PlacementError::NoDeviceSlot`], [`PlacementError::PortFull`]);
/// 3. else, for cold plug, the first root bus slot 1..=31 holding neither a port nor a device
///    (the plan is not consulted: it may be `HotplugPlan::new(topology, &[])`);
/// 4. else, for hotplug, the first free hotplug slot in `order`: native ports in topology
///    order, ACPI bridge slots in bsel order, root bus hotplug slots.
///
/// Finally the place is refused with [`PlacementError::SlotTaken`] if `occupied` says a
/// device is at that function, for a hot-plugged function with
/// [`PlacementError::SingleFunction`] or [`PlacementError::SlotCommitted`] if the slot's
/// function 0 is there, and with [`PlacementError::NotHotplugSlot`] for a hot-plugged device
/// if the plan gives the slot no mechanism.
pub fn choose(
    topology: &Topology,
    plan: &HotplugPlan,
    order: &[PlaceKind],
    occupied: &dyn Fn(&PciPath) -> bool,
    req: &PlaceRequest<'_>,
) -> Result<Place, PlacementError> {
    if let Some(f) = req.function.filter(|f| *f >= NUM_FUNCTIONS) {
        return Err(PlacementError::BadFunction(f));
    }
    let (path, port) = match (req.pci_path, req.port) {
        (Some(text), want) => exact_path(topology, text, want, req.function)?,
        (None, Some(ROOT_BUS_ID)) if req.hotplug => (
            free_hotplug_root_path(plan, occupied, req.function).ok_or_else(|| {
                let slots = plan.root_slots().iter().map(|s| root_path(*s));
                refusal(slots, req.function, true, occupied)
                    .unwrap_or_else(|| PlacementError::PortFull(ROOT_BUS_ID.to_string()))
            })?,
            None,
        ),
        (None, Some(id)) if id != ROOT_BUS_ID => (
            slot_of_port(topology, plan, occupied, id, req)?,
            Some(id.to_string()),
        ),
        (None, _) if !req.hotplug => (
            pick(
                cold_root_candidates(topology),
                req.function,
                false,
                occupied,
            )
            .ok_or(PlacementError::NoFreeSlot)?,
            None,
        ),
        (None, _) => automatic(topology, plan, order, occupied, req.function)
            .ok_or(PlacementError::NoFreeSlot)?,
    };
    let mask = slot_functions(&path, occupied);
    let function = path.last().function;
    if mask & (1 << function) != 0 {
        return Err(PlacementError::SlotTaken(path));
    }
    if let Some(e) = committed_refusal(&path, mask, function, req.hotplug) {
        return Err(e);
    }
    let mechanism = if req.hotplug {
        match plan.mechanism(port.as_deref(), &path) {
            SlotMechanism::None => return Err(PlacementError::NotHotplugSlot(path)),
            m => m,
        }
    } else {
        SlotMechanism::None
    };
    Ok(Place {
        path,
        port,
        mechanism,
    })
}

/// What a kernel VFIO assignment needs: one guest slot per host device, for host IOMMU
/// groups that must not share a guest isolation domain with others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotsRequest<'a> {
    /// Where the user asked (`port`, `pci_path`, `function`) and whether it is hot plug.
    pub place: PlaceRequest<'a>,
    /// Guest slots needed (host devices), at least 1.
    pub slots: usize,
    /// Whether some device has several functions (each slot must then be empty, and
    /// `function` does not apply: the functions keep their numbers).
    pub multifunction: bool,
    /// The host IOMMU groups of the assignment.
    pub groups: &'a [u32],
}

/// Where an assignment's slots go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotsPlace {
    /// One place per slot, in request order (the function `function` asked for, else
    /// function 0).
    pub places: Vec<Place>,
    /// Why the placement is allowed but not advised (a user's override merging host groups
    /// behind a conventional PCI bridge).
    pub warnings: Vec<String>,
}

/// Why no port takes an assignment's slots, or why the request cannot be honoured.
fn group_error(req: &SlotsRequest<'_>) -> PlacementError {
    PlacementError::NoGroupPort {
        groups: req
            .groups
            .iter()
            .map(|g| g.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        slots: req.slots,
    }
}

/// Whether `node` is a port that isolates what is below it: a PCI Express root port or
/// switch downstream port with a device slot (no child port).
fn isolating_port(node: &PortNode) -> bool {
    node.kind.is_downstream_port() && !node.device_slots().is_empty()
}

/// The device slot of an isolating port, if it is empty and (for hot plug) has a
/// mechanism.
fn free_port_slot(
    plan: &HotplugPlan,
    occupied: &dyn Fn(&PciPath) -> bool,
    node: &PortNode,
    hotplug: bool,
) -> Option<PciPath> {
    if !isolating_port(node) {
        return None;
    }
    let path = node.device_path(node.device_slots()[0])?;
    let usable = slot_functions(&path, occupied) == 0
        && (!hotplug || plan.mechanism(Some(&node.id), &path) != SlotMechanism::None);
    usable.then_some(path)
}

/// The free isolating ports below switch `node` (its downstream ports), in slot order.
fn switch_slots(
    topology: &Topology,
    plan: &HotplugPlan,
    occupied: &dyn Fn(&PciPath) -> bool,
    node: &PortNode,
    hotplug: bool,
) -> Vec<(PciPath, String)> {
    node.children
        .iter()
        .filter_map(|c| topology.port(c))
        .filter_map(|c| free_port_slot(plan, occupied, c, hotplug).map(|p| (p, c.id.clone())))
        .collect()
}

/// The first `n` of `free` (device paths with their ports), each placed with the mechanism
/// `mechanism` gives its port and path.
fn places_on_ports(
    free: Vec<(PciPath, String)>,
    n: usize,
    mechanism: &dyn Fn(Option<&str>, &PciPath) -> SlotMechanism,
) -> Vec<Place> {
    free.into_iter()
        .take(n)
        .map(|(path, port)| Place {
            mechanism: mechanism(Some(&port), &path),
            path,
            port: Some(port),
        })
        .collect()
}

/// Chooses the guest slots of a kernel VFIO assignment ([`crate::assignment`]), one per
/// host device:
///
/// - By default each host group gets its own isolating port: a PCI Express root port or
///   switch downstream port (with a hotplug mechanism for hot plug), never a slot behind a
///   conventional PCI bridge, whose secondary bus the guest sees as one isolation domain.
///   One slot: the first free such port in topology order (with an explicit `function`, a
///   partly filled one that accepts it first, as [`choose`] does). Several slots (several
///   devices of one group): the downstream ports of the first switch that has enough free
///   ones. Nothing free: [`PlacementError::NoGroupPort`].
/// - `pci_path` (one slot only) or `port` override this, by [`choose`]'s rules; for several
///   slots `port` names a switch (its free downstream ports) or a port with enough free
///   device slots. An override that puts the assignment behind a conventional PCI bridge
///   already holding another host group is allowed, with a warning naming both.
///
/// `placed` lists the passthrough functions in place with their host groups. A device with
/// several functions needs an empty slot and takes no `function`
/// ([`PlacementError::WholeDevice`]).
pub fn choose_slots(
    topology: &Topology,
    plan: &HotplugPlan,
    occupied: &dyn Fn(&PciPath) -> bool,
    placed: &[(PciPath, u32)],
    req: &SlotsRequest<'_>,
) -> Result<SlotsPlace, PlacementError> {
    let hotplug = req.place.hotplug;
    let named_function = req.place.function.is_some()
        || req
            .place
            .pci_path
            .and_then(|t| t.parse::<PciPath>().ok())
            .is_some_and(|p| p.last().function != 0);
    if (req.multifunction || req.slots > 1) && named_function {
        return Err(PlacementError::WholeDevice);
    }
    let mechanism = |port: Option<&str>, path: &PciPath| {
        if hotplug {
            plan.mechanism(port, path)
        } else {
            SlotMechanism::None
        }
    };
    let is_switch = |id: &str| {
        topology
            .port(id)
            .is_some_and(|n| n.kind == crate::PciePortKind::SwitchUpstream)
    };
    let places: Vec<Place> = match (req.place.pci_path, req.place.port, req.slots) {
        (Some(_), _, n) if n > 1 => return Err(PlacementError::PathForGroup(n)),
        (Some(_), _, _) => vec![choose(topology, plan, &[], occupied, &req.place)?],
        (None, Some(id), 1) if !is_switch(id) => {
            vec![choose(topology, plan, &[], occupied, &req.place)?]
        }
        (None, Some(id), n) => {
            let node = topology
                .port(id)
                .ok_or_else(|| PlacementError::UnknownPort(id.to_string()))?;
            let free: Vec<(PciPath, String)> = if node.kind == crate::PciePortKind::SwitchUpstream {
                switch_slots(topology, plan, occupied, node, hotplug)
            } else {
                slot_paths(node, node.device_slots())
                    .filter(|p| slot_functions(p, occupied) == 0)
                    .filter(|p| !hotplug || plan.mechanism(Some(id), p) != SlotMechanism::None)
                    .map(|p| (p, id.to_string()))
                    .collect()
            };
            if free.len() < n {
                return Err(PlacementError::PortFull(id.to_string()));
            }
            places_on_ports(free, n, &mechanism)
        }
        (None, None, 1) => {
            let ports: Vec<&PortNode> = topology
                .ports()
                .iter()
                .filter(|n| isolating_port(n))
                .filter(|n| {
                    n.device_path(n.device_slots()[0]).is_some_and(|p| {
                        !hotplug || plan.mechanism(Some(&n.id), &p) != SlotMechanism::None
                    })
                })
                .collect();
            let candidates = ports
                .iter()
                .filter_map(|n| n.device_path(n.device_slots()[0]));
            let path = pick(candidates, req.place.function, hotplug, occupied)
                .ok_or_else(|| group_error(req))?;
            let port = ports
                .iter()
                .find(|n| n.path.slots() == path.parents())
                .map(|n| n.id.clone());
            let mask = slot_functions(&path, occupied);
            if let Some(e) = committed_refusal(&path, mask, path.last().function, hotplug) {
                return Err(e);
            }
            vec![Place {
                mechanism: mechanism(port.as_deref(), &path),
                path,
                port,
            }]
        }
        (None, None, n) => {
            let chosen = topology
                .ports()
                .iter()
                .filter(|n| n.kind == crate::PciePortKind::SwitchUpstream)
                .map(|sw| switch_slots(topology, plan, occupied, sw, hotplug))
                .find(|free| free.len() >= n)
                .ok_or_else(|| group_error(req))?;
            places_on_ports(chosen, n, &mechanism)
        }
    };
    if req.multifunction {
        if let Some(p) = places
            .iter()
            .find(|p| slot_functions(&p.path, occupied) != 0)
        {
            return Err(PlacementError::SlotTaken(p.path.slot_path()));
        }
    }
    let warnings = bridge_warnings(topology, placed, req.groups, &places);
    Ok(SlotsPlace { places, warnings })
}

/// A warning for each conventional PCI bridge above `places` that already holds
/// passthrough functions of host groups other than `groups`.
fn bridge_warnings(
    topology: &Topology,
    placed: &[(PciPath, u32)],
    groups: &[u32],
    places: &[Place],
) -> Vec<String> {
    let under = |path: &PciPath, node: &PortNode| path.slots().starts_with(&node.path.slots());
    let mut out = Vec::new();
    for bridge in topology.ports().iter().filter(|n| n.kind.is_pci_bridge()) {
        let here: Vec<&Place> = places.iter().filter(|p| under(&p.path, bridge)).collect();
        if here.is_empty() {
            continue;
        }
        let mut others: Vec<(u32, &PciPath)> = placed
            .iter()
            .filter(|(p, g)| under(p, bridge) && !groups.contains(g))
            .map(|(p, g)| (*g, p))
            .collect();
        if others.is_empty() {
            continue;
        }
        others.sort();
        others.dedup_by_key(|(g, _)| *g);
        let theirs: Vec<String> = others
            .iter()
            .map(|(g, p)| format!("{g} (at {p})"))
            .collect();
        let ours: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        out.push(format!(
            "{} puts host IOMMU group {} behind PCI bridge '{}' with host IOMMU group {}: \
             the guest sees everything behind a conventional PCI bridge as one isolation \
             domain (allowed because port or pci_path was given)",
            here[0].path,
            ours.join(", "),
            bridge.id,
            theirs.join(", ")
        ));
    }
    out
}

#[cfg(test)]
#[path = "placement_tests.rs"]
mod tests;
