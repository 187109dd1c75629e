//! Unit tests for [`PciePort`]: header, capabilities, slot registers and the hot-plug
//! state machine.

use std::sync::Arc;

use super::*;
use crate::config::CONFIG_SPACE_SIZE;
use crate::interrupt::RecordingMsiGroup;
use crate::pcie_cap::PCIE_CAP_ID;

const PDC: u16 = slot_status::PRESENCE_DETECT_CHANGED;
const DLLSC: u16 = slot_status::DLL_STATE_CHANGED;
const PDS: u16 = slot_status::PRESENCE_DETECT_STATE;
const HPIE: u16 = slot_control::HOTPLUG_INTERRUPT_ENABLE;
const PDCE: u16 = slot_control::PRESENCE_DETECT_ENABLE;
const DLLSCE: u16 = slot_control::DLL_STATE_CHANGED_ENABLE;
const PCC: u16 = slot_control::POWER_CONTROLLER;

fn hotplug_port(kind: PciePortKind, psn: u16) -> (PciePort, Arc<RecordingMsiGroup>) {
    let g = Arc::new(RecordingMsiGroup::new(1).unwrap());
    let p = PciePort::new(
        PciePortParams::new(kind).with_native_hotplug(psn),
        Some(g.clone()),
    )
    .unwrap();
    (p, g)
}

fn w(p: &mut PciePort, off: usize, bytes: &[u8]) -> ConfigWriteOutcome {
    p.write_config_register(off / 4, (off % 4) as u64, bytes)
}

fn w16(p: &mut PciePort, off: usize, v: u16) -> ConfigWriteOutcome {
    w(p, off, &v.to_le_bytes())
}

fn w32(p: &mut PciePort, off: usize, v: u32) -> ConfigWriteOutcome {
    w(p, off, &v.to_le_bytes())
}

fn r16(p: &mut PciePort, off: usize) -> u16 {
    (p.read_config_register(off / 4) >> ((off % 4) * 8)) as u16
}

fn r32(p: &mut PciePort, off: usize) -> u32 {
    p.read_config_register(off / 4)
}

fn cap(p: &PciePort) -> usize {
    p.config().pcie_offset().unwrap()
}

/// Guest-side MSI setup: address, data, enable.
fn enable_msi(p: &mut PciePort, on: bool) -> ConfigWriteOutcome {
    let off = p.config().msi_offset().unwrap();
    w32(p, off + 4, 0xfee0_0000);
    w32(p, off + 8, 0);
    w16(p, off + 12, 0x31);
    w16(p, off + 2, u16::from(on))
}

fn set_slot_control(p: &mut PciePort, v: u16) -> ConfigWriteOutcome {
    let off = cap(p) + regs::SLTCTL;
    w16(p, off, v)
}

fn clear_slot_status(p: &mut PciePort, bits: u16) {
    let off = cap(p) + regs::SLTSTA;
    w16(p, off, bits);
}

#[test]
fn kinds_headers_and_capabilities() {
    for (kind, ty) in [
        (PciePortKind::RootPort, Some(4u16)),
        (PciePortKind::SwitchUpstream, Some(5)),
        (PciePortKind::SwitchDownstream, Some(6)),
        (PciePortKind::PcieToPciBridge, Some(7)),
        (PciePortKind::PciBridge, None),
    ] {
        let mut p = PciePort::new(PciePortParams::new(kind), None).unwrap();
        let (v, d) = kind.default_ids();
        assert_eq!(r32(&mut p, 0), u32::from(v) | (u32::from(d) << 16));
        assert_eq!(r32(&mut p, 8) >> 8, 0x06_0400);
        assert_eq!(
            (r32(&mut p, 0x0c) >> 16) & 0x7f,
            1,
            "{kind:?} header type 1"
        );
        assert!(p.is_bridge());
        assert!(p.bars().is_empty());
        assert!(p.set_bar_address(0, 0x1000).is_err());
        match ty {
            Some(t) => {
                let off = cap(&p);
                assert_eq!(p.config().read_u8(off), PCIE_CAP_ID);
                assert_eq!((r16(&mut p, off + regs::CAPS) >> 4) & 0xf, t);
                // No slot without native hot-plug.
                assert_eq!(r16(&mut p, off + regs::CAPS) & (1 << 8), 0);
                assert!(p.config().is_extended());
            }
            None => {
                assert!(p.config().pcie_offset().is_none());
                assert!(!p.config().is_extended());
                assert_eq!(r32(&mut p, CONFIG_SPACE_SIZE), 0);
            }
        }
        assert!(p.config().find_capability(crate::pm::PM_CAP_ID).is_some());
        assert!(p.config().msi_offset().is_none());
        assert!(p.presence() && p.slot_in_use() && p.link_active());
        assert!(matches!(p.card_present(true), Err(PciError::NoHotplugSlot)));
        // Windows start disabled.
        assert_eq!(p.windows(), BridgeWindows::default());
    }
    for kind in [
        PciePortKind::SwitchUpstream,
        PciePortKind::PcieToPciBridge,
        PciePortKind::PciBridge,
    ] {
        assert!(PciePort::new(PciePortParams::new(kind).with_native_hotplug(1), None).is_err());
    }
    assert!(PciePort::new(
        PciePortParams::new(PciePortKind::RootPort).with_native_hotplug(0x2000),
        None
    )
    .is_err());
    // MSI: one vector, 64-bit.
    let (mut p, _) = hotplug_port(PciePortKind::RootPort, 1);
    let off = p.config().msi_offset().unwrap();
    assert_eq!(r16(&mut p, off + 2), 0x0080);
}

#[test]
fn slot_capabilities_and_link() {
    for kind in [PciePortKind::RootPort, PciePortKind::SwitchDownstream] {
        let (mut p, _) = hotplug_port(kind, 0x123);
        let off = cap(&p);
        assert_ne!(
            r16(&mut p, off + regs::CAPS) & (1 << 8),
            0,
            "slot implemented"
        );
        let sltcap = r32(&mut p, off + regs::SLTCAP);
        assert_eq!(sltcap & 1, 0, "no attention button");
        assert_eq!(sltcap & (1 << 1), 0, "no power controller");
        assert_eq!(sltcap & (1 << 2), 0, "no MRL sensor");
        assert_ne!(sltcap & (1 << 3), 0, "attention indicator");
        assert_ne!(sltcap & (1 << 4), 0, "power indicator");
        assert_ne!(sltcap & (1 << 5), 0, "hot-plug surprise");
        assert_ne!(sltcap & (1 << 6), 0, "hot-plug capable");
        assert_ne!(sltcap & (1 << 18), 0, "no command completed support");
        assert_eq!(sltcap >> 19, 0x123, "physical slot");
        assert_eq!(p.physical_slot(), Some(0x123));
        let lnkcap = r32(&mut p, off + regs::LNKCAP);
        assert_ne!(lnkcap & (1 << 20), 0, "DLL link active reporting");
        // Empty at reset: not present, link down, indicators off.
        assert!(!p.presence() && !p.link_active() && !p.slot_in_use());
        assert_eq!(p.slot_status(), 0);
        assert_eq!(p.slot_control(), (3 << 8) | (3 << 6));
        p.cold_plug(true);
        assert!(p.presence() && p.link_active() && p.slot_in_use());
        assert_eq!(p.slot_status(), PDS, "cold plug raises no event");
        assert_eq!(p.slot_control(), (1 << 8) | (3 << 6));
    }
}

#[test]
fn slot_register_semantics() {
    let (mut p, g) = hotplug_port(PciePortKind::RootPort, 1);
    let off = cap(&p);
    let sta = off + regs::SLTSTA;
    p.card_present(true).unwrap();
    p.raise_slot_events(slot_status::RW1C | PDS | slot_status::MRL_SENSOR_STATE);
    assert_eq!(p.slot_status(), slot_status::RW1C | PDS);
    // The guest cannot set anything, and PDS is read-only.
    w16(&mut p, sta, 0);
    assert_eq!(p.slot_status(), slot_status::RW1C | PDS);
    w16(
        &mut p,
        sta,
        PDS | slot_status::MRL_SENSOR_STATE | slot_status::INTERLOCK_STATUS,
    );
    assert_eq!(p.slot_status(), slot_status::RW1C | PDS);
    // RW1C bits clear one at a time.
    for bit in [
        slot_status::ATTENTION_BUTTON_PRESSED,
        slot_status::POWER_FAULT_DETECTED,
        slot_status::MRL_SENSOR_CHANGED,
        PDC,
        slot_status::COMMAND_COMPLETED,
        DLLSC,
    ] {
        let before = p.slot_status();
        w16(&mut p, sta, bit);
        assert_eq!(p.slot_status(), before & !bit);
    }
    assert_eq!(p.slot_status(), PDS);
    // A dword write to Slot Control with zero status bits keeps the status.
    p.raise_slot_events(PDC);
    let o = w32(&mut p, off + regs::SLTCTL, u32::from(HPIE));
    assert_eq!(p.slot_status(), PDS | PDC);
    assert_eq!(o.slot_indicator, Some(true), "indicator field 0: not off");
    // A write to Slot Status alone does not report the indicator.
    let o = w16(&mut p, sta, 0);
    assert_eq!(o.slot_indicator, None);
    // Writing 1 to everything clears the events but not PDS.
    w16(&mut p, sta, 0xffff);
    assert_eq!(p.slot_status(), PDS);

    // Slot Control: enables and indicators are writable; the power controller (there is
    // none) and EIC are not.
    let o = set_slot_control(&mut p, 0xffff);
    assert_eq!(p.slot_control(), 0x13ff);
    assert_eq!(o.slot_indicator, Some(false));
    // No Command Completed support: a control write never raises Command Completed.
    assert_eq!(p.slot_status() & slot_status::COMMAND_COMPLETED, 0);
    set_slot_control(&mut p, 0);
    assert_eq!(p.slot_status() & slot_status::COMMAND_COMPLETED, 0);
    // Link status: DLLLA is read-only for the guest.
    let lnksta = off + regs::LNKSTA;
    w16(&mut p, lnksta, 0);
    assert!(p.link_active());
    p.card_present(false).unwrap();
    w16(&mut p, lnksta, 0xffff);
    assert!(!p.link_active());
    // MSI was never enabled: nothing was signalled.
    assert_eq!(g.trigger_count(0), 0);
}

#[test]
fn held_event_is_delivered_when_the_guest_enables_notifications() {
    // Order 1: slot control enabled first, MSI enable last.
    let (mut p, g) = hotplug_port(PciePortKind::RootPort, 1);
    p.card_present(true).unwrap();
    assert_eq!(p.slot_status(), PDS | PDC | DLLSC);
    assert_eq!(g.trigger_count(0), 0);
    set_slot_control(&mut p, HPIE | PDCE | DLLSCE);
    assert_eq!(g.trigger_count(0), 0, "MSI still disabled");
    enable_msi(&mut p, true);
    assert_eq!(g.trigger_count(0), 1, "held event delivered on MSI enable");
    assert_eq!(g.vector(0).unwrap().msg.data, 0x31);

    // Order 2: MSI first, then the event enables (HPIE alone is not enough).
    let (mut p, g) = hotplug_port(PciePortKind::SwitchDownstream, 2);
    enable_msi(&mut p, true);
    p.card_present(true).unwrap();
    assert_eq!(g.trigger_count(0), 0);
    set_slot_control(&mut p, HPIE);
    assert_eq!(g.trigger_count(0), 0, "no event enable yet");
    set_slot_control(&mut p, HPIE | DLLSCE);
    assert_eq!(g.trigger_count(0), 1);
    set_slot_control(&mut p, HPIE | DLLSCE | PDCE);
    assert_eq!(g.trigger_count(0), 1, "already asserted: no second edge");

    // Order 3: the guest clears stale events before enabling: nothing is delivered.
    let (mut p, g) = hotplug_port(PciePortKind::RootPort, 3);
    p.card_present(true).unwrap();
    enable_msi(&mut p, true);
    clear_slot_status(&mut p, slot_status::RW1C);
    set_slot_control(&mut p, HPIE | PDCE | DLLSCE);
    assert_eq!(g.trigger_count(0), 0);
    assert!(p.presence());
}

#[test]
fn interrupt_edge_rules() {
    let (mut p, g) = hotplug_port(PciePortKind::RootPort, 1);
    enable_msi(&mut p, true);
    set_slot_control(&mut p, HPIE | PDCE | DLLSCE | PCC);
    assert!(!p.interrupt_condition());
    assert!(!p.card_present(false).unwrap(), "already absent: no event");
    assert_eq!(g.trigger_count(0), 0);

    p.card_present(true).unwrap();
    assert_eq!(g.trigger_count(0), 1);
    // More events while the line is still asserted: no new edge.
    p.raise_slot_events(PDC);
    assert_eq!(g.trigger_count(0), 1);
    // Clearing only PDC leaves DLLSC pending: still asserted.
    clear_slot_status(&mut p, PDC);
    assert!(p.interrupt_condition());
    assert_eq!(g.trigger_count(0), 1);
    clear_slot_status(&mut p, DLLSC);
    assert!(!p.interrupt_condition());
    // Removal: a new edge.
    p.card_present(false).unwrap();
    assert_eq!(g.trigger_count(0), 2);
    // HPIE off then on with events pending: a new edge.
    set_slot_control(&mut p, PDCE | DLLSCE | PCC);
    assert_eq!(g.trigger_count(0), 2);
    set_slot_control(&mut p, HPIE | PDCE | DLLSCE | PCC);
    assert_eq!(g.trigger_count(0), 3);
    // MSI disable drops the line; re-enable re-asserts with the events still pending.
    enable_msi(&mut p, false);
    assert!(!p.interrupt_condition());
    enable_msi(&mut p, true);
    assert_eq!(g.trigger_count(0), 4);
    clear_slot_status(&mut p, slot_status::RW1C);
    // An event whose enable is clear does not interrupt.
    set_slot_control(&mut p, HPIE | DLLSCE | PCC);
    p.raise_slot_events(PDC);
    assert_eq!(g.trigger_count(0), 4);
    // Command completed / attention button / power fault / MRL follow their own enables.
    for (en, ev) in [
        (
            slot_control::COMMAND_COMPLETED_ENABLE,
            slot_status::COMMAND_COMPLETED,
        ),
        (
            slot_control::ATTENTION_BUTTON_ENABLE,
            slot_status::ATTENTION_BUTTON_PRESSED,
        ),
        (
            slot_control::POWER_FAULT_ENABLE,
            slot_status::POWER_FAULT_DETECTED,
        ),
        (
            slot_control::MRL_SENSOR_ENABLE,
            slot_status::MRL_SENSOR_CHANGED,
        ),
    ] {
        clear_slot_status(&mut p, slot_status::RW1C);
        set_slot_control(&mut p, HPIE | PCC);
        let before = g.trigger_count(0);
        p.raise_slot_events(ev);
        assert_eq!(g.trigger_count(0), before);
        set_slot_control(&mut p, HPIE | PCC | en);
        assert_eq!(g.trigger_count(0), before + 1);
    }
    // Without an MSI capability nothing is signalled and nothing breaks.
    let mut q = PciePort::new(
        PciePortParams::new(PciePortKind::RootPort).with_native_hotplug(9),
        None,
    )
    .unwrap();
    set_slot_control(&mut q, HPIE | PDCE);
    q.card_present(true).unwrap();
    assert!(!q.interrupt_condition());
    assert_eq!(q.slot_status(), PDS | PDC | DLLSC);
}

#[test]
fn removal_flow_reports_slot_power_off() {
    let (mut p, g) = hotplug_port(PciePortKind::SwitchDownstream, 4);
    p.cold_plug(true);
    enable_msi(&mut p, true);
    // Linux pciehp: power indicator on, enables.
    let ctl = HPIE | PDCE | DLLSCE | (1 << 8) | (3 << 6);
    assert_eq!(set_slot_control(&mut p, ctl).slot_indicator, Some(true));
    assert!(p.slot_in_use());

    // The VMM requests removal.
    assert!(p.card_present(false).unwrap());
    assert!(!p.presence() && !p.link_active());
    assert!(
        !p.removal_complete(),
        "the guest has not released the slot yet"
    );
    assert_eq!(p.slot_status(), PDC | DLLSC);
    assert_eq!(g.trigger_count(0), 1);
    // The guest acknowledges the events, unbinds the driver, then turns the power
    // indicator off (no power controller: Linux writes no power-off command).
    clear_slot_status(&mut p, PDC | DLLSC);
    let o = set_slot_control(&mut p, HPIE | PDCE | DLLSCE | (3 << 8) | (3 << 6));
    assert_eq!(o.slot_indicator, Some(false));
    assert!(!o.is_empty());
    assert!(!p.slot_in_use());
    assert!(p.removal_complete());
    // A power-off command bit is ignored (reads 0); the indicator decides.
    let o = set_slot_control(&mut p, HPIE | PDCE | DLLSCE | PCC | (3 << 8) | (3 << 6));
    assert_eq!(p.slot_control() & PCC, 0);
    assert_eq!(o.slot_indicator, Some(false));
    // Blinking counts as in use.
    let o = set_slot_control(&mut p, HPIE | PDCE | DLLSCE | (2 << 8) | (3 << 6));
    assert_eq!(o.slot_indicator, Some(true));
    assert!(!p.removal_complete());
    assert_eq!(g.trigger_count(0), 1);

    // Hot-add afterwards: event, then the guest powers on.
    assert!(p.card_present(true).unwrap());
    assert_eq!(g.trigger_count(0), 2);
    let o = set_slot_control(&mut p, HPIE | PDCE | DLLSCE | (1 << 8) | (3 << 6));
    assert_eq!(o.slot_indicator, Some(true));
    assert!(p.slot_in_use() && p.presence() && p.link_active());
    // Byte writes to the high byte of Slot Control work too.
    let off = cap(&p) + regs::SLTCTL + 1;
    let off_report = w(&mut p, off, &[((3 << 8) >> 8) as u8]);
    assert_eq!(off_report.slot_indicator, Some(false));
    // A byte write just below Slot Control (Slot Capabilities' last byte) reports nothing.
    let below = cap(&p) + regs::SLTCTL - 1;
    let o = w(&mut p, below, &[0]);
    assert_eq!(o.slot_indicator, None);
    // Merging keeps the latest power report.
    let mut m = ConfigWriteOutcome::default();
    m.merge(off_report);
    m.merge(ConfigWriteOutcome::default());
    assert_eq!(m.slot_indicator, Some(false));
}

#[test]
fn bus_numbers_and_windows() {
    let mut p = PciePort::new(PciePortParams::new(PciePortKind::RootPort), None).unwrap();
    p.set_bus_numbers(0, 3, 7);
    assert_eq!(
        (p.primary_bus(), p.secondary_bus(), p.subordinate_bus()),
        (0, 3, 7)
    );
    let win = BridgeWindows {
        io: None,
        mem: Some((0xc010_0000, 0xc08f_ffff)),
        prefetch: Some((0x1_0000_0000, 0x1_03ff_ffff)),
    };
    p.set_windows(&win);
    assert_eq!(p.windows(), win);
    assert_eq!(r32(&mut p, 0x20), 0xc080_c010);
    assert_eq!(r32(&mut p, 0x24), 0x03f1_0001);
    assert_eq!(r32(&mut p, 0x28), 1);
    assert_eq!(r32(&mut p, 0x2c), 1);
    // The guest rewrites them; the outcome reports it and the accessors follow.
    let o = w(&mut p, 0x18, &[0, 5, 9, 0]);
    assert!(o.bus_numbers_changed);
    assert_eq!((p.secondary_bus(), p.subordinate_bus()), (5, 9));
    let o = w32(&mut p, 0x20, 0xc0f0_c020);
    assert!(o.bridge_windows_changed);
    assert_eq!(p.windows().mem, Some((0xc020_0000, 0xc0ff_ffff)));
    // No I/O window: read-only zero, guest probes read back 0.
    let o = w16(&mut p, 0x1c, 0xe0f0);
    assert!(!o.bridge_windows_changed);
    assert_eq!(r16(&mut p, 0x1c), 0);
    w32(&mut p, 0x30, u32::MAX);
    assert_eq!(r32(&mut p, 0x30), 0);
    assert_eq!(p.windows().io, None);
    p.set_windows(&BridgeWindows {
        io: Some((0x1000, 0x1fff)),
        ..win
    });
    assert_eq!(p.windows().io, None);
    // Disabled windows read as base > limit.
    p.set_windows(&BridgeWindows::default());
    assert_eq!(r32(&mut p, 0x20), 0x0000_fff0);
    assert_eq!(p.windows(), BridgeWindows::default());

    // With an I/O window.
    let mut params = PciePortParams::new(PciePortKind::PciBridge);
    params.io_window = true;
    let mut b = PciePort::new(params, None).unwrap();
    assert_eq!(b.windows().io, None);
    let win = BridgeWindows {
        io: Some((0x2000, 0x3fff)),
        mem: None,
        prefetch: None,
    };
    b.set_windows(&win);
    assert_eq!(b.windows(), win);
    assert_eq!(r16(&mut b, 0x1c), 0x3121);
    let o = w16(&mut b, 0x1c, 0x4141);
    assert!(o.bridge_windows_changed);
    assert_eq!(b.windows().io, Some((0x4000, 0x4fff)));
    b.enable_forwarding();
    assert_eq!(
        b.config().command() & 7,
        CMD_IO_SPACE | CMD_MEMORY_SPACE | CMD_BUS_MASTER
    );
    p.enable_forwarding();
    assert_eq!(p.config().command() & 7, CMD_MEMORY_SPACE | CMD_BUS_MASTER);
    // Secondary bus reset is reported.
    let o = w16(&mut b, 0x3e, 1 << 6);
    assert!(o.secondary_bus_reset);
}

/// Deterministic pseudo-random writes of every size and alignment, including malformed
/// ones, interleaved with VMM events: nothing may panic, and the read-only state the
/// guest must not change (presence, link) stays put.
#[test]
fn hostile_config_writes_do_not_panic() {
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) as u32
    };
    for kind in [
        PciePortKind::RootPort,
        PciePortKind::SwitchUpstream,
        PciePortKind::SwitchDownstream,
        PciePortKind::PcieToPciBridge,
        PciePortKind::PciBridge,
    ] {
        let g = Arc::new(RecordingMsiGroup::new(1).unwrap());
        let mut params = PciePortParams::new(kind);
        if kind.is_downstream_port() {
            params = params.with_native_hotplug(7);
        }
        params.io_window = next() & 1 == 0;
        let mut p = PciePort::new(params, Some(g.clone())).unwrap();
        let mut present = false;
        for i in 0..60_000u32 {
            let r = next();
            // Focus half of the writes on the first 256 bytes (header and capabilities).
            let reg = if r & 1 == 0 {
                (next() % 64) as usize
            } else {
                (next() % 1100) as usize
            };
            let offset = u64::from(next() % 6);
            let len = (next() % 6) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = p.write_config_register(reg, offset, &bytes);
            let _ = p.read_config_register(reg);
            if i % 97 == 0 && p.has_native_hotplug() {
                present = !present;
                p.card_present(present).unwrap();
            }
            if p.has_native_hotplug() {
                assert_eq!(p.presence(), present);
                assert_eq!(p.link_active(), present);
            }
            let _ = p.windows();
            let _ = p.bus_numbers();
        }
        // Everything still answers.
        assert_eq!(
            p.read_config_register(0) & 0xffff,
            u32::from(kind.default_ids().0)
        );
        assert_eq!(p.read_config_register(5000), u32::MAX);
    }
}
