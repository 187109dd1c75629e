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
    /// device. ACPI port slots: the port's [`PortNode::device_slots`] minus cold-plugged ones.
    /// Native ports: every port with [`HotplugMode::Native`].
    pub fn new(topology: &Topology, cold: &[PciPath]) -> HotplugPlan {
        let port_slots = topology.root_slots_used();
        let root_slots: Vec<u8> = (1..NUM_SLOTS)
            .filter(|s| !port_slots.contains(s))
            .filter(|s| !cold.iter().any(|c| c.len() == 1 && c.last().slot == *s))
            .collect();
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
    /// Whether the device is hot-plugged (the VM runs).
    pub hotplug: bool,
}

/// The chosen place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    /// Function 0 of the chosen slot.
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
}

/// Whether any function of the root bus `slot` holds a device.
fn root_slot_busy(slot: u8, occupied: &dyn Fn(&PciPath) -> bool) -> bool {
    (0..NUM_FUNCTIONS).any(|function| occupied(&PciPath::root(PciSlot { slot, function })))
}

/// First free root bus slot for a cold-plugged device: slot 1..=31 where no port sits and no
/// function is occupied (slot 0 holds the host bridge).
fn free_root_slot(topology: &Topology, occupied: &dyn Fn(&PciPath) -> bool) -> Option<u8> {
    let ports = topology.root_slots_used();
    (1..NUM_SLOTS).find(|s| !ports.contains(s) && !root_slot_busy(*s, occupied))
}

/// Paths of the free `slots` of `node`, in order.
fn free_paths<'a>(
    node: &'a PortNode,
    slots: &'a [u8],
    occupied: &'a dyn Fn(&PciPath) -> bool,
) -> impl Iterator<Item = PciPath> + 'a {
    slots
        .iter()
        .filter_map(|s| node.device_path(*s))
        .filter(|p| !occupied(p))
}

/// The device path `text` names, validated against the topology and `want` (the port the
/// caller named, if any).
fn exact_path(
    topology: &Topology,
    text: &str,
    want: Option<&str>,
) -> Result<(PciPath, Option<String>), PlacementError> {
    let bad = |reason: String| PlacementError::BadPath {
        path: text.to_string(),
        reason,
    };
    let path: PciPath = text
        .parse()
        .map_err(|e: crate::PciPathError| bad(e.to_string()))?;
    if path.last().function != 0 {
        return Err(bad(
            "multifunction placement is not supported; use function 0".into(),
        ));
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
    hotplug: bool,
) -> Result<PciPath, PlacementError> {
    let node = topology
        .port(id)
        .ok_or_else(|| PlacementError::UnknownPort(id.to_string()))?;
    if node.device_slots().is_empty() {
        return Err(PlacementError::NoDeviceSlot(id.to_string()));
    }
    let mut free = free_paths(node, node.device_slots(), occupied).peekable();
    let first = free
        .peek()
        .cloned()
        .ok_or_else(|| PlacementError::PortFull(id.to_string()))?;
    if hotplug {
        if let Some(p) = free.find(|p| plan.mechanism(Some(id), p) != SlotMechanism::None) {
            return Ok(p);
        }
    }
    Ok(first)
}

/// The first free root-bus slot with ACPI hotplug.
fn free_hotplug_root_path(
    plan: &HotplugPlan,
    occupied: &dyn Fn(&PciPath) -> bool,
) -> Option<PciPath> {
    plan.root_slots()
        .iter()
        .map(|s| root_path(*s))
        .find(|p| !occupied(p))
}

/// The first free hotplug slot in `order`.
fn automatic(
    topology: &Topology,
    plan: &HotplugPlan,
    order: &[PlaceKind],
    occupied: &dyn Fn(&PciPath) -> bool,
) -> Option<(PciPath, Option<String>)> {
    for kind in order {
        let found = match kind {
            PlaceKind::Root => free_hotplug_root_path(plan, occupied).map(|p| (p, None)),
            PlaceKind::Native => plan.native_ports().iter().find_map(|id| {
                let node = topology.port(id)?;
                let path = free_paths(node, node.device_slots(), occupied).next()?;
                Some((path, Some(id.clone())))
            }),
            PlaceKind::Acpi => plan.acpi_buses().iter().find_map(|bus| {
                let id = bus.port.as_ref()?;
                let node = topology.port(id)?;
                let path = free_paths(node, &bus.slots, occupied).next()?;
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
/// 1. an exact `pci_path` (function 0, an open slot per [`Topology::check_device_path`], a
///    slot of `port` if both are given, not slot 00 of the root bus);
/// 2. else the first free slot of `port` ([`PlacementError::UnknownPort`],
///    [`PlacementError::NoDeviceSlot`], [`PlacementError::PortFull`]);
/// 3. else, for cold plug, the first root bus slot 1..=31 holding neither a port nor a device
///    (the plan is not consulted: it may be `HotplugPlan::new(topology, &[])`);
/// 4. else, for hotplug, the first free hotplug slot in `order`: native ports in topology
///    order, ACPI bridge slots in bsel order, root bus hotplug slots.
///
/// Finally the place is refused with [`PlacementError::SlotTaken`] if `occupied` says a
/// device is there, and with [`PlacementError::NotHotplugSlot`] for a hot-plugged device if
/// the plan gives the slot no mechanism.
pub fn choose(
    topology: &Topology,
    plan: &HotplugPlan,
    order: &[PlaceKind],
    occupied: &dyn Fn(&PciPath) -> bool,
    req: &PlaceRequest<'_>,
) -> Result<Place, PlacementError> {
    let (path, port) = match (req.pci_path, req.port) {
        (Some(text), want) => exact_path(topology, text, want)?,
        (None, Some(ROOT_BUS_ID)) if req.hotplug => (
            free_hotplug_root_path(plan, occupied)
                .ok_or_else(|| PlacementError::PortFull(ROOT_BUS_ID.to_string()))?,
            None,
        ),
        (None, Some(id)) if id != ROOT_BUS_ID => (
            slot_of_port(topology, plan, occupied, id, req.hotplug)?,
            Some(id.to_string()),
        ),
        (None, _) if !req.hotplug => {
            let slot = free_root_slot(topology, occupied).ok_or(PlacementError::NoFreeSlot)?;
            (root_path(slot), None)
        }
        (None, _) => {
            automatic(topology, plan, order, occupied).ok_or(PlacementError::NoFreeSlot)?
        }
    };
    if occupied(&path) {
        return Err(PlacementError::SlotTaken(path));
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

#[cfg(test)]
#[path = "placement_tests.rs"]
mod tests;
