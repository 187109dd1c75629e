//! ACPI tables, built with `acpi_tables` and written to guest memory at
//! `ACPI_START`: RSDP, XSDT, FADT (hardware-reduced, with sleep and reset
//! registers), MADT, DSDT, plus any tables the device manager adds (MCFG).
//!
//! The DSDT is kept cheap for the guest to load, because its ACPI
//! interpreter builds it object by object before any device is probed:
//! - every method is declared `Serialized`: Linux's ACPICA parses each
//!   `NotSerialized` method's whole body when it loads the table (to find
//!   methods that create named objects and serialize them itself), and
//!   skips methods already serialized. The methods here are short and
//!   never run concurrently with themselves in any useful way;
//! - the root bus's `_PRT` lists only the (slot, pin) pairs a device can
//!   assert ([`pci::intx::routed_root_pins`]), not all 128.
//!
//! Measured with ACPICA's `acpiexec` under callgrind (`resources/bench/acpi-cost.py`).

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::{Immutable, IntoBytes};

use devices::legacy::{ACPI_PM_PORT, RESET_VALUE, SERIAL_PORT, SERIAL_PORT_LEN, SLEEP_TYPE_S5};

use crate::layout::{ACPI_SIZE, ACPI_START, APIC_START, IOAPIC_START};

pub const OEM_ID: [u8; 6] = *b"ARBOR ";
pub const OEM_TABLE_ID: [u8; 8] = *b"ARBORVMM";
pub const OEM_REVISION: u32 = 1;

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables ({0} bytes) do not fit in the {1}-byte ACPI region")]
    TooLarge(u64, u64),
    #[error("cannot write ACPI tables to guest memory")]
    Write,
}

/// MADT interrupt source override (type 2).
#[repr(C, packed)]
#[derive(Clone, Copy, Default, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    type_: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// MADT local APIC NMI (type 4).
#[repr(C, packed)]
#[derive(Clone, Copy, Default, IntoBytes, Immutable)]
struct LocalApicNmi {
    type_: u8,
    length: u8,
    processor_uid: u8,
    flags: u16,
    lint: u8,
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.as_bytes());
    }
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    // The IOAPIC's ID follows the CPUs' APIC IDs.
    madt.add_structure(IoApic::new(cpus, IOAPIC_START as u32, 0));
    // ISA IRQ 0 (the PIT) arrives on GSI 2; IRQ 9 is level, active high.
    madt.add_structure(InterruptSourceOverride {
        type_: 2,
        length: 10,
        bus: 0,
        source: 0,
        gsi: 2,
        flags: 0,
    });
    madt.add_structure(InterruptSourceOverride {
        type_: 2,
        length: 10,
        bus: 0,
        source: 9,
        gsi: 9,
        flags: 0xd,
    });
    // LINT1 of every processor is the NMI line.
    madt.add_structure(LocalApicNmi {
        type_: 4,
        length: 6,
        processor_uid: 0xff,
        flags: 0,
        lint: 1,
    });
    let mut bytes = Vec::new();
    madt.to_aml_bytes(&mut bytes);
    bytes
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(port),
        )
    };
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.reset_reg = io(ACPI_PM_PORT + 2);
    fadt.reset_value = RESET_VALUE;
    fadt.sleep_control_reg = io(ACPI_PM_PORT);
    fadt.sleep_status_reg = io(ACPI_PM_PORT + 1);
    // "KVMKVMKVM" is what Linux reports; identify the VMM instead.
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"ARBORVMM").into();
    let mut bytes = Vec::new();
    fadt.finalize().to_aml_bytes(&mut bytes);
    bytes
}

/// The DSDT body every VM has: the UART, the CMOS clock and the S5 sleep
/// object.
pub fn platform_aml() -> Vec<u8> {
    let mut out = Vec::new();
    let hid = aml::EISAName::new("PNP0501");
    let io = aml::IO::new(SERIAL_PORT, SERIAL_PORT, 0, SERIAL_PORT_LEN as u8);
    let irq = aml::Interrupt::new(true, true, false, false, crate::device_manager::SERIAL_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    let name_hid = aml::Name::new("_HID".into(), &hid);
    let name_uid = aml::Name::new("_UID".into(), &0u8);
    let name_crs = aml::Name::new("_CRS".into(), &crs);
    let com1 = aml::Device::new("COM1".into(), vec![&name_hid, &name_uid, &name_crs]);
    let rtc_hid = aml::EISAName::new("PNP0B00");
    let rtc_io = aml::IO::new(0x70, 0x70, 1, 2);
    let rtc_crs = aml::ResourceTemplate::new(vec![&rtc_io]);
    let rtc_name_hid = aml::Name::new("_HID".into(), &rtc_hid);
    let rtc_name_crs = aml::Name::new("_CRS".into(), &rtc_crs);
    let rtc = aml::Device::new("RTC_".into(), vec![&rtc_name_hid, &rtc_name_crs]);
    let sb = aml::Scope::new("\\_SB_".into(), vec![&com1, &rtc]);
    sb.to_aml_bytes(&mut out);
    let s5 = aml::Package::new(vec![&SLEEP_TYPE_S5, &SLEEP_TYPE_S5, &0u8, &0u8]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut out);
    out
}

/// The Generic Event Device and the power button. `_EVT` reads the GED's
/// event register at `mmio` (reading clears it), notifies the power button
/// for `power_bit` and calls `\_SB_.HPSC` (the hotplug scan method
/// `pci_hotplug_aml` defines) for `hotplug_bit`.
pub fn ged_aml(mmio: u64, gsi: u32, power_bit: u32, hotplug_bit: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let hid = "ACPI0013";
    let name_hid = aml::Name::new("_HID".into(), &hid);
    let name_uid = aml::Name::new("_UID".into(), &0u8);
    let irq = aml::Interrupt::new(true, true, false, false, gsi);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let name_crs = aml::Name::new("_CRS".into(), &crs);
    let region = aml::OpRegion::new(
        "GDST".into(),
        aml::OpRegionSpace::SystemMemory,
        &mmio,
        &4u32,
    );
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 32)],
    );
    let gdat = aml::Path::new("GDAT");
    let read = aml::Store::new(&aml::Local(0), &gdat);
    let power_mask = aml::And::new(&aml::Local(1), &aml::Local(0), &power_bit);
    let power_set = aml::Equal::new(&aml::Local(1), &power_bit);
    let pwrb = aml::Path::new("\\_SB_.PWRB");
    let notify = aml::Notify::new(&pwrb, &0x80u8);
    let if_power = aml::If::new(&power_set, vec![&notify]);
    let hp_mask = aml::And::new(&aml::Local(2), &aml::Local(0), &hotplug_bit);
    let hp_set = aml::Equal::new(&aml::Local(2), &hotplug_bit);
    let scan = aml::MethodCall::new("\\_SB_.HPSC".into(), vec![]);
    let if_hp = aml::If::new(&hp_set, vec![&scan]);
    let evt = aml::Method::new(
        "_EVT".into(),
        1,
        true,
        vec![&read, &power_mask, &if_power, &hp_mask, &if_hp],
    );
    let ged = aml::Device::new(
        "GED0".into(),
        vec![&name_hid, &name_uid, &name_crs, &region, &field, &evt],
    );
    let pb_hid = aml::EISAName::new("PNP0C0C");
    let pb_name_hid = aml::Name::new("_HID".into(), &pb_hid);
    let pb_name_uid = aml::Name::new("_UID".into(), &0u8);
    let pwrb_dev = aml::Device::new("PWRB".into(), vec![&pb_name_hid, &pb_name_uid]);
    aml::Scope::new("\\_SB_".into(), vec![&ged, &pwrb_dev]).to_aml_bytes(&mut out);
    out
}

/// Where the PCI root complex decodes.
#[derive(Clone, Copy, Debug)]
pub struct PciWindows {
    /// 32-bit memory window (base, size).
    pub mmio32: (u64, u64),
    /// 64-bit memory window (base, size).
    pub mmio64: (u64, u64),
    /// Bus numbers the root complex owns.
    pub buses: (u8, u8),
}

/// The bus numbers the root complex owns (`_CRS`, and MCFG's ECAM range):
/// up to `last_bus`, the topology's last one, because x86 Linux probes
/// every bus up to MCFG's end that it did not find behind a bridge (32
/// configuration reads each: 0.6 s of an emulated boot for buses 09-ff).
/// Arbor fixes the bus numbers and never adds a port, so no bus appears
/// later, unless the guest numbers the buses itself (`pci=assign-busses`
/// on `cmdline`, the only way Arbor's direct-booted Linux guests do): then
/// all 256, so that it has room to.
pub fn root_bus_range(last_bus: u8, cmdline: &str) -> (u8, u8) {
    let renumbers = cmdline
        .split_whitespace()
        .filter_map(|t| t.strip_prefix("pci="))
        .any(|opts| opts.split(',').any(|o| o == "assign-busses"));
    if renumbers {
        (0, 0xff)
    } else {
        (0, last_bus)
    }
}

/// The `_OSC` control bits Arbor grants: native hotplug (bit 0) and PCIe
/// capability structure control (bit 4). AER (bit 3) is kept, and so is PME
/// (bit 2): no port ever sends a PME message, and with PME control Linux
/// registers a PME service device on every root port (about 75 ms of guest
/// boot per port under emulation, see `resources/bench/README.md`).
pub const OSC_GRANTED: u32 = 0x11;

/// The PCI host bridge `PCI0` (PNP0A08, compatible PNP0A03) with its
/// resources, `_OSC`, `_DSM` and `_PRT`; `root_pins` are the (slot, pin)
/// pairs the `_PRT` routes ([`pci::intx::routed_root_pins`]).
pub fn host_bridge_aml(w: &PciWindows, root_pins: &[(u8, u8)], extra_children: &[u8]) -> Vec<u8> {
    let hid = aml::EISAName::new("PNP0A08");
    let cid = aml::EISAName::new("PNP0A03");
    let name_hid = aml::Name::new("_HID".into(), &hid);
    let name_cid = aml::Name::new("_CID".into(), &cid);
    let name_adr = aml::Name::new("_ADR".into(), &0u8);
    let name_seg = aml::Name::new("_SEG".into(), &0u8);
    let name_uid = aml::Name::new("_UID".into(), &0u8);
    let name_bbn = aml::Name::new("_BBN".into(), &w.buses.0);
    let buses =
        aml::AddressSpace::<u16>::new_bus_number(u16::from(w.buses.0), u16::from(w.buses.1));
    let cfg_io = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_lo = aml::AddressSpace::<u16>::new_io(0x0000, 0x0cf7, None);
    let io_hi = aml::AddressSpace::<u16>::new_io(0x0d00, 0xffff, None);
    let mmio32 = aml::AddressSpace::<u32>::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        w.mmio32.0 as u32,
        (w.mmio32.0 + w.mmio32.1 - 1) as u32,
        None,
    );
    let mmio64 = aml::AddressSpace::<u64>::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        w.mmio64.0,
        w.mmio64.0 + w.mmio64.1 - 1,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&buses, &cfg_io, &io_lo, &io_hi, &mmio32, &mmio64]);
    let name_crs = aml::Name::new("_CRS".into(), &crs);

    // _OSC(Arg0 = UUID, Arg1 = revision, Arg2 = count, Arg3 = capabilities)
    let cdw1 = aml::Path::new("CDW1");
    let cdw3 = aml::Path::new("CDW3");
    let create1 = aml::CreateDWordField::new(&cdw1, &aml::Arg(3), &0u8);
    let create3 = aml::CreateDWordField::new(&cdw3, &aml::Arg(3), &8u8);
    let pcie_uuid = aml::Uuid::new("33DB4D5B-1FF7-401C-9657-7441C03DD766");
    let is_pcie = aml::Equal::new(&aml::Arg(0), &pcie_uuid);
    let grant = aml::And::new(&cdw3, &cdw3, &OSC_GRANTED);
    let ret = aml::Return::new(&aml::Arg(3));
    let if_pcie = aml::If::new(&is_pcie, vec![&create3, &grant, &ret]);
    // Unrecognised UUID: set bit 2 of the first dword.
    let unknown = aml::Or::new(&cdw1, &cdw1, &4u8);
    let else_other = aml::Else::new(vec![&unknown, &ret]);
    let osc = aml::Method::new(
        "_OSC".into(),
        4,
        true,
        vec![&create1, &if_pcie, &else_other],
    );

    // _DSM(PCI firmware UUID): function 5 answers 0, "keep the boot
    // configuration": the OS must not move the bus numbers and windows the
    // VMM gave the bridges (they hold the hotplug reservations).
    let dsm_uuid = aml::Uuid::new("E5C937D0-3553-4D7A-9117-EA4D19C3434D");
    let is_pci_fw = aml::Equal::new(&aml::Arg(0), &dsm_uuid);
    let supported = aml::BufferData::new(vec![0x21]); // functions 0 and 5
    let ret_supported = aml::Return::new(&supported);
    let is_query = aml::Equal::new(&aml::Arg(2), &0u8);
    let if_query = aml::If::new(&is_query, vec![&ret_supported]);
    let ret_zero = aml::Return::new(&0u8);
    let is_keep = aml::Equal::new(&aml::Arg(2), &5u8);
    let if_keep = aml::If::new(&is_keep, vec![&ret_zero]);
    let if_fw = aml::If::new(&is_pci_fw, vec![&if_query, &if_keep]);
    let none = aml::BufferData::new(vec![0]);
    let ret_none = aml::Return::new(&none);
    let dsm = aml::Method::new("_DSM".into(), 4, true, vec![&if_fw, &ret_none]);

    // _PRT: the root-bus (slot, pin) pairs a device can assert (see
    // pci::intx::routed_root_pins), over the eight IOAPIC lines 16-23
    // (devices behind bridges are swizzled by the guest).
    let prt_entries: Vec<(u32, u8, u32)> = root_pins
        .iter()
        .map(|&(slot, pin)| {
            (
                (u32::from(slot) << 16) | 0xffff,
                pin,
                pci::intx::root_intx_gsi(slot, pin),
            )
        })
        .collect();
    let prt_packages: Vec<aml::Package> = prt_entries
        .iter()
        .map(|(adr, pin, gsi)| aml::Package::new(vec![adr, pin, &0u8, gsi]))
        .collect();
    let prt_refs: Vec<&dyn Aml> = prt_packages.iter().map(|p| p as &dyn Aml).collect();
    let prt = aml::Package::new(prt_refs);
    let name_prt = aml::Name::new("_PRT".into(), &prt);

    let mut children: Vec<&dyn Aml> = vec![
        &name_hid, &name_cid, &name_adr, &name_seg, &name_uid, &name_bbn, &name_crs, &osc, &dsm,
        &name_prt,
    ];
    let raw = RawAml(extra_children);
    children.push(&raw);
    let pci0 = aml::Device::new("PCI0".into(), children);
    let mut out = Vec::new();
    aml::Scope::new("\\_SB_".into(), vec![&pci0]).to_aml_bytes(&mut out);
    out
}

/// Pre-serialised AML spliced into a container.
pub struct RawAml<'a>(pub &'a [u8]);

impl Aml for RawAml<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.0);
    }
}

/// The MCFG table: one ECAM window for segment 0.
pub fn mcfg(ecam_base: u64, buses: (u8, u8)) -> Vec<u8> {
    let mut t = acpi_tables::mcfg::MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.add_ecam(ecam_base, 0, buses.0, buses.1);
    let mut out = Vec::new();
    t.to_aml_bytes(&mut out);
    out
}

/// ACPI name of the hotplug slot object for `slot`.
pub fn slot_name(slot: u8) -> String {
    format!("S{slot:03X}")
}

/// A PCI bus as the DSDT describes it for ACPI hotplug: the bus selector
/// (when the bus has ACPI hotplug slots), its hotplug slots, and the bridges
/// on it that lead to further described buses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AcpiBus {
    /// BSEL value of this bus; `None` for a bus without ACPI hotplug.
    pub bsel: Option<u32>,
    /// Slots of this bus open to ACPI hotplug.
    pub slots: Vec<u8>,
    /// (slot, bus behind the bridge in that slot).
    pub bridges: Vec<(u8, AcpiBus)>,
}

impl AcpiBus {
    /// The root bus as `plan` describes it: its ACPI slots, and the
    /// bridges on the way to every bus with ACPI hotplug slots. Reads the
    /// plan only; the DSDT never decides which slots hotplug.
    pub fn from_plan(topology: &pci::Topology, plan: &pci::placement::HotplugPlan) -> AcpiBus {
        fn below(
            topology: &pci::Topology,
            plan: &pci::placement::HotplugPlan,
            parent: Option<&str>,
        ) -> Vec<(u8, AcpiBus)> {
            let mut out = Vec::new();
            for node in topology
                .ports()
                .iter()
                .filter(|n| n.parent.as_deref() == parent)
            {
                let bridges = below(topology, plan, Some(&node.id));
                let bus = plan
                    .acpi_buses()
                    .iter()
                    .find(|b| b.port.as_deref() == Some(node.id.as_str()));
                if bus.is_none() && bridges.is_empty() {
                    continue;
                }
                out.push((
                    node.path.last().slot,
                    AcpiBus {
                        bsel: bus.map(|b| b.bsel),
                        slots: bus.map(|b| b.slots.clone()).unwrap_or_default(),
                        bridges,
                    },
                ));
            }
            out
        }
        AcpiBus {
            bsel: Some(0),
            slots: plan.root_slots().to_vec(),
            bridges: below(topology, plan, None),
        }
    }
}

/// The `_SUN` (slot number shown to the user) of `slot` on bus `bsel`.
pub fn slot_sun(bsel: u32, slot: u8) -> u32 {
    bsel * 32 + u32::from(slot)
}

/// Serialises one bus's objects into `out`, returning the (ACPI path,
/// bsel) of every bus with hotplug slots in this subtree.
fn acpi_bus_aml(bus: &AcpiBus, scope: &str, out: &mut Vec<u8>, found: &mut Vec<(String, u32)>) {
    // Bridges: a device object per bridge, holding its bus's objects.
    for (slot, child) in &bus.bridges {
        let path = format!("{scope}.{}", slot_name(*slot));
        let adr = u32::from(*slot) << 16;
        let name_adr = aml::Name::new("_ADR".into(), &adr);
        let mut inner = Vec::new();
        acpi_bus_aml(child, &path, &mut inner, found);
        let raw = RawAml(&inner);
        let dev = aml::Device::new(slot_name(*slot).as_str().into(), vec![&name_adr, &raw]);
        dev.to_aml_bytes(out);
    }
    let Some(bsel) = bus.bsel else {
        return;
    };
    found.push((scope.to_string(), bsel));
    let slots: Vec<u8> = bus
        .slots
        .iter()
        .copied()
        .filter(|s| !bus.bridges.iter().any(|(b, _)| b == s))
        .collect();
    for slot in &slots {
        let adr = u32::from(*slot) << 16;
        let sun = slot_sun(bsel, *slot);
        let name_adr = aml::Name::new("_ADR".into(), &adr);
        let name_sun = aml::Name::new("_SUN".into(), &sun);
        let slot_u32 = u32::from(*slot);
        let call = aml::MethodCall::new("\\_SB_.PCI0.PCEJ".into(), vec![&bsel, &slot_u32]);
        let ej0 = aml::Method::new("_EJ0".into(), 1, true, vec![&call]);
        aml::Device::new(
            slot_name(*slot).as_str().into(),
            vec![&name_adr, &name_sun, &ej0],
        )
        .to_aml_bytes(out);
    }
    // DVNT(bitmap, event): notify every slot of this bus whose bit is set.
    let bits: Vec<u32> = slots.iter().map(|s| 1u32 << s).collect();
    let masks: Vec<aml::And> = bits
        .iter()
        .map(|b| aml::And::new(&aml::Local(0), &aml::Arg(0), b))
        .collect();
    let tests: Vec<aml::Equal> = bits
        .iter()
        .map(|b| aml::Equal::new(&aml::Local(0), b))
        .collect();
    let names: Vec<String> = slots.iter().map(|s| slot_name(*s)).collect();
    let paths: Vec<aml::Path> = names.iter().map(|n| aml::Path::new(n)).collect();
    let notifies: Vec<aml::Notify> = paths
        .iter()
        .map(|p| aml::Notify::new(p, &aml::Arg(1)))
        .collect();
    let ifs: Vec<aml::If> = (0..slots.len())
        .map(|i| aml::If::new(&tests[i], vec![&notifies[i]]))
        .collect();
    let mut body: Vec<&dyn Aml> = Vec::new();
    for i in 0..slots.len() {
        body.push(&masks[i]);
        body.push(&ifs[i]);
    }
    aml::Method::new("DVNT".into(), 2, true, body).to_aml_bytes(out);
}

/// ACPI PCI hotplug: the register block, the slot objects of every bus
/// with ACPI hotplug (`_ADR`, `_SUN`, `_EJ0`), bridge objects leading to
/// them, the `PCNT` scan that walks every bus selector and notifies slots
/// from the PCIU/PCID bitmaps, and `\_SB_.HPSC`, which the GED's `_EVT`
/// calls. `root` is the root bus (bus selector 0).
pub fn pci_hotplug_aml(mmio: u64, root: &AcpiBus) -> Vec<u8> {
    let region = aml::OpRegion::new(
        "PCST".into(),
        aml::OpRegionSpace::SystemMemory,
        &mmio,
        &16u32,
    );
    let field = aml::Field::new(
        "PCST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Named(*b"PCIU", 32),
            aml::FieldEntry::Named(*b"PCID", 32),
            aml::FieldEntry::Named(*b"B0EJ", 32),
            aml::FieldEntry::Named(*b"BSEL", 32),
        ],
    );
    let mutex = aml::Mutex::new("BLCK".into(), 0);
    let bsel = aml::Path::new("BSEL");
    let b0ej = aml::Path::new("B0EJ");
    let pciu = aml::Path::new("PCIU");
    let pcid = aml::Path::new("PCID");

    // PCEJ(selector, slot): tell the VMM the guest ejected the slot.
    let acquire = aml::Acquire::new("BLCK".into(), 0xffff);
    let release = aml::Release::new("BLCK".into());
    let set_sel = aml::Store::new(&bsel, &aml::Arg(0));
    let one = aml::One {};
    let eject = aml::ShiftLeft::new(&b0ej, &one, &aml::Arg(1));
    let pcej = aml::Method::new(
        "PCEJ".into(),
        2,
        true,
        vec![&acquire, &set_sel, &eject, &release],
    );

    let mut objects = Vec::new();
    let mut buses = Vec::new();
    acpi_bus_aml(root, "\\_SB_.PCI0", &mut objects, &mut buses);
    let raw = RawAml(&objects);

    // PCNT: for every bus selector, read both bitmaps (PCIU clears on
    // read) and notify only when a bit is set: device check for new
    // devices, eject request for devices to remove. Skipping quiet buses
    // keeps the interpreter's work small when there are many slots.
    let sels: Vec<aml::Store> = buses
        .iter()
        .map(|(_, b)| aml::Store::new(&bsel, b))
        .collect();
    let read_up = aml::Store::new(&aml::Local(0), &pciu);
    let read_down = aml::Store::new(&aml::Local(1), &pcid);
    let up_set = aml::NotEqual::new(&aml::Local(0), &0u8);
    let down_set = aml::NotEqual::new(&aml::Local(1), &0u8);
    let dvnts: Vec<String> = buses.iter().map(|(p, _)| format!("{p}.DVNT")).collect();
    let checks: Vec<aml::MethodCall> = dvnts
        .iter()
        .map(|d| aml::MethodCall::new(d.as_str().into(), vec![&aml::Local(0), &1u8]))
        .collect();
    let ejects: Vec<aml::MethodCall> = dvnts
        .iter()
        .map(|d| aml::MethodCall::new(d.as_str().into(), vec![&aml::Local(1), &3u8]))
        .collect();
    let if_ups: Vec<aml::If> = checks
        .iter()
        .map(|c| aml::If::new(&up_set, vec![c]))
        .collect();
    let if_downs: Vec<aml::If> = ejects
        .iter()
        .map(|c| aml::If::new(&down_set, vec![c]))
        .collect();
    let mut pcnt_body: Vec<&dyn Aml> = vec![&acquire];
    for i in 0..buses.len() {
        pcnt_body.push(&sels[i]);
        pcnt_body.push(&read_up);
        pcnt_body.push(&read_down);
        pcnt_body.push(&if_ups[i]);
        pcnt_body.push(&if_downs[i]);
    }
    pcnt_body.push(&release);
    let pcnt = aml::Method::new("PCNT".into(), 0, true, pcnt_body);

    let mut out = Vec::new();
    aml::Scope::new(
        "\\_SB_.PCI0".into(),
        vec![&region, &field, &mutex, &pcej, &raw, &pcnt],
    )
    .to_aml_bytes(&mut out);
    let call = aml::MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![]);
    let hpsc = aml::Method::new("HPSC".into(), 0, true, vec![&call]);
    aml::Scope::new("\\_SB_".into(), vec![&hpsc]).to_aml_bytes(&mut out);
    out
}

fn dsdt(body: &[u8]) -> Vec<u8> {
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(body);
    sdt.as_slice().to_vec()
}

/// Writes all tables; `dsdt_body` is the DSDT's AML, `extra` further tables
/// (complete, with headers) to list in the XSDT. Returns the RSDP address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    cpus: u8,
    dsdt_body: &[u8],
    extra: &[Vec<u8>],
) -> Result<GuestAddress, AcpiError> {
    let rsdp_addr = ACPI_START;
    let mut cursor = ACPI_START.0 + Rsdp::len() as u64;
    let mut place = |bytes: &[u8]| -> Result<u64, AcpiError> {
        cursor = cursor.div_ceil(8) * 8;
        let addr = cursor;
        let end = addr + bytes.len() as u64;
        if end > ACPI_START.0 + ACPI_SIZE {
            return Err(AcpiError::TooLarge(end - ACPI_START.0, ACPI_SIZE));
        }
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|_| AcpiError::Write)?;
        cursor = end;
        Ok(addr)
    };

    let dsdt_addr = place(&dsdt(dsdt_body))?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(place(&fadt(dsdt_addr))?);
    xsdt.add_entry(place(&madt(cpus))?);
    for t in extra {
        xsdt.add_entry(place(t)?);
    }
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = place(&xsdt_bytes)?;
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    mem.write_slice(&rsdp, rsdp_addr)
        .map_err(|_| AcpiError::Write)?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn root_buses_end_at_the_last_one_unless_the_guest_renumbers() {
        assert_eq!(root_bus_range(8, "console=ttyS0 panic=-1"), (0, 8));
        assert_eq!(root_bus_range(0, ""), (0, 0));
        assert_eq!(root_bus_range(8, "pci=assign-busses"), (0, 0xff));
        assert_eq!(
            root_bus_range(8, "console=ttyS0 pci=noaer,assign-busses,hpbussize=4"),
            (0, 0xff)
        );
        // Another option, or the word outside `pci=`, changes nothing.
        assert_eq!(root_bus_range(8, "pci=assign-busses-not"), (0, 8));
        assert_eq!(root_bus_range(8, "assign-busses"), (0, 8));
        assert_eq!(root_bus_range(8, "xpci=assign-busses"), (0, 8));
    }

    #[test]
    fn tables_are_consistent() {
        let m = madt(2);
        assert_eq!(&m[0..4], b"APIC");
        assert_eq!(
            u32::from_le_bytes(m[4..8].try_into().unwrap()) as usize,
            m.len()
        );
        assert!(checksum_ok(&m));
        // header 44 + 2 LAPIC (8) + IOAPIC 12 + 2 ISO (10) + NMI 6
        assert_eq!(m.len(), 44 + 16 + 12 + 20 + 6);
        let f = fadt(0x1234);
        assert_eq!(&f[0..4], b"FACP");
        assert!(checksum_ok(&f));
        let d = dsdt(&platform_aml());
        assert_eq!(&d[0..4], b"DSDT");
        assert!(checksum_ok(&d));
        assert_eq!(
            u32::from_le_bytes(d[4..8].try_into().unwrap()) as usize,
            d.len()
        );
    }

    #[test]
    fn written_to_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp = write_tables(&mem, 1, &platform_aml(), &[]).unwrap();
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, rsdp).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let huge = vec![vec![0u8; ACPI_SIZE as usize]];
        assert!(matches!(
            write_tables(&mem, 1, &platform_aml(), &huge),
            Err(AcpiError::TooLarge(..))
        ));
    }
}
