//! Unit tests for the configuration space rules.

use std::sync::Arc;

use super::*;
use crate::interrupt::RecordingMsiGroup;
use crate::pcie_cap::{regs, slot_status, PciePortType, PcieSlotCapabilities};

fn dev() -> PciConfiguration {
    let mut p = PciConfigParams::device(0x1af4, 0x1042, 0x01_8000);
    p.revision_id = 1;
    p.subsystem_vendor_id = 0x1af4;
    p.subsystem_id = 0x1100;
    p.interrupt_pin = 1;
    PciConfiguration::new(p)
}

fn bridge() -> PciConfiguration {
    let mut p = PciConfigParams::device(0x1b36, 0x000c, 0x06_0400);
    p.header_type = HeaderType::Bridge;
    p.extended = true;
    PciConfiguration::new(p)
}

fn w32(c: &mut PciConfiguration, off: usize, v: u32) -> ConfigWriteOutcome {
    c.write_config_register(off / 4, 0, &v.to_le_bytes())
}

fn w16(c: &mut PciConfiguration, off: usize, v: u16) -> ConfigWriteOutcome {
    c.write_config_register(off / 4, (off % 4) as u64, &v.to_le_bytes())
}

fn r32(c: &PciConfiguration, off: usize) -> u32 {
    c.read_config_register(off / 4)
}

#[test]
fn identity_registers_are_read_only() {
    let mut c = dev();
    let before: Vec<u32> = [0x00, 0x08, 0x2c, 0x34]
        .iter()
        .map(|&o| r32(&c, o))
        .collect();
    for off in [0x00, 0x08, 0x2c, 0x34] {
        w32(&mut c, off, u32::MAX);
        w32(&mut c, off, 0);
    }
    let after: Vec<u32> = [0x00, 0x08, 0x2c, 0x34]
        .iter()
        .map(|&o| r32(&c, o))
        .collect();
    assert_eq!(before, after);
    assert_eq!(r32(&c, 0), 0x1042_1af4);
    assert_eq!(r32(&c, 8), 0x0180_0001);
    assert_eq!(r32(&c, 0x2c), 0x1100_1af4);
    // Interrupt pin read-only, line writable, min_gnt/max_lat zero.
    w32(&mut c, 0x3c, u32::MAX);
    assert_eq!(r32(&c, 0x3c), 0x0000_01ff);
    // Cache line size writable; latency timer, header type and BIST read-only.
    w32(&mut c, 0x0c, u32::MAX);
    assert_eq!(r32(&c, 0x0c), 0x0000_00ff);
}

#[test]
fn reserved_registers_read_zero() {
    let mut c = dev();
    for reg in 0..64 {
        c.write_config_register(reg, 0, &[0xff; 4]);
    }
    // No BARs, no capabilities, no ROM: all of these stay zero.
    for off in [
        0x10, 0x14, 0x18, 0x1c, 0x20, 0x24, 0x28, 0x30, 0x38, 0x40, 0x80, 0xfc,
    ] {
        assert_eq!(r32(&c, off), 0, "offset {off:#x}");
    }
    // Command: only the implemented bits stick; status W1C bits were 0 and stay 0.
    assert_eq!(r32(&c, 4), 0x0000_0547);
}

#[test]
fn conventional_space_is_256_bytes() {
    let mut c = dev();
    assert_eq!(c.read_config_register(64), 0);
    assert_eq!(c.read_config_register(1023), 0);
    assert_eq!(c.read_config_register(1024), u32::MAX);
    assert!(c.write_config_register(64, 0, &[0xff; 4]).is_empty());
    assert_eq!(c.read_config_register(64), 0);
    assert!(c.add_extended_capability(1, 1, &[0; 4], &[], &[]).is_err());
}

#[test]
fn malformed_writes_are_ignored() {
    let mut c = dev();
    c.write_config_register(1, 0, &[0xff; 3]);
    c.write_config_register(1, 3, &[0xff; 2]);
    c.write_config_register(1, 4, &[0xff]);
    c.write_config_register(1, 0, &[0xff; 8]);
    c.write_config_register(1, 0, &[]);
    c.write_config_register(usize::MAX, 0, &[0xff; 4]);
    assert_eq!(c.command(), 0);
}

#[test]
fn command_register_reports_decode_changes() {
    let mut c = dev();
    let out = w16(&mut c, 4, CMD_MEMORY_SPACE | CMD_BUS_MASTER);
    assert_eq!(out.mem_decode, Some(true));
    assert_eq!(out.bus_master, Some(true));
    assert_eq!(out.io_decode, None);
    assert!(c.mem_decode_enabled() && c.bus_master_enabled() && !c.io_decode_enabled());
    let out = w16(&mut c, 4, CMD_MEMORY_SPACE | CMD_BUS_MASTER);
    assert!(out.is_empty());
    let out = c.write_config_register(1, 0, &[CMD_IO_SPACE as u8]);
    assert_eq!(out.mem_decode, Some(false));
    assert_eq!(out.io_decode, Some(true));
    assert_eq!(out.bus_master, Some(false));
}

#[test]
fn status_bits_are_write_one_to_clear() {
    let mut c = dev();
    c.add_pm_capability(PmCapability::default()).unwrap();
    // Hardware sets: detected parity error, signaled system error, received master abort.
    let st = c.read_u16(6) | 0x8000 | 0x4000 | 0x2000;
    c.write_u16_internal(6, st);
    // Writing 0 keeps them, writing 1 clears only the selected bit.
    w16(&mut c, 6, 0);
    assert_eq!(c.read_u16(6), st);
    w16(&mut c, 6, 0x4000);
    assert_eq!(c.read_u16(6), st & !0x4000);
    // Capabilities List bit is read-only.
    w16(&mut c, 6, 0xffff);
    assert_eq!(c.read_u16(6), 0x0010);
    // A dword write to command/status clears status bits too without touching command RO bits.
    c.write_u16_internal(6, 0x8010);
    w32(&mut c, 4, 0x8000_0002);
    assert_eq!(r32(&c, 4), 0x0010_0002);
}

#[test]
fn bar_sizing_all_types() {
    let mut c = dev();
    c.add_bar(PciBarConfig::new(0, 0x1000, BarRegion::Mmio32, false).unwrap())
        .unwrap();
    c.add_bar(PciBarConfig::new(1, 0x100, BarRegion::Io, false).unwrap())
        .unwrap();
    c.add_bar(PciBarConfig::new(2, 0x4000, BarRegion::Mmio64, true).unwrap())
        .unwrap();
    c.add_bar(PciBarConfig::new(4, 0x20_0000, BarRegion::Mmio32, true).unwrap())
        .unwrap();
    c.set_bar_address(0, 0xfe00_0000).unwrap();
    c.set_bar_address(1, 0xc100).unwrap();
    c.set_bar_address(2, 0x80_0000_0000).unwrap();
    c.set_bar_address(4, 0xfc00_0000).unwrap();
    let probe = |c: &mut PciConfiguration, off: usize| -> u32 {
        let orig = r32(c, off);
        let out = w32(c, off, u32::MAX);
        assert!(out.bar_changes.is_empty(), "sizing must not move the BAR");
        let v = r32(c, off);
        let out = w32(c, off, orig);
        assert!(out.bar_changes.is_empty());
        assert_eq!(r32(c, off), orig);
        v
    };
    assert_eq!(probe(&mut c, 0x10), 0xffff_f000);
    assert_eq!(probe(&mut c, 0x14), 0xffff_ff01);
    assert_eq!(probe(&mut c, 0x18), 0xffff_c00c);
    assert_eq!(probe(&mut c, 0x1c), 0xffff_ffff);
    assert_eq!(probe(&mut c, 0x20), 0xffe0_0008);
    // Unimplemented BAR 5 reads zero after sizing.
    assert_eq!(probe(&mut c, 0x24), 0);
    assert_eq!(c.bars().len(), 4);
    assert_eq!(c.bar_address(2), Some(0x80_0000_0000));
}

#[test]
fn bar_moves_are_reported() {
    let mut c = dev();
    c.add_bar(PciBarConfig::new(0, 0x1000, BarRegion::Mmio32, false).unwrap())
        .unwrap();
    c.add_bar(PciBarConfig::new(2, 0x4000, BarRegion::Mmio64, false).unwrap())
        .unwrap();
    c.set_bar_address(0, 0xfe00_0000).unwrap();
    c.set_bar_address(2, 0x80_0000_0000).unwrap();
    let out = w32(&mut c, 0x10, 0xfd00_0abc);
    assert_eq!(
        out.bar_changes,
        vec![BarChange {
            index: 0,
            region: BarRegion::Mmio32,
            prefetchable: false,
            old_addr: 0xfe00_0000,
            new_addr: 0xfd00_0000,
            size: 0x1000,
        }]
    );
    // 64-bit: nothing on the low half, one change on the high half.
    assert!(w32(&mut c, 0x18, 0x0010_0000).bar_changes.is_empty());
    let out = w32(&mut c, 0x1c, 0x90);
    assert_eq!(out.bar_changes.len(), 1);
    assert_eq!(out.bar_changes[0].old_addr, 0x80_0000_0000);
    assert_eq!(out.bar_changes[0].new_addr, 0x90_0010_0000);
    assert_eq!(out.bar_changes[0].region, BarRegion::Mmio64);
    // Low half only, then memory decode enabled: committed then.
    assert!(w32(&mut c, 0x18, 0x0020_0000).bar_changes.is_empty());
    let out = w16(&mut c, 4, CMD_MEMORY_SPACE);
    assert_eq!(out.bar_changes.len(), 1);
    assert_eq!(out.bar_changes[0].new_addr, 0x90_0020_0000);
    assert_eq!(c.bars()[1].addr, 0x90_0020_0000);
    // Rewriting the same address reports nothing.
    assert!(w32(&mut c, 0x1c, 0x90).bar_changes.is_empty());
    // Byte writes work too.
    let out = c.write_config_register(4, 3, &[0xfb]);
    assert_eq!(out.bar_changes[0].new_addr, 0xfb00_0000);
}

#[test]
fn bar_declaration_errors() {
    let mut c = dev();
    c.add_bar(PciBarConfig::new(0, 0x1000, BarRegion::Mmio64, false).unwrap())
        .unwrap();
    assert_eq!(
        c.add_bar(PciBarConfig::new(1, 0x1000, BarRegion::Mmio32, false).unwrap()),
        Err(PciError::BarInUse(1))
    );
    assert_eq!(
        c.add_bar(PciBarConfig::new(0, 0x1000, BarRegion::Mmio32, false).unwrap()),
        Err(PciError::BarInUse(0))
    );
    assert!(c.set_bar_address(0, 0x1234).is_err());
    assert!(c.set_bar_address(3, 0x1000).is_err());
    let mut b = bridge();
    assert!(b
        .add_bar(PciBarConfig::new(2, 0x1000, BarRegion::Mmio32, false).unwrap())
        .is_err());
    assert!(b
        .add_bar(PciBarConfig::new(1, 0x1000, BarRegion::Mmio64, false).unwrap())
        .is_err());
    assert!(b
        .add_bar(PciBarConfig::new(0, 0x1000, BarRegion::Mmio64, false).unwrap())
        .is_ok());
}

#[test]
fn expansion_rom_is_absent() {
    let mut c = dev();
    assert!(w32(&mut c, 0x30, u32::MAX).is_empty());
    assert_eq!(r32(&c, 0x30), 0);
    let mut b = bridge();
    w32(&mut b, 0x38, u32::MAX);
    assert_eq!(r32(&b, 0x38), 0);
}

fn walk_caps(c: &PciConfiguration) -> Vec<(u8, usize)> {
    let mut out = Vec::new();
    let mut ptr = c.read_u8(0x34) as usize;
    while ptr != 0 && out.len() < 64 {
        assert_eq!(ptr % 4, 0);
        out.push((c.read_u8(ptr), ptr));
        ptr = c.read_u8(ptr + 1) as usize;
    }
    out
}

#[test]
fn capability_list_is_linked() {
    let mut c = dev();
    assert_eq!(c.read_u16(6) & 0x10, 0);
    let g = Arc::new(RecordingMsiGroup::new(4).unwrap());
    let pm = c.add_pm_capability(PmCapability::default()).unwrap();
    let msi = c
        .add_msi_capability(Arc::new(MsiConfig::new(
            MsiCapability::new(1, true, false).unwrap(),
            g.clone(),
        )))
        .unwrap();
    let cap = MsixCapability::new(4, 0, 0x8000, 0, 0xc000).unwrap();
    let msix = c
        .add_msix_capability(&cap, Arc::new(MsixConfig::new(4, g.clone()).unwrap()))
        .unwrap();
    let vendor = c
        .add_capability(&RawCapability {
            id: 0x09,
            body: vec![14, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
            writable: vec![],
        })
        .unwrap();
    assert_eq!(c.read_u16(6) & 0x10, 0x10);
    assert_eq!(
        walk_caps(&c),
        vec![(0x01, pm), (0x05, msi), (0x11, msix), (0x09, vendor)]
    );
    assert_eq!(c.find_capability(0x11), Some(msix));
    assert_eq!(c.find_capability(0x10), None);
    // Capability headers are read-only.
    w32(&mut c, pm, u32::MAX);
    assert_eq!(c.read_u8(pm + 1) as usize, msi);
    assert!(c.add_pm_capability(PmCapability::default()).is_err());
    assert!(c
        .add_pcie_capability(&PcieCapability::new(PciePortType::Endpoint))
        .is_err());
    // Fill the list until it overflows.
    let big = RawCapability {
        id: 0x09,
        body: vec![0; 40],
        writable: vec![],
    };
    let mut res = Ok(0);
    for _ in 0..8 {
        res = c.add_capability(&big);
    }
    assert_eq!(res, Err(PciError::CapabilitySpaceFull(0x09)));
}

#[test]
fn extended_space_reads_zero_until_a_capability_is_stored_there() {
    let mut b = bridge();
    // Not stored yet: zeroes for the guest and the device side, writes
    // change nothing; beyond 4 KiB all-ones as before.
    assert_eq!(r32(&b, 0x100), 0);
    assert_eq!(r32(&b, 0xffc), 0);
    assert_eq!(b.read_u32(0x800), 0);
    assert_eq!(b.read_config_register(1024), u32::MAX);
    w32(&mut b, 0x100, u32::MAX);
    assert_eq!(r32(&b, 0x100), 0);
    // A capability there stores it; the rest still reads zero.
    let a = b
        .add_extended_capability(0x0001, 2, &[0; 8], &[0xff], &[])
        .unwrap();
    assert_eq!(r32(&b, a), 0x0001 | (2 << 16));
    assert_eq!(r32(&b, 0xffc), 0);
    // A conventional function: the guest reads zeroes there, and beyond
    // 4 KiB all-ones.
    let c = dev();
    assert_eq!(r32(&c, 0x100), 0);
    assert_eq!(c.read_u8(0x1000), 0xff);
}

#[test]
fn extended_capabilities_chain() {
    let mut b = bridge();
    let a = b
        .add_extended_capability(0x0001, 2, &[0; 8], &[0xff], &[])
        .unwrap();
    let z = b
        .add_extended_capability(0x000b, 1, &[0; 4], &[], &[])
        .unwrap();
    assert_eq!(a, 0x100);
    assert_eq!(r32(&b, a), 0x0001 | (2 << 16) | ((z as u32) << 20));
    assert_eq!(r32(&b, z), 0x000b | (1 << 16));
    w32(&mut b, a + 4, u32::MAX);
    assert_eq!(r32(&b, a + 4), 0xff);
    w32(&mut b, a, 0);
    assert_ne!(r32(&b, a), 0);
}

#[test]
fn msix_control_through_config() {
    let mut c = dev();
    let g = Arc::new(RecordingMsiGroup::new(2).unwrap());
    let m = Arc::new(MsixConfig::new(2, g.clone()).unwrap());
    let cap = MsixCapability::new(2, 0, 0x1000, 0, 0x1800).unwrap();
    let off = c.add_msix_capability(&cap, m.clone()).unwrap();
    assert_eq!(c.read_u16(off + 2), 1);
    let out = w16(&mut c, off + 2, 0xffff);
    assert!(out.msix_changed);
    assert!(out.capabilities_written.contains(&(0x11, off as u16)));
    // Table size stays read-only.
    assert_eq!(c.read_u16(off + 2), 0xc001);
    assert!(m.enabled() && m.function_masked());
    assert!(!w16(&mut c, off + 2, 0xc000).msix_changed);
    let out = w16(&mut c, off + 2, 0x8000);
    assert!(out.msix_changed);
    assert!(!m.function_masked());
    // Table/PBA locators are read-only.
    w32(&mut c, off + 4, 0);
    assert_eq!(r32(&c, off + 4), 0x1000);
    let wrong = MsixCapability::new(3, 0, 0, 0, 0x100).unwrap();
    let mut c2 = dev();
    assert!(c2.add_msix_capability(&wrong, m).is_err());
}

#[test]
fn msi_through_config() {
    let mut c = dev();
    let g = Arc::new(RecordingMsiGroup::new(2).unwrap());
    let msi = Arc::new(MsiConfig::new(
        MsiCapability::new(2, true, true).unwrap(),
        g.clone(),
    ));
    let off = c.add_msi_capability(msi.clone()).unwrap();
    w32(&mut c, off + 4, 0xfee0_1003); // low bits are reserved
    w32(&mut c, off + 8, 0x1);
    w16(&mut c, off + 12, 0x4020);
    w32(&mut c, off + 16, u32::MAX); // mask both vectors
    let out = w16(&mut c, off + 2, 0x0011); // enable, MME = 1 (2 vectors)
    assert!(out.msi_changed);
    assert_eq!(c.read_u16(off + 2) & 0x71, 0x11);
    assert_eq!(r32(&c, off + 4), 0xfee0_1000);
    assert_eq!(r32(&c, off + 16), 0x3);
    msi.trigger(1).unwrap();
    assert_eq!(g.trigger_count(1), 0);
    assert_eq!(r32(&c, off + 20), 0x2);
    // Pending bits are read-only to the guest.
    w32(&mut c, off + 20, 0);
    assert_eq!(r32(&c, off + 20), 0x2);
    w32(&mut c, off + 16, 0);
    assert_eq!(g.trigger_count(1), 1);
    assert_eq!(r32(&c, off + 20), 0);
    let v = g.vector(1).unwrap();
    assert_eq!(v.msg.addr, 0x1_fee0_1000);
    assert_eq!(v.msg.data, 0x4021);
}

#[test]
fn power_management_states() {
    let mut c = dev();
    let off = c
        .add_pm_capability(PmCapability {
            d1: false,
            d2: true,
            pme_support: 0x19,
        })
        .unwrap();
    assert_eq!(c.read_u16(off + 2), 0x3 | (1 << 10) | (0x19 << 11));
    assert_eq!(c.power_state(), 0);
    let out = w16(&mut c, off + 4, 3);
    assert_eq!(out.power_state, Some(3));
    assert_eq!(c.power_state(), 3);
    // D1 is not supported: the state does not change.
    let out = w16(&mut c, off + 4, 1);
    assert_eq!(out.power_state, None);
    assert_eq!(c.power_state(), 3);
    assert_eq!(w16(&mut c, off + 4, 2).power_state, Some(2));
    assert_eq!(w16(&mut c, off + 4, 0).power_state, Some(0));
    // No_Soft_Reset is read-only set; PME_En writable; PME_Status RW1C.
    assert_eq!(c.read_u16(off + 4) & 0x8, 0x8);
    w16(&mut c, off + 4, 0x0100);
    assert_eq!(c.read_u16(off + 4) & 0x0100, 0x0100);
    c.write_u16_internal(off + 4, c.read_u16(off + 4) | 0x8000);
    w16(&mut c, off + 4, 0x0100);
    assert_eq!(c.read_u16(off + 4) & 0x8000, 0x8000);
    w16(&mut c, off + 4, 0x8100);
    assert_eq!(c.read_u16(off + 4) & 0x8000, 0);
}

#[test]
fn pcie_endpoint_registers() {
    let mut p = PciConfigParams::device(0x1af4, 0x1042, 0x01_8000);
    p.extended = true;
    let mut c = PciConfiguration::new(p);
    let off = c
        .add_pcie_capability(&PcieCapability::new(PciePortType::Endpoint))
        .unwrap();
    assert_eq!(c.read_u8(off), 0x10);
    assert_eq!(c.read_u16(off + regs::CAPS), 0x0002);
    // Device control is writable except bit 15 (no FLR).
    w16(&mut c, off + regs::DEVCTL, 0xffff);
    assert_eq!(c.read_u16(off + regs::DEVCTL), 0x7fff);
    // Device status error bits are RW1C.
    c.write_u16_internal(off + regs::DEVSTA, 0x000f);
    w16(&mut c, off + regs::DEVSTA, 0x0005);
    assert_eq!(c.read_u16(off + regs::DEVSTA), 0x000a);
    // An endpoint has no slot registers.
    w16(&mut c, off + regs::SLTCTL, 0xffff);
    assert_eq!(c.read_u16(off + regs::SLTCTL), 0);
    // Capabilities registers are read-only.
    let devcap = c.read_u32(off + regs::DEVCAP);
    w32(&mut c, off + regs::DEVCAP, 0);
    assert_eq!(c.read_u32(off + regs::DEVCAP), devcap);
}

#[test]
fn pcie_root_port_slot_registers() {
    let mut b = bridge();
    let slot = PcieSlotCapabilities {
        attention_button: true,
        power_controller: true,
        power_indicator: true,
        attention_indicator: true,
        hotplug_capable: true,
        physical_slot: 1,
        ..Default::default()
    };
    let off = b
        .add_pcie_capability(&PcieCapability::new(PciePortType::RootPort).with_slot(slot))
        .unwrap();
    // Slot control: every implemented control bit is writable, EIC (bit 11) is not.
    w16(&mut b, off + regs::SLTCTL, 0xffff);
    assert_eq!(b.pcie_slot_control(), Some(0x17ff));
    // Presence change sets state + change bits; the guest clears change bits with 1s.
    b.pcie_set_slot_presence(true);
    let sta = b.pcie_slot_status().unwrap();
    assert_eq!(
        sta,
        slot_status::PRESENCE_DETECT_STATE
            | slot_status::PRESENCE_DETECT_CHANGED
            | slot_status::DLL_STATE_CHANGED
    );
    assert_ne!(b.read_u16(off + regs::LNKSTA) & (1 << 13), 0);
    w16(
        &mut b,
        off + regs::SLTSTA,
        slot_status::PRESENCE_DETECT_CHANGED,
    );
    assert_eq!(
        b.pcie_slot_status(),
        Some(slot_status::PRESENCE_DETECT_STATE | slot_status::DLL_STATE_CHANGED)
    );
    // Presence Detect State itself is read-only.
    w16(&mut b, off + regs::SLTSTA, 0xffff);
    assert_eq!(
        b.pcie_slot_status(),
        Some(slot_status::PRESENCE_DETECT_STATE)
    );
    b.pcie_raise_slot_events(
        slot_status::ATTENTION_BUTTON_PRESSED | slot_status::PRESENCE_DETECT_STATE,
    );
    assert_eq!(
        b.pcie_slot_status(),
        Some(slot_status::PRESENCE_DETECT_STATE | slot_status::ATTENTION_BUTTON_PRESSED)
    );
    b.pcie_set_slot_presence(false);
    assert_eq!(b.read_u16(off + regs::LNKSTA) & (1 << 13), 0);
    // Root control writable, root status PME bit RW1C.
    w16(&mut b, off + regs::RTCTL, 0xffff);
    assert_eq!(b.read_u16(off + regs::RTCTL), 0x1f);
    b.write_u32_internal(off + regs::RTSTA, 1 << 16);
    w32(&mut b, off + regs::RTSTA, 1 << 16);
    assert_eq!(b.read_u32(off + regs::RTSTA), 0);
}

#[test]
fn type1_bus_numbers_and_windows() {
    let mut b = bridge();
    assert_eq!(r32(&b, 0x0c) >> 16 & 0x7f, 1);
    let out = w32(&mut b, 0x18, 0xffff_0100 | 0x02);
    assert!(out.bus_numbers_changed);
    // Secondary latency timer is read-only zero.
    assert_eq!(r32(&b, 0x18), 0x00ff_0100 | 0x02);
    assert_eq!(
        b.bus_numbers(),
        Some(BusNumbers {
            primary: 2,
            secondary: 1,
            subordinate: 0xff
        })
    );
    assert!(w32(&mut b, 0x18, 0x00ff_0100).bus_numbers_changed);
    assert!(!w32(&mut b, 0x18, 0x00ff_0100).bus_numbers_changed);

    // I/O window 0x1000..=0x1fff (32-bit I/O addressing bits are read-only).
    let out = w16(&mut b, 0x1c, 0x1010);
    assert!(out.bridge_windows_changed);
    assert_eq!(b.read_u16(0x1c), 0x1111);
    // Memory window 0xfe00_0000..=0xfe1f_ffff.
    w32(&mut b, 0x20, 0xfe10_fe00);
    // Prefetchable window 0x80_0000_0000..=0x80_3fff_ffff.
    w32(&mut b, 0x24, 0x3ff0_0000);
    w32(&mut b, 0x28, 0x80);
    w32(&mut b, 0x2c, 0x80);
    let win = b.bridge_windows().unwrap();
    assert_eq!(win.io, Some((0x1000, 0x1fff)));
    assert_eq!(win.mem, Some((0xfe00_0000, 0xfe1f_ffff)));
    assert_eq!(win.prefetch, Some((0x80_0000_0000, 0x80_3fff_ffff)));
    assert_eq!(r32(&b, 0x24) & 0x000f_000f, 0x0001_0001);
    // Disabled window: base above limit.
    w32(&mut b, 0x20, 0x0000_fff0);
    assert_eq!(b.bridge_windows().unwrap().mem, None);

    // Secondary status RW1C.
    b.write_u16_internal(0x1e, 0x2000);
    w16(&mut b, 0x1e, 0x2000);
    assert_eq!(b.read_u16(0x1e), 0);
    // Bridge control: writable low bits, secondary bus reset reported once.
    let out = w16(&mut b, 0x3e, 0xffff);
    assert!(out.secondary_bus_reset);
    assert_eq!(b.read_u16(0x3e), 0x007f);
    assert!(!w16(&mut b, 0x3e, 0xffff).secondary_bus_reset);
    // A type 0 configuration does not expose bridge state.
    assert_eq!(dev().bus_numbers(), None);
    assert_eq!(dev().bridge_windows(), None);
}

/// Simple LCG so the fuzz test needs no extra crates.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn random_config_writes_never_panic() {
    let g = Arc::new(RecordingMsiGroup::new(8).unwrap());
    let mut p = PciConfigParams::device(0x1af4, 0x1041, 0x02_0000);
    p.extended = true;
    let mut c = PciConfiguration::new(p);
    c.add_bar(PciBarConfig::new(0, 0x1000, BarRegion::Mmio32, false).unwrap())
        .unwrap();
    c.add_bar(PciBarConfig::new(1, 0x20, BarRegion::Io, false).unwrap())
        .unwrap();
    c.add_bar(PciBarConfig::new(2, 0x10000, BarRegion::Mmio64, true).unwrap())
        .unwrap();
    c.add_pm_capability(PmCapability::default()).unwrap();
    c.add_msi_capability(Arc::new(MsiConfig::new(
        MsiCapability::new(8, true, true).unwrap(),
        g.clone(),
    )))
    .unwrap();
    let cap = MsixCapability::new(8, 2, 0x8000, 2, 0x9000).unwrap();
    c.add_msix_capability(&cap, Arc::new(MsixConfig::new(8, g.clone()).unwrap()))
        .unwrap();
    c.add_pcie_capability(&PcieCapability::new(PciePortType::Endpoint))
        .unwrap();
    let mut b = bridge();
    let mut rng = Lcg(0x1234_5678);
    for _ in 0..200_000 {
        let reg = (rng.next() % 1100) as usize;
        let off = rng.next() % 5;
        let len = [0usize, 1, 2, 3, 4, 8][(rng.next() % 6) as usize];
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        c.write_config_register(reg, off, &bytes);
        b.write_config_register(reg, off, &bytes);
        let _ = c.read_config_register(reg);
        let _ = b.bridge_windows();
    }
    assert_eq!(r32(&c, 0), 0x1041_1af4);
    assert_eq!(r32(&b, 0), 0x000c_1b36);
    assert_eq!(c.bar_config(2).unwrap().size, 0x10000);
}
