//! Unit tests for the assignment rules, over host descriptions as sysfs gives them.

use super::*;

fn b(s: &str) -> HostBdf {
    s.parse().unwrap()
}

/// A fake host: (bdf, driver, group, bridge).
fn host(fns: &[(&str, Option<&str>, Option<u32>, bool)]) -> Vec<HostFunction> {
    fns.iter()
        .map(|(bdf, driver, group, bridge)| HostFunction {
            bdf: b(bdf),
            driver: driver.map(String::from),
            group: *group,
            bridge: *bridge,
        })
        .collect()
}

const V: Option<&str> = Some("vfio-pci");

/// A 4-function device (09:00.0-3) in group 9 with its root port (a bridge) and a lone
/// NIC (0a:00.0) in group 10.
fn four_functions() -> Vec<HostFunction> {
    host(&[
        ("0000:00:1c.0", Some("pcieport"), Some(9), true),
        ("0000:09:00.0", V, Some(9), false),
        ("0000:09:00.1", V, Some(9), false),
        ("0000:09:00.2", V, Some(9), false),
        ("0000:09:00.3", V, Some(9), false),
        ("0000:0a:00.0", V, Some(10), false),
    ])
}

fn req(function: &str) -> AssignRequest {
    AssignRequest {
        function: Some(b(function)),
        ..Default::default()
    }
}

fn guest(d: &GuestDevice) -> Vec<(String, u8)> {
    d.functions
        .iter()
        .map(|f| (f.host.to_string(), f.function))
        .collect()
}

#[test]
fn host_bdfs_parse_and_print() {
    let x = b("0000:09:1F.7");
    assert_eq!(x.to_string(), "0000:09:1f.7");
    assert_eq!(x.device_name(), "0000:09:1f");
    for bad in [
        "",
        "0000:09:00",
        "0000:09:20.0",
        "0000:09:00.8",
        "0000-09:00.0",
        "000g:09:00.0",
        "0000:09:00.0 ",
    ] {
        let e = bad.parse::<HostBdf>().unwrap_err();
        assert!(e.contains("expected DDDD:BB:DD.F"), "{bad}: {e}");
    }
}

#[test]
fn a_whole_device_by_default_keeping_function_numbers() {
    let host = four_functions();
    // Any function names the device; the root port (a bridge) stays with the host.
    for f in ["0000:09:00.0", "0000:09:00.2"] {
        let a = assign(&host, &req(f)).unwrap();
        assert_eq!(a.devices.len(), 1);
        assert_eq!(
            guest(&a.devices[0]),
            [
                ("0000:09:00.0".to_string(), 0),
                ("0000:09:00.1".to_string(), 1),
                ("0000:09:00.2".to_string(), 2),
                ("0000:09:00.3".to_string(), 3),
            ]
        );
        assert_eq!(a.devices[0].remapped, None);
        assert!(a.held.is_empty());
        assert_eq!(a.groups, [9]);
    }
    // A single-function device alone in its group: one function.
    let a = assign(&host, &req("0000:0a:00.0")).unwrap();
    assert_eq!(guest(&a.devices[0]), [("0000:0a:00.0".to_string(), 0)]);
    assert_eq!(a.groups, [10]);
}

#[test]
fn partial_assignment_names_what_is_left_out() {
    let host = four_functions();
    // Named: 1 and 3 are held, 0 and 2 keep their numbers.
    let mut r = req("0000:09:00.0");
    r.unassigned = vec![b("0000:09:00.1"), b("0000:09:00.3")];
    let a = assign(&host, &r).unwrap();
    assert_eq!(
        guest(&a.devices[0]),
        [
            ("0000:09:00.0".to_string(), 0),
            ("0000:09:00.2".to_string(), 2)
        ]
    );
    assert_eq!(a.held, [(b("0000:09:00.1"), 9), (b("0000:09:00.3"), 9)]);
    let all: Vec<String> = a.host_functions().map(|b| b.to_string()).collect();
    assert_eq!(all.len(), 4);
    // The same with 'assigned' as well.
    r.assigned = Some(vec![b("0000:09:00.0"), b("0000:09:00.2")]);
    assert_eq!(assign(&host, &r).unwrap(), a);
    // Not named: refused, listing them, with the option to write.
    let mut r = req("0000:09:00.0");
    r.assigned = Some(vec![b("0000:09:00.0"), b("0000:09:00.2")]);
    r.unassigned = vec![b("0000:09:00.3")];
    let e = assign(&host, &r).unwrap_err();
    assert_eq!(
        e,
        AssignError::LeftOut {
            functions: vec![b("0000:09:00.1")],
            groups: vec![9]
        }
    );
    assert_eq!(
        e.to_string(),
        "0000:09:00.1 left out of the guest without being named: IOMMU group 9 goes to this \
         VM whole, so the VMM holds them from the host too; name them with \
         unassigned=0000:09:00.1 or assign them"
    );
    r.unassigned.clear();
    let e = assign(&host, &r).unwrap_err().to_string();
    assert!(e.contains("unassigned=0000:09:00.1+0000:09:00.3"), "{e}");
    // Both, nothing left, outside the unit, a bridge, unknown.
    let mut r = req("0000:09:00.0");
    r.assigned = Some(vec![b("0000:09:00.1")]);
    r.unassigned = vec![b("0000:09:00.1")];
    assert_eq!(
        assign(&host, &r).unwrap_err(),
        AssignError::Both(b("0000:09:00.1"))
    );
    let mut r = req("0000:09:00.0");
    r.unassigned = ["0", "1", "2", "3"]
        .iter()
        .map(|f| b(&format!("0000:09:00.{f}")))
        .collect();
    assert_eq!(assign(&host, &r).unwrap_err(), AssignError::NothingAssigned);
    let mut r = req("0000:09:00.0");
    r.unassigned = vec![b("0000:0a:00.0")];
    assert_eq!(
        assign(&host, &r).unwrap_err().to_string(),
        "0000:0a:00.0 ('unassigned') is neither a function of host device 0000:09:00 nor in \
         its IOMMU groups (IOMMU group 9)"
    );
    r.unassigned = vec![b("0000:00:1c.0")];
    assert_eq!(
        assign(&host, &r).unwrap_err(),
        AssignError::Bridge(b("0000:00:1c.0"))
    );
    r.unassigned = vec![b("0000:09:00.5")];
    assert_eq!(
        assign(&host, &r).unwrap_err(),
        AssignError::NoSuchFunction(b("0000:09:00.5"))
    );
}

#[test]
fn function_0_left_out_gives_the_lowest_assigned_function_guest_function_0() {
    let host = four_functions();
    let mut r = req("0000:09:00.2");
    r.unassigned = vec![b("0000:09:00.0")];
    let a = assign(&host, &r).unwrap();
    assert_eq!(
        guest(&a.devices[0]),
        [
            ("0000:09:00.1".to_string(), 0),
            ("0000:09:00.2".to_string(), 2),
            ("0000:09:00.3".to_string(), 3),
        ]
    );
    assert_eq!(a.devices[0].remapped, Some(b("0000:09:00.1")));
    assert_eq!(a.held, [(b("0000:09:00.0"), 9)]);
    // Only function 3: it is function 0 in the guest.
    r.unassigned = ["0", "1", "2"]
        .iter()
        .map(|f| b(&format!("0000:09:00.{f}")))
        .collect();
    r.function = Some(b("0000:09:00.3"));
    let a = assign(&host, &r).unwrap();
    assert_eq!(guest(&a.devices[0]), [("0000:09:00.3".to_string(), 0)]);
    assert_eq!(a.devices[0].remapped, Some(b("0000:09:00.3")));
}

#[test]
fn a_group_with_a_device_bound_to_another_driver_is_refused_naming_each() {
    let host = host(&[
        ("0000:06:00.0", V, Some(6), false),
        ("0000:06:00.1", Some("snd_hda_intel"), Some(6), false),
        ("0000:07:00.0", None, Some(6), false),
        ("0000:08:00.0", Some("nvme"), Some(8), false),
        ("0000:0b:00.0", V, None, false),
    ]);
    let e = assign(&host, &req("0000:06:00.0")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "IOMMU group 6 of 0000:06:00.0 is not viable: 0000:06:00.1 is bound to snd_hda_intel, \
         0000:07:00.0 is bound to no driver (every endpoint of the group goes to the VM, \
         assigned or held: bind each to vfio-pci)"
    );
    // Naming them unassigned does not help: held functions need vfio-pci too.
    let mut r = req("0000:06:00.0");
    r.unassigned = vec![b("0000:06:00.1"), b("0000:07:00.0")];
    assert!(matches!(
        assign(&host, &r).unwrap_err(),
        AssignError::NotViable { .. }
    ));
    assert_eq!(
        assign(&host, &req("0000:08:00.0")).unwrap_err().to_string(),
        "PCI function 0000:08:00.0 is bound to driver 'nvme', not vfio-pci"
    );
    assert_eq!(
        assign(&host, &req("0000:07:00.0")).unwrap_err(),
        AssignError::Unbound(b("0000:07:00.0"))
    );
    assert_eq!(
        assign(&host, &req("0000:0b:00.0")).unwrap_err(),
        AssignError::NoGroup(b("0000:0b:00.0"))
    );
    assert_eq!(
        assign(&host, &req("0000:0c:00.0")).unwrap_err(),
        AssignError::NoSuchFunction(b("0000:0c:00.0"))
    );
}

#[test]
fn a_group_takes_every_device_in_it_and_bridges_stay() {
    // Group 4: a switch (bridges, with pcieport) and two devices below it; 05:00.1 is in
    // group 5, which joins because its device's function 0 is in group 4.
    let host = host(&[
        ("0000:03:00.0", Some("pcieport"), Some(4), true),
        ("0000:04:01.0", Some("pcieport"), Some(4), true),
        ("0000:05:00.0", V, Some(4), false),
        ("0000:05:00.1", V, Some(5), false),
        ("0000:06:00.0", V, Some(4), false),
        ("0000:07:00.0", V, Some(7), false),
    ]);
    let a = assign(&host, &req("0000:06:00.0")).unwrap();
    assert_eq!(a.groups, [4, 5]);
    assert_eq!(a.devices.len(), 2);
    // The requested device first.
    assert_eq!(guest(&a.devices[0]), [("0000:06:00.0".to_string(), 0)]);
    assert_eq!(
        guest(&a.devices[1]),
        [
            ("0000:05:00.0".to_string(), 0),
            ("0000:05:00.1".to_string(), 1)
        ]
    );
    assert_eq!(a.devices[1].functions[1].group, 5);
    // A bridge cannot be asked for (its driver is named first).
    assert!(matches!(
        assign(&host, &req("0000:04:01.0")).unwrap_err(),
        AssignError::WrongDriver { .. }
    ));
    let odd = super::tests::host(&[("0000:04:02.0", V, Some(4), true)]);
    assert_eq!(
        assign(&odd, &req("0000:04:02.0")).unwrap_err(),
        AssignError::Bridge(b("0000:04:02.0"))
    );
    // Leaving the other device out: named, it is held.
    let mut r = req("0000:06:00.0");
    r.unassigned = vec![b("0000:05:00.0"), b("0000:05:00.1")];
    let a = assign(&host, &r).unwrap();
    assert_eq!(a.devices.len(), 1);
    assert_eq!(a.held.len(), 2);
}
