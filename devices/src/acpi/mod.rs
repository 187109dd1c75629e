//! ACPI platform devices for a hardware-reduced ACPI machine.

mod ged;

pub use ged::{Ged, GED_EVENT_PCI_HOTPLUG, GED_EVENT_POWER_BUTTON, GED_MMIO_SIZE};
