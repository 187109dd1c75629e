//! IOMMU group rules for kernel VFIO, read from sysfs under a root the tests
//! can point at a fake tree: the host function named by the user, its IOMMU
//! group, and whether the group is viable (every endpoint in it bound to
//! `vfio-pci` or to no driver).
//!
//! This is the part of the kernel VFIO back end above the ioctls:
//! [`super::kernel::probe`] runs [`check`] before it opens anything.

use std::path::{Path, PathBuf};

/// The driver a function must be bound to for kernel VFIO.
pub const VFIO_PCI_DRIVER: &str = "vfio-pci";

/// Why a host function cannot be passed through.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GroupError {
    #[error("'{0}' does not name a PCI function (expected /sys/bus/pci/devices/DDDD:BB:DD.F)")]
    NotPciFunction(String),
    #[error("PCI function {bdf} is bound to driver '{driver}', not vfio-pci")]
    WrongDriver { bdf: String, driver: String },
    #[error("PCI function {0} is not bound to vfio-pci (no driver)")]
    Unbound(String),
    #[error("PCI function {0} has no IOMMU group (no IOMMU, or VFIO is not available)")]
    NoGroup(String),
    #[error(
        "IOMMU group {group} of {bdf} is not viable: {} (every endpoint of the group must be \
         bound to vfio-pci or to no driver)",
        .offenders.iter().map(|(d, drv)| format!("{d} is bound to {drv}")).collect::<Vec<_>>().join(", ")
    )]
    NotViable {
        bdf: String,
        group: u32,
        /// (function, its driver) for each endpoint in the way.
        offenders: Vec<(String, String)>,
    },
}

/// A viable group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// The function, `DDDD:BB:DD.F`.
    pub bdf: String,
    /// The IOMMU group number.
    pub group: u32,
    /// The group's VFIO character device (`/dev/vfio/N`).
    pub dev_path: PathBuf,
    /// Every function in the group (the device included), sorted.
    pub members: Vec<String>,
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

/// Checks that `path`'s function is bound to vfio-pci and that its IOMMU
/// group is viable; reads sysfs under `sysfs` (normally `/sys`).
pub fn check(sysfs: &Path, path: &str) -> Result<GroupInfo, GroupError> {
    let bdf = function_of(sysfs, path)?;
    let devices = sysfs.join("bus/pci/devices");
    match link_name(&devices.join(&bdf).join("driver")) {
        Some(d) if d == VFIO_PCI_DRIVER => {}
        Some(driver) => return Err(GroupError::WrongDriver { bdf, driver }),
        None => return Err(GroupError::Unbound(bdf)),
    }
    let group: u32 = link_name(&devices.join(&bdf).join("iommu_group"))
        .and_then(|g| g.parse().ok())
        .ok_or_else(|| GroupError::NoGroup(bdf.clone()))?;
    let members_dir = sysfs
        .join("kernel/iommu_groups")
        .join(group.to_string())
        .join("devices");
    let mut members: Vec<String> = std::fs::read_dir(&members_dir)
        .map_err(|_| GroupError::NoGroup(bdf.clone()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    members.sort();
    let mut offenders = Vec::new();
    for m in &members {
        let dir = devices.join(m);
        // Bridges stay with their drivers (pcieport): only endpoints count.
        let class = std::fs::read_to_string(dir.join("class")).unwrap_or_default();
        if class.trim().starts_with("0x0604") {
            continue;
        }
        if let Some(driver) = link_name(&dir.join("driver")) {
            if driver != VFIO_PCI_DRIVER {
                offenders.push((m.clone(), driver));
            }
        }
    }
    if !offenders.is_empty() {
        return Err(GroupError::NotViable {
            bdf,
            group,
            offenders,
        });
    }
    Ok(GroupInfo {
        bdf,
        group,
        dev_path: PathBuf::from(format!("/dev/vfio/{group}")),
        members,
    })
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
    fn viability_and_messages() {
        let t = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let root = t.as_path();
        tree(
            root,
            &[
                ("0000:01:00.0", "0x020000", Some("vfio-pci"), Some(7)),
                ("0000:01:00.1", "0x020000", None, Some(7)),
                ("0000:00:1c.0", "0x060400", Some("pcieport"), Some(7)),
                ("0000:02:00.0", "0x010802", Some("vfio-pci"), Some(8)),
                ("0000:02:00.1", "0x0c0330", Some("xhci_hcd"), Some(8)),
                ("0000:03:00.0", "0x030000", Some("amdgpu"), Some(9)),
                ("0000:04:00.0", "0x030000", None, Some(10)),
                ("0000:05:00.0", "0x030000", Some("vfio-pci"), None),
            ],
        );
        let ok = check(root, "/sys/bus/pci/devices/0000:01:00.0").unwrap();
        assert_eq!(ok.group, 7);
        assert_eq!(ok.dev_path, PathBuf::from("/dev/vfio/7"));
        assert_eq!(ok.members, ["0000:00:1c.0", "0000:01:00.0", "0000:01:00.1"]);
        let e = check(root, "0000:02:00.0").unwrap_err();
        assert_eq!(
            e.to_string(),
            "IOMMU group 8 of 0000:02:00.0 is not viable: 0000:02:00.1 is bound to xhci_hcd \
             (every endpoint of the group must be bound to vfio-pci or to no driver)"
        );
        let e = check(root, "0000:03:00.0").unwrap_err();
        assert_eq!(
            e.to_string(),
            "PCI function 0000:03:00.0 is bound to driver 'amdgpu', not vfio-pci"
        );
        assert_eq!(
            check(root, "0000:04:00.0").unwrap_err(),
            GroupError::Unbound("0000:04:00.0".into())
        );
        assert_eq!(
            check(root, "0000:05:00.0").unwrap_err(),
            GroupError::NoGroup("0000:05:00.0".into())
        );
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
                matches!(check(root, p), Err(GroupError::NotPciFunction(_))),
                "{p}"
            );
        }
        assert!(check(root, "/sys/bus/pci/devices/0000:01:00.0/").is_ok());
    }
}
