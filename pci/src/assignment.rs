//! Which host functions a kernel VFIO request takes, and which guest function each becomes.
//!
//! Pure: the caller reads the host (sysfs: every PCI function with its driver, IOMMU group
//! and whether it is a bridge) into [`HostFunction`]s and gets an [`Assignment`] or an
//! [`AssignError`]. Where the guest slots go is [`crate::placement::choose_slots`].
//!
//! The rules:
//!
//! - **The unit.** A request names one host function. It takes every function of that host
//!   device, every endpoint of their IOMMU groups, every function of those endpoints'
//!   devices, and so on until nothing is added: an IOMMU group goes to one VM (one VFIO
//!   container) whole, and the functions of a device share one guest slot. Bridges in a
//!   group stay with the host (they keep their `pcieport` driver) and are not part of it.
//! - **Viable.** Every endpoint of the unit must be bound to `vfio-pci`: assigned ones are
//!   opened, the others are held (see below). The error names each one that is not, with
//!   its driver.
//! - **Assigned or held.** By default every endpoint of the unit goes to the guest. The user
//!   may leave functions out, but must name them (`unassigned`): the host loses them as
//!   well, since the VMM holds them (opened through VFIO, never shown to the guest) while
//!   the functions it assigned are attached. `assigned` names the functions to give the
//!   guest; then every other endpoint of the unit must be named in `unassigned`, and the
//!   error lists those that are not.
//! - **Guest functions.** Each host device with an assigned function is one guest slot; its
//!   functions keep their numbers. If function 0 of a device is left out, the lowest
//!   assigned function becomes guest function 0 (Linux finds functions 1-7 of a slot only
//!   through function 0): [`GuestDevice::remapped`] says which.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

/// The driver every endpoint of an assigned group must be bound to.
pub const VFIO_PCI_DRIVER: &str = "vfio-pci";

/// A host PCI function, `DDDD:BB:DD.F`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostBdf {
    /// PCI domain (segment).
    pub domain: u16,
    /// Bus.
    pub bus: u8,
    /// Device (slot), 0 to 31.
    pub device: u8,
    /// Function, 0 to 7.
    pub function: u8,
}

impl HostBdf {
    /// The host device the function belongs to: (domain, bus, device).
    pub fn device_key(&self) -> (u16, u8, u8) {
        (self.domain, self.bus, self.device)
    }

    /// The host device, `DDDD:BB:DD`.
    pub fn device_name(&self) -> String {
        format!("{:04x}:{:02x}:{:02x}", self.domain, self.bus, self.device)
    }
}

impl fmt::Display for HostBdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.device_name(), self.function)
    }
}

impl FromStr for HostBdf {
    type Err = String;

    /// `DDDD:BB:DD.F`, hexadecimal (either case), device up to 1f, function up to 7.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("'{s}' is not a host PCI function (expected DDDD:BB:DD.F)");
        let b = s.as_bytes();
        if b.len() != 12 || b[4] != b':' || b[7] != b':' || b[10] != b'.' {
            return Err(bad());
        }
        let hex = |r: std::ops::Range<usize>| -> Result<u32, String> {
            let t = &s[r];
            if !t.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u32::from_str_radix(t, 16).map_err(|_| bad())
        };
        let (domain, bus, device, function) = (hex(0..4)?, hex(5..7)?, hex(8..10)?, hex(11..12)?);
        if device > 0x1f || function > 7 {
            return Err(bad());
        }
        Ok(HostBdf {
            domain: domain as u16,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

/// What the host says of one PCI function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFunction {
    /// The function.
    pub bdf: HostBdf,
    /// The driver bound to it, if any.
    pub driver: Option<String>,
    /// Its IOMMU group, if it has one.
    pub group: Option<u32>,
    /// Whether it is a PCI bridge (class 0x0604): bridges stay with the host.
    pub bridge: bool,
}

/// A request: the function named, and optionally which functions go to the guest and which
/// are left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AssignRequest {
    /// The function the request names (`path`).
    pub function: Option<HostBdf>,
    /// The functions to give the guest; `None`: every endpoint of the unit not in
    /// `unassigned`.
    pub assigned: Option<Vec<HostBdf>>,
    /// The functions left out of the guest (held by the VMM).
    pub unassigned: Vec<HostBdf>,
}

/// One function as the guest sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestFunction {
    /// The host function.
    pub host: HostBdf,
    /// Its IOMMU group.
    pub group: u32,
    /// Its function number in the guest slot.
    pub function: u8,
}

/// One host device given to the guest: one guest slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestDevice {
    /// Its functions, by guest function number (function 0 first).
    pub functions: Vec<GuestFunction>,
    /// The host function given guest function 0 when host function 0 is left out.
    pub remapped: Option<HostBdf>,
}

/// What a request takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// The guest slots: the requested function's device first, then the other devices of
    /// its groups by host address.
    pub devices: Vec<GuestDevice>,
    /// Functions left out of the guest and held by the VMM, with their groups.
    pub held: Vec<(HostBdf, u32)>,
    /// Every IOMMU group of the unit, ascending.
    pub groups: Vec<u32>,
}

impl Assignment {
    /// Every host function of the unit, assigned or held.
    pub fn host_functions(&self) -> impl Iterator<Item = HostBdf> + '_ {
        self.devices
            .iter()
            .flat_map(|d| d.functions.iter().map(|f| f.host))
            .chain(self.held.iter().map(|(b, _)| *b))
    }
}

fn list(v: &[HostBdf]) -> String {
    v.iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn group_list(v: &[u32]) -> String {
    let s: Vec<String> = v.iter().map(|g| g.to_string()).collect();
    match s.len() {
        1 => format!("IOMMU group {}", s[0]),
        _ => format!("IOMMU groups {}", s.join(", ")),
    }
}

/// Why a request cannot be assigned.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AssignError {
    /// The named function is not on the host.
    #[error("host PCI function {0} does not exist")]
    NoSuchFunction(HostBdf),
    /// A bridge was named.
    #[error("host PCI function {0} is a PCI bridge: bridges stay with the host")]
    Bridge(HostBdf),
    /// The requested function is bound to another driver.
    #[error("PCI function {bdf} is bound to driver '{driver}', not vfio-pci")]
    WrongDriver {
        /// The function.
        bdf: HostBdf,
        /// Its driver.
        driver: String,
    },
    /// The requested function has no driver.
    #[error("PCI function {0} is not bound to vfio-pci (no driver)")]
    Unbound(HostBdf),
    /// A function of the unit has no IOMMU group.
    #[error("PCI function {0} has no IOMMU group (no IOMMU, or VFIO is not available)")]
    NoGroup(HostBdf),
    /// A function named in `assigned` or `unassigned` is outside the unit.
    #[error(
        "{named} ('{field}') is neither a function of host device {device} nor in its IOMMU groups ({groups})"
    )]
    NotInUnit {
        /// The option naming it.
        field: &'static str,
        /// The function.
        named: HostBdf,
        /// The requested device, `DDDD:BB:DD`.
        device: String,
        /// The unit's groups.
        groups: String,
    },
    /// Some endpoints are bound to another driver or to none.
    #[error(
        "{} of {bdf} is not viable: {} (every endpoint of the group goes to the VM, assigned or held: bind each to vfio-pci)",
        group_list(.groups),
        .offenders.iter().map(|(d, drv)| match drv {
            Some(drv) => format!("{d} is bound to {drv}"),
            None => format!("{d} is bound to no driver"),
        }).collect::<Vec<_>>().join(", ")
    )]
    NotViable {
        /// The requested function.
        bdf: HostBdf,
        /// The groups with offenders.
        groups: Vec<u32>,
        /// (function, its driver) for each endpoint in the way.
        offenders: Vec<(HostBdf, Option<String>)>,
    },
    /// A function is both assigned and unassigned.
    #[error("{0} is named in both 'assigned' and 'unassigned'")]
    Both(HostBdf),
    /// Endpoints of the unit neither assigned nor named as unassigned.
    #[error(
        "{} left out of the guest without being named: {} goes to this VM whole, so the VMM holds them from the host too; name them with unassigned={} or assign them",
        list(.functions),
        group_list(.groups),
        .functions.iter().map(|b| b.to_string()).collect::<Vec<_>>().join("+")
    )]
    LeftOut {
        /// The functions left out.
        functions: Vec<HostBdf>,
        /// The unit's groups.
        groups: Vec<u32>,
    },
    /// Nothing is left for the guest.
    #[error("every function of the request is unassigned: nothing is left for the guest")]
    NothingAssigned,
}

/// The endpoints a request for `start` takes: its device's functions, their groups'
/// endpoints, those endpoints' devices' functions, until nothing is added.
fn unit(host: &[HostFunction], start: HostBdf) -> BTreeSet<HostBdf> {
    let mut unit = BTreeSet::new();
    let mut todo: Vec<HostBdf> = vec![start];
    while let Some(b) = todo.pop() {
        for f in host.iter().filter(|f| !f.bridge) {
            let same_device = f.bdf.device_key() == b.device_key();
            let group = host.iter().find(|h| h.bdf == b).and_then(|h| h.group);
            let same_group = group.is_some() && f.group == group;
            if (same_device || same_group) && unit.insert(f.bdf) {
                todo.push(f.bdf);
            }
        }
    }
    unit
}

/// What the request takes from `host` (every PCI function of the host), per the rules of
/// the module.
pub fn assign(host: &[HostFunction], req: &AssignRequest) -> Result<Assignment, AssignError> {
    let find = |b: HostBdf| host.iter().find(|f| f.bdf == b);
    let start = req.function.ok_or(AssignError::NothingAssigned)?;
    let named = find(start).ok_or(AssignError::NoSuchFunction(start))?;
    match named.driver.as_deref() {
        Some(VFIO_PCI_DRIVER) => {}
        Some(d) => {
            return Err(AssignError::WrongDriver {
                bdf: start,
                driver: d.to_string(),
            })
        }
        None => return Err(AssignError::Unbound(start)),
    }
    if named.bridge {
        return Err(AssignError::Bridge(start));
    }
    let unit = unit(host, start);
    let mut groups = BTreeSet::new();
    for b in &unit {
        groups.insert(
            find(*b)
                .and_then(|f| f.group)
                .ok_or(AssignError::NoGroup(*b))?,
        );
    }
    let groups: Vec<u32> = groups.into_iter().collect();
    let check_named = |field: &'static str, list: &[HostBdf]| -> Result<(), AssignError> {
        for b in list {
            let f = find(*b).ok_or(AssignError::NoSuchFunction(*b))?;
            if f.bridge {
                return Err(AssignError::Bridge(*b));
            }
            if !unit.contains(b) {
                return Err(AssignError::NotInUnit {
                    field,
                    named: *b,
                    device: start.device_name(),
                    groups: group_list(&groups),
                });
            }
        }
        Ok(())
    };
    if let Some(a) = &req.assigned {
        check_named("assigned", a)?;
    }
    check_named("unassigned", &req.unassigned)?;
    let offenders: Vec<(HostBdf, Option<String>)> = unit
        .iter()
        .filter_map(|b| find(*b))
        .filter(|f| f.driver.as_deref() != Some(VFIO_PCI_DRIVER))
        .map(|f| (f.bdf, f.driver.clone()))
        .collect();
    if !offenders.is_empty() {
        let mut bad: Vec<u32> = offenders
            .iter()
            .filter_map(|(b, _)| find(*b).and_then(|f| f.group))
            .collect();
        bad.dedup();
        return Err(AssignError::NotViable {
            bdf: start,
            groups: bad,
            offenders,
        });
    }
    let unassigned: BTreeSet<HostBdf> = req.unassigned.iter().copied().collect();
    let assigned: BTreeSet<HostBdf> = match &req.assigned {
        Some(a) => {
            if let Some(b) = a.iter().find(|b| unassigned.contains(b)) {
                return Err(AssignError::Both(*b));
            }
            let a: BTreeSet<HostBdf> = a.iter().copied().collect();
            let left: Vec<HostBdf> = unit
                .iter()
                .filter(|b| !a.contains(b) && !unassigned.contains(b))
                .copied()
                .collect();
            if !left.is_empty() {
                return Err(AssignError::LeftOut {
                    functions: left,
                    groups,
                });
            }
            a
        }
        None => unit.difference(&unassigned).copied().collect(),
    };
    if assigned.is_empty() {
        return Err(AssignError::NothingAssigned);
    }
    let group_of = |b: &HostBdf| find(*b).and_then(|f| f.group).unwrap_or_default();
    let mut by_device: BTreeMap<(u16, u8, u8), Vec<HostBdf>> = BTreeMap::new();
    for b in &assigned {
        by_device.entry(b.device_key()).or_default().push(*b);
    }
    let mut keys: Vec<(u16, u8, u8)> = by_device.keys().copied().collect();
    // The requested device first (it may be all held: then the lowest).
    keys.sort_by_key(|k| (*k != start.device_key(), *k));
    let devices = keys
        .iter()
        .filter_map(|k| by_device.get(k))
        .map(|fns| {
            let remapped = (fns[0].function != 0).then_some(fns[0]);
            let functions = fns
                .iter()
                .enumerate()
                .map(|(i, b)| GuestFunction {
                    host: *b,
                    group: group_of(b),
                    function: if i == 0 { 0 } else { b.function },
                })
                .collect();
            GuestDevice {
                functions,
                remapped,
            }
        })
        .collect();
    let held = unassigned.iter().map(|b| (*b, group_of(b))).collect();
    Ok(Assignment {
        devices,
        held,
        groups,
    })
}

#[cfg(test)]
#[path = "assignment_tests.rs"]
mod tests;
