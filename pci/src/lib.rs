//! PCI emulation building blocks for Arbor.
//!
//! This crate contains no KVM code: it models PCI configuration spaces, capabilities,
//! BARs, the configuration access mechanisms (ECAM and the legacy `0xCF8`/`0xCFC` ports) and
//! the bus topology that routes configuration cycles to devices. The VMM owns the glue:
//! it places devices (see [`allocator`]), dispatches guest accesses to [`PciRoot`] and reacts to
//! the [`ConfigWriteOutcome`] values returned by configuration writes (BAR moves, decode
//! enable/disable, MSI/MSI-X changes).
//!
//! Module map:
//! - [`config`]: the configuration space register file with read-only, read-write and
//!   write-1-to-clear semantics, header types 0 and 1, and the capability list.
//! - [`bar`]: BAR descriptions and register encoding.
//! - [`msi`], [`msix`]: MSI capability and MSI-X table/PBA state machines.
//! - [`pcie_cap`]: the PCI Express capability (endpoints, root ports, switch ports, bridges).
//! - [`pm`]: the power management capability.
//! - [`interrupt`]: the [`MsiInterruptGroup`] trait the VMM implements (GSI routing + irqfd).
//! - [`intx`]: INTx routing (bridge swizzle and the root bus's lines), shared by the VMM's
//!   interrupt wiring and its `_PRT`.
//! - [`device`]: the [`PciDevice`] trait and the values describing what a write changed.
//! - [`bus`]: the bus tree and the root that routes accesses by bus/device/function.
//! - [`ecam`], [`config_io`]: decoding of MMCONFIG and CF8/CFC accesses.
//! - [`host_bridge`]: the host bridge at 00:00.0.
//! - [`port`]: [`PciePort`], the PCI Express root/switch ports and PCI bridges with native
//!   hot-plug slots and their hot-plug state machine.
//! - [`topology`]: [`Topology`], the firmware's job for a tree of ports (slots, paths, bus
//!   numbers, forwarding windows, physical slot numbers) and the creation of the ports.
//! - [`path`]: [`PciPath`] (slot path from the root bus) and resolvers to guest BDFs.
//! - [`allocator`]: BAR address allocation from the VMM's PCI windows.
//! - [`placement`]: the hotplug plan ([`HotplugPlan`]: which slots hotplug, by which
//!   mechanism) and the placement policy ([`placement::choose`]) for new devices.

pub mod allocator;
pub mod assignment;
pub mod bar;
pub mod bus;
pub mod config;
pub mod config_io;
pub mod device;
pub mod ecam;
pub mod host_bridge;
pub mod interrupt;
pub mod intx;
pub mod msi;
pub mod msix;
pub mod path;
pub mod pcie_cap;
pub mod placement;
pub mod pm;
pub mod port;
pub mod topology;

pub use allocator::{BarAllocator, BarAssignment, BarPlacement};
pub use bar::{BarRegion, PciBarConfig};
pub use bus::{ConfigWriteResult, PciBdf, PciBus, PciRoot, SharedPciDevice};
pub use config::{BridgeWindows, BusNumbers, HeaderType, PciConfigParams, PciConfiguration};
pub use config_io::PciConfigIo;
pub use device::{
    BarChange, BarInfo, ConfigWriteOutcome, DirectArea, HostMapping, IoEventNotifier, PciDevice,
};
pub use ecam::EcamAddress;
pub use host_bridge::HostBridge;
pub use interrupt::{IntxInterrupt, MsiInterruptGroup, MsiMessage, RecordingMsiGroup};
pub use msi::{MsiCapability, MsiConfig};
pub use msix::{MsixCapability, MsixConfig};
pub use path::{PciPath, PciPathError, PciSlot};
pub use pcie_cap::{PcieCapability, PciePortType};
pub use placement::{
    AcpiHotplugBus, HotplugPlan, Place, PlaceKind, PlaceRequest, PlacementError, SlotMechanism,
};
pub use pm::PmCapability;
pub use port::{PciePort, PciePortKind, PciePortParams};
pub use topology::{
    HostWindows, HotplugMode, PortDevice, PortKind, PortNode, PortSpec, PortWindows, Topology,
    TopologyError, TopologyOptions,
};

/// Errors returned by the PCI building blocks.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    /// A BAR index outside of what the header type supports.
    #[error("invalid BAR index {0}")]
    InvalidBarIndex(usize),
    /// A BAR size that is not a power of two or is below the minimum for its region type.
    #[error("invalid BAR size {size:#x} for BAR {index}")]
    InvalidBarSize {
        /// BAR index.
        index: usize,
        /// Requested size.
        size: u64,
    },
    /// The BAR (or the upper half of a 64-bit BAR) is already in use.
    #[error("BAR {0} is already in use")]
    BarInUse(usize),
    /// The BAR has not been configured.
    #[error("BAR {0} is not configured")]
    BarNotConfigured(usize),
    /// An address that is not aligned to the BAR size or does not fit the BAR type.
    #[error("address {addr:#x} is invalid for BAR {index}")]
    InvalidBarAddress {
        /// BAR index.
        index: usize,
        /// Rejected address.
        addr: u64,
    },
    /// No room left in the capability list.
    #[error("no space left for capability {0:#x}")]
    CapabilitySpaceFull(u16),
    /// Extended capabilities need a PCI Express (4 KiB) configuration space.
    #[error("extended capabilities need an extended configuration space")]
    NoExtendedConfigSpace,
    /// The capability cannot be added twice.
    #[error("capability {0:#x} already present")]
    DuplicateCapability(u8),
    /// Invalid capability parameters.
    #[error("invalid capability: {0}")]
    InvalidCapability(&'static str),
    /// Slot or function number out of range.
    #[error("invalid device {device:#x} / function {function}")]
    InvalidDeviceFunction {
        /// Device (slot) number.
        device: u8,
        /// Function number.
        function: u8,
    },
    /// The bus/device/function is already occupied.
    #[error("{0} is already occupied")]
    SlotOccupied(PciBdf),
    /// No free slot on the bus.
    #[error("no free slot on the bus")]
    NoFreeSlot,
    /// The path does not lead to a bus (a non-final element is not a bridge).
    #[error("{0} is not a bridge")]
    NotABridge(String),
    /// Nothing at the given location.
    #[error("no device at {0}")]
    NoDevice(String),
    /// A BDF string that is not `[DDDD:]BB:SS.F` in hex (domain 0).
    #[error("malformed BDF '{0}': expected [0000:]BB:SS.F in hex")]
    BadBdf(String),
    /// Address allocation failed.
    #[error("address allocation failed: {0}")]
    Allocation(String),
    /// A hot-plug operation on a port without a native hot-plug slot.
    #[error("the port has no native hot-plug slot")]
    NoHotplugSlot,
}
