//! ACPI platform devices for a hardware-reduced ACPI machine: the Generic
//! Event Device and the PCI hotplug register block it announces.

mod ged;
mod pci_hotplug;

pub use ged::{Ged, GED_EVENT_PCI_HOTPLUG, GED_EVENT_POWER_BUTTON, GED_MMIO_SIZE};
pub use pci_hotplug::{EjectSink, PciHotplugController, PCI_HOTPLUG_MMIO_SIZE};
