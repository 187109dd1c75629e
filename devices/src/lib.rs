//! Device models for Arbor: legacy platform devices and (in `virtio`) the
//! virtio-pci transport with its devices; (in `vfio`) PCI passthrough. Nothing here talks to KVM; the
//! VMM registers these models on its buses and wires their interrupts.

pub mod acpi;
pub mod legacy;
pub mod log_limit;
pub mod vfio;
pub mod virtio;
