//! The host side of kernel VFIO's IOMMU group rules: reads what
//! [`pci::assignment`] decides on from sysfs, under a root the tests point
//! at a fake tree. The function the user named, every function of its
//! device, every member of their IOMMU groups, and so on (the unit of
//! [`pci::assignment::assign`]), each with its driver, group and whether it
//! is a bridge.
//!
//! Only what the process may read under Landlock is read: the functions'
//! directories by name (`/sys/bus/pci/devices/BDF`, links into
//! `/sys/devices`) and the group listings (`/sys/kernel/iommu_groups/N/devices`);
//! `/sys/bus/pci/devices` itself is never listed.
//! [`super::kernel::probe`] runs this before it opens anything.

use std::collections::BTreeSet;
use std::path::Path;

use pci::assignment::{HostBdf, HostFunction};

/// The driver a function must be bound to for kernel VFIO.
pub const VFIO_PCI_DRIVER: &str = pci::assignment::VFIO_PCI_DRIVER;

/// Why a path does not name a host function.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GroupError {
    #[error("'{0}' does not name a PCI function (expected /sys/bus/pci/devices/DDDD:BB:DD.F)")]
    NotPciFunction(String),
}

/// Whether `s` is `DDDD:BB:DD.F` in lower-case hex.
fn is_bdf(s: &str) -> bool {
    let b = s.as_bytes();
    let hex = |r: std::ops::Range<usize>| {
        b.get(r).is_some_and(|x| {
            x.iter()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
        })
    };
    b.len() == 12
        && hex(0..4)
        && b[4] == b':'
        && hex(5..7)
        && b[7] == b':'
        && hex(8..10)
        && b[10] == b'.'
        && (b'0'..=b'7').contains(&b[11])
}

/// The name of the symlink `link` points to, if it is one.
fn link_name(link: &Path) -> Option<String> {
    let target = std::fs::read_link(link).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// The function `path` names (`/sys/bus/pci/devices/DDDD:BB:DD.F`, or the
/// bare BDF), checked against the tree under `sysfs`.
pub fn function_of(sysfs: &Path, path: &str) -> Result<String, GroupError> {
    let bad = || GroupError::NotPciFunction(path.to_string());
    let name = path
        .strip_prefix("/sys/bus/pci/devices/")
        .unwrap_or(path)
        .trim_end_matches('/');
    if !is_bdf(name) {
        return Err(bad());
    }
    let dir = sysfs.join("bus/pci/devices").join(name);
    if !dir.join("config").exists() {
        return Err(bad());
    }
    Ok(name.to_string())
}

/// What sysfs under `sysfs` says of function `bdf`, if it exists.
fn read_function(sysfs: &Path, bdf: HostBdf) -> Option<HostFunction> {
    let dir = sysfs.join("bus/pci/devices").join(bdf.to_string());
    if !dir.join("config").exists() {
        return None;
    }
    let class = std::fs::read_to_string(dir.join("class")).unwrap_or_default();
    Some(HostFunction {
        bdf,
        driver: link_name(&dir.join("driver")),
        group: link_name(&dir.join("iommu_group")).and_then(|g| g.parse().ok()),
        bridge: class.trim().starts_with("0x0604"),
    })
}

/// The members of IOMMU group `group`.
fn group_members(sysfs: &Path, group: u32) -> Vec<HostBdf> {
    let dir = sysfs
        .join("kernel/iommu_groups")
        .join(group.to_string())
        .join("devices");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// The host as [`pci::assignment::assign`] needs it for a request naming
/// `start` (and `named`, the functions its options name): every function of
/// `start`'s device, the members of their groups, the functions of those
/// members' devices, and so on; plus the named functions that exist.
pub fn host_view(sysfs: &Path, start: HostBdf, named: &[HostBdf]) -> Vec<HostFunction> {
    let mut seen: BTreeSet<HostBdf> = BTreeSet::new();
    let mut groups: BTreeSet<u32> = BTreeSet::new();
    let mut out = Vec::new();
    let mut todo = vec![start];
    todo.extend_from_slice(named);
    while let Some(b) = todo.pop() {
        if !seen.insert(b) {
            continue;
        }
        let Some(f) = read_function(sysfs, b) else {
            continue;
        };
        if !f.bridge {
            for function in 0..8 {
                todo.push(HostBdf { function, ..b });
            }
            if let Some(g) = f.group.filter(|g| groups.insert(*g)) {
                todo.extend(group_members(sysfs, g));
            }
        }
        out.push(f);
    }
    out.sort_by_key(|f| f.bdf);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fake sysfs: functions with (bdf, class, driver, group).
    pub(crate) fn tree(dir: &Path, fns: &[(&str, &str, Option<&str>, Option<u32>)]) {
        for (bdf, class, driver, group) in fns {
            let d = dir.join("bus/pci/devices").join(bdf);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("config"), [0u8; 64]).unwrap();
            std::fs::write(d.join("class"), format!("{class}\n")).unwrap();
            if let Some(drv) = driver {
                let dd = dir.join("bus/pci/drivers").join(drv);
                std::fs::create_dir_all(&dd).unwrap();
                symlink(&dd, d.join("driver")).unwrap();
            }
            if let Some(g) = group {
                let gd = dir.join("kernel/iommu_groups").join(g.to_string());
                std::fs::create_dir_all(gd.join("devices")).unwrap();
                symlink(&gd, d.join("iommu_group")).unwrap();
                symlink(&d, gd.join("devices").join(bdf)).unwrap();
            }
        }
    }

    #[test]
    fn the_view_follows_devices_and_groups() {
        let t = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let root = t.as_path();
        tree(
            root,
            &[
                ("0000:01:00.0", "0x020000", Some("vfio-pci"), Some(7)),
                ("0000:01:00.1", "0x020000", None, Some(8)),
                ("0000:00:1c.0", "0x060400", Some("pcieport"), Some(7)),
                ("0000:02:00.0", "0x010802", Some("vfio-pci"), Some(8)),
                ("0000:02:00.1", "0x0c0330", Some("xhci_hcd"), Some(9)),
                ("0000:03:00.0", "0x030000", Some("amdgpu"), Some(10)),
                ("0000:05:00.0", "0x030000", Some("vfio-pci"), None),
            ],
        );
        let b = |s: &str| s.parse::<HostBdf>().unwrap();
        let view = host_view(root, b("0000:01:00.0"), &[]);
        let names: Vec<String> = view.iter().map(|f| f.bdf.to_string()).collect();
        // 01:00.1 brings group 8, whose 02:00.0 brings its device's 02:00.1;
        // the root port (a bridge) is read but not followed.
        assert_eq!(
            names,
            [
                "0000:00:1c.0",
                "0000:01:00.0",
                "0000:01:00.1",
                "0000:02:00.0",
                "0000:02:00.1"
            ]
        );
        assert!(view[0].bridge);
        assert_eq!(view[1].driver.as_deref(), Some("vfio-pci"));
        assert_eq!(view[2].driver, None);
        assert_eq!(view[4].group, Some(9));
        // Named functions are read even outside the unit; missing ones are not.
        let view = host_view(
            root,
            b("0000:05:00.0"),
            &[b("0000:03:00.0"), b("0000:09:00.0")],
        );
        let names: Vec<String> = view.iter().map(|f| f.bdf.to_string()).collect();
        assert_eq!(names, ["0000:03:00.0", "0000:05:00.0"]);
        assert_eq!(view[1].group, None);
    }

    #[test]
    fn paths_that_are_not_functions() {
        let t = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let root = t.as_path();
        tree(
            root,
            &[("0000:01:00.0", "0x020000", Some("vfio-pci"), Some(1))],
        );
        for p in [
            "",
            "/etc/passwd",
            "/sys/bus/pci/devices/0000:01:00.0/../..",
            "/sys/bus/pci/devices/0000:01:00.8",
            "/sys/bus/pci/devices/0000:09:00.0",
            "0000:01:00.0x",
            "0000:1:00.0",
            "../0000:01:00.0",
        ] {
            assert!(
                matches!(function_of(root, p), Err(GroupError::NotPciFunction(_))),
                "{p}"
            );
        }
        assert_eq!(
            function_of(root, "/sys/bus/pci/devices/0000:01:00.0/").unwrap(),
            "0000:01:00.0"
        );
    }
}
