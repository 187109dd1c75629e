//! JSON wire types of the Arbor HTTP API.
//!
//! Request bodies reject unknown fields (`deny_unknown_fields`), so a typo in a
//! field name is a 400 rather than a silently ignored option. Response bodies
//! accept unknown fields so an older client keeps working against a newer VMM.
//!
//! Every request type has a `validate` method holding the checks the API
//! thread makes before anything reaches the VMM: identifier syntax, lengths,
//! and values that cannot be right whatever the VM looks like. Checks that
//! need VM state (does the port exist, is the slot free, does the file open)
//! are the VMM's.
//!
//! `pci_path` is carried as an opaque string: the VMM parses it with its PCI
//! path type and answers 400 when it does not parse.

use serde::{Deserialize, Serialize};

use crate::kv::{self, KvError};
use crate::message::ApiError;

/// Longest accepted device or port identifier, in bytes.
pub const MAX_ID_LEN: usize = 64;
/// Longest accepted disk serial, in bytes (the size of the virtio-blk ID
/// field).
pub const MAX_SERIAL_LEN: usize = 20;
/// Longest accepted PCI path string, in bytes.
pub const MAX_PCI_PATH_LEN: usize = 64;
/// Longest accepted host file path, in bytes (Linux `PATH_MAX` minus the NUL).
pub const MAX_FILE_PATH_LEN: usize = 4095;
/// Longest Linux network interface name (`IFNAMSIZ` minus the NUL).
pub const MAX_TAP_NAME_LEN: usize = 15;

// ---------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------

/// Answer to `GET /api/v1/vmm.ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmPingResponse {
    /// The VMM's version string.
    pub version: String,
}

/// Life-cycle state of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// No VM: `arbor --api-socket` without `--kernel`, before `vm.create`
    /// or after `vm.delete`.
    #[serde(rename = "not-created")]
    NotCreated,
    /// Built (`vm.create`) but not yet booted.
    Created,
    /// vCPUs are running.
    Running,
    /// vCPUs are stopped by `vm.pause`.
    Paused,
    /// The guest powered off or `vm.shutdown` was handled.
    Shutdown,
}

impl VmState {
    /// The state in words, for messages ("the VM is not created").
    pub fn describe(self) -> &'static str {
        match self {
            VmState::NotCreated => "not created",
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Shutdown => "shut down",
        }
    }
}

impl VmState {
    /// Every state, in declaration order.
    pub const ALL: &'static [VmState] = &[
        VmState::NotCreated,
        VmState::Created,
        VmState::Running,
        VmState::Paused,
        VmState::Shutdown,
    ];
}

/// Kind of a guest device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// virtio-blk.
    Disk,
    /// virtio-rng.
    Rng,
    /// virtio-net.
    Net,
    /// virtio-vsock.
    Vsock,
    /// A host device passed through with VFIO.
    Vfio,
    /// A device served by a vfio-user server (`vm.add-user-device`).
    VfioUser,
}

impl DeviceKind {
    /// Every kind, in declaration order.
    pub const ALL: &'static [DeviceKind] = &[
        DeviceKind::Disk,
        DeviceKind::Rng,
        DeviceKind::Net,
        DeviceKind::Vsock,
        DeviceKind::Vfio,
        DeviceKind::VfioUser,
    ];
}

/// One device of the VM, cold- or hot-plugged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Unique device identifier (given by the user or generated).
    pub id: String,
    /// What the device is.
    pub kind: DeviceKind,
    /// Where the device sits: its slot path from the root bus.
    pub pci_path: String,
    /// Guest-visible `bus:device.function`, once the guest has numbered the
    /// buses above the device; `null` before that.
    #[serde(default)]
    pub bdf: Option<String>,
    /// Id of the topology node (port or bridge) the device sits under;
    /// `null` for the root bus.
    #[serde(default)]
    pub port: Option<String>,
    /// Whether the device was added at run time through the API.
    #[serde(default)]
    pub hotplugged: bool,
    /// Disk only: host path of the backing file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Disk only: whether the disk is read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readonly: Option<bool>,
    /// Disk only: the serial reported to the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Vsock only: the guest's context id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<u64>,
    /// Vsock: the host UNIX socket host programs connect to; vfio-user
    /// device: the server's socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// NIC only: the MAC address the guest sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// NIC only: the tap's interface name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// NIC only: the MTU reported to the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Kernel VFIO device only: the host function, `DDDD:BB:DD.F`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_bdf: Option<String>,
    /// Kernel VFIO device only: the host function's IOMMU group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_group: Option<u32>,
    /// Kernel VFIO device (the function 0 of the request's first slot)
    /// only: the host functions left out of the guest and held by the VMM.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unassigned: Vec<String>,
    /// Passthrough devices (`vfio`, `vfio_user`) only: whether the back end
    /// still answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<DeviceState>,
    /// With `state` `failed`: why the back end stopped answering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Whether a passthrough device's back end still answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// The back end answers the guest's accesses.
    Ok,
    /// The back end failed (a vfio-user server exited, a host function
    /// stopped answering): the guest reads all-ones, its writes are
    /// dropped; the device can still be removed.
    Failed,
}

impl DeviceState {
    /// Every state, in declaration order.
    pub const ALL: &'static [DeviceState] = &[DeviceState::Ok, DeviceState::Failed];
}

/// Kind of a topology node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopologyNodeType {
    /// The root bus behind the host bridge.
    RootBus,
    /// A PCI Express root port.
    PcieRootPort,
    /// The upstream port of a PCI Express switch.
    PcieSwitchUpstreamPort,
    /// A downstream port of a PCI Express switch.
    PcieSwitchDownstreamPort,
    /// A conventional PCI-to-PCI bridge.
    PciBridge,
}

impl TopologyNodeType {
    /// Every type, in declaration order.
    pub const ALL: &'static [TopologyNodeType] = &[
        TopologyNodeType::RootBus,
        TopologyNodeType::PcieRootPort,
        TopologyNodeType::PcieSwitchUpstreamPort,
        TopologyNodeType::PcieSwitchDownstreamPort,
        TopologyNodeType::PciBridge,
    ];
}

/// How devices below a topology node are hot-plugged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HotplugMechanism {
    /// No hot-plug below this node: cold-plug only.
    None,
    /// PCI Express native hot-plug (slot capability, attention button,
    /// presence detect).
    PcieNative,
    /// ACPI hot-plug (GED/GPE notification and `_EJ0`).
    Acpi,
}

/// The topology's hotplug mode as the wire names it.
impl From<pci::HotplugMode> for HotplugMechanism {
    fn from(m: pci::HotplugMode) -> Self {
        match m {
            pci::HotplugMode::Native => HotplugMechanism::PcieNative,
            pci::HotplugMode::Acpi => HotplugMechanism::Acpi,
            pci::HotplugMode::None => HotplugMechanism::None,
        }
    }
}

impl HotplugMechanism {
    /// Every mechanism, in declaration order.
    pub const ALL: &'static [HotplugMechanism] = &[
        HotplugMechanism::None,
        HotplugMechanism::PcieNative,
        HotplugMechanism::Acpi,
    ];
}

/// One device slot below a topology node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotInfo {
    /// Device number on the node's secondary bus (0..=31).
    pub slot: u8,
    /// PCI path a device in this slot has.
    pub pci_path: String,
    /// Id of the device in the slot (its function 0); `null` when the slot
    /// is free or staged.
    #[serde(default)]
    pub device: Option<String>,
    /// Every function of the slot holding a device, ascending.
    #[serde(default)]
    pub functions: Vec<FunctionInfo>,
    /// Whether the slot holds functions 1-7 but no function 0 yet: the
    /// guest does not see them until function 0 is added.
    #[serde(default)]
    pub staged: bool,
}

/// One function of a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionInfo {
    /// Function number, 0 to 7.
    pub function: u8,
    /// PCI path of the function (`.F` when F is not 0).
    pub pci_path: String,
    /// Id of the device there.
    pub device: String,
}

/// A port or bridge of the PCI topology (or the root bus).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopologyNode {
    /// Identifier used as `port` in the `vm.add-*` requests.
    pub id: String,
    /// What the node is.
    #[serde(rename = "type")]
    pub node_type: TopologyNodeType,
    /// How devices below it are hot-plugged.
    pub hotplug: HotplugMechanism,
    /// PCI path of the port or bridge function itself (empty for the root bus).
    pub pci_path: String,
    /// Id of the node above this one; `null` for nodes on the root bus.
    #[serde(default)]
    pub parent: Option<String>,
    /// Secondary bus number the guest programmed; `null` until it has.
    #[serde(default)]
    pub secondary_bus: Option<u8>,
    /// Subordinate bus number the guest programmed; `null` until it has.
    #[serde(default)]
    pub subordinate_bus: Option<u8>,
    /// The slots devices can occupy below this node.
    #[serde(default)]
    pub slots: Vec<SlotInfo>,
}

/// Answer to `GET /api/v1/vm.info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Life-cycle state.
    pub state: VmState,
    /// Number of vCPUs, when known.
    #[serde(default)]
    pub cpus: Option<u32>,
    /// Guest memory size in bytes, when known.
    #[serde(default)]
    pub memory: Option<u64>,
    /// Every device, cold- and hot-plugged.
    #[serde(default)]
    pub devices: Vec<DeviceInfo>,
    /// Ports and bridges devices can be placed under.
    #[serde(default)]
    pub topology: Vec<TopologyNode>,
}

/// Answer to every successful `vm.add-*` request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AddDeviceResponse {
    /// Id of the new device (the one requested, or a generated one).
    pub id: String,
    /// Where it was placed.
    pub pci_path: String,
    /// `vm.add-device` taking several host functions: every function
    /// added, each with its id, `pci_path` and host function (function 0
    /// of each slot last, the order the slots were committed in).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub functions: Vec<AddedFunction>,
    /// Why the request was honoured but is not advised (a placement that
    /// merges host IOMMU groups behind a PCI bridge); also in the log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// One function a `vm.add-device` request added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddedFunction {
    /// Its device id.
    pub id: String,
    /// Its PCI path (`.F` when F is not 0).
    pub pci_path: String,
    /// The host function, `DDDD:BB:DD.F`.
    pub host_bdf: String,
}

/// Body of an error answer: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// One sentence saying what went wrong.
    pub error: String,
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

/// Body of `PUT /api/v1/vm.add-disk` (and the `--disk` option).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Host path of the backing regular file or block device: not empty, a
    /// whole number of 512-byte sectors. Absolute in API requests (the
    /// VMM's working directory is not the client's); `--disk` also takes a
    /// relative one, from the VMM's working directory.
    pub path: String,
    /// Open read-only and advertise `VIRTIO_BLK_F_RO`.
    #[serde(default)]
    pub readonly: bool,
    /// Lock the image as QEMU does (OFD byte-range locks at its lock
    /// bytes), so a writer excludes every other user, in this VM, another
    /// Arbor or a QEMU, while readers share; `false` (`lock=off`) neither
    /// locks nor checks.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub lock: bool,
    /// Device id; generated when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// Serial reported to the guest (at most 20 bytes).
    #[serde(default)]
    pub serial: Option<String>,
    /// Topology node to place the device under; the VMM picks a free slot.
    #[serde(default)]
    pub port: Option<String>,
    /// Exact placement.
    #[serde(default)]
    pub pci_path: Option<String>,
    /// Function of the slot, 0 to 7 (also given as `.F` in `pci_path`):
    /// functions 1-7 added to an empty slot are staged until function 0
    /// commits the slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<u8>,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            path: String::new(),
            readonly: false,
            lock: true,
            id: None,
            serial: None,
            port: None,
            pci_path: None,
            function: None,
        }
    }
}

fn default_true() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// Body of `PUT /api/v1/vm.add-rng`; every field is optional, and an empty
/// body means all defaults.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {
    /// Device id; generated when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// Topology node to place the device under.
    #[serde(default)]
    pub port: Option<String>,
    /// Exact placement.
    #[serde(default)]
    pub pci_path: Option<String>,
    /// Function of the slot, 0 to 7 (also given as `.F` in `pci_path`):
    /// functions 1-7 added to an empty slot are staged until function 0
    /// commits the slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<u8>,
}

/// Body of `PUT /api/v1/vm.add-user-device` (and the `--user-device`
/// option): a PCI function served by a vfio-user server.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDeviceConfig {
    /// Absolute path of the server's listening UNIX socket (under an
    /// `--allow-path` directory when the VMM has any).
    pub socket: String,
    /// Device id; generated when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// Topology node to place the device under.
    #[serde(default)]
    pub port: Option<String>,
    /// Exact placement.
    #[serde(default)]
    pub pci_path: Option<String>,
    /// Function of the slot, 0 to 7 (also given as `.F` in `pci_path`):
    /// functions 1-7 added to an empty slot are staged until function 0
    /// commits the slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<u8>,
}

/// Body of `PUT /api/v1/vm.add-device` (and the `--device` option): a host
/// PCI function bound to `vfio-pci`, passed through with kernel VFIO.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// The function's sysfs directory, `/sys/bus/pci/devices/DDDD:BB:DD.F`.
    pub path: String,
    /// Device id; generated when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// Topology node to place the device under.
    #[serde(default)]
    pub port: Option<String>,
    /// Exact placement.
    #[serde(default)]
    pub pci_path: Option<String>,
    /// Function of the guest slot, 0 to 7 (also given as `.F` in
    /// `pci_path`), for a request that takes a single host function:
    /// functions 1-7 added to an empty slot are staged until function 0
    /// commits the slot. A request taking several functions keeps their
    /// host numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<u8>,
    /// Host functions (`DDDD:BB:DD.F`) to give the guest; by default every
    /// function of the host device and every endpoint of its IOMMU groups
    /// not in `unassigned`. With it, every other one must be in
    /// `unassigned`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned: Option<Vec<String>>,
    /// Host functions (`DDDD:BB:DD.F`) of the device or its IOMMU groups
    /// left out of the guest: they must be bound to vfio-pci too, and the
    /// VMM holds them (the host cannot use them) while the device is
    /// attached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unassigned: Vec<String>,
}

/// Body of `PUT /api/v1/vm.add-net` (and the `--net` option): a virtio-net
/// NIC on a tap, named (`tap`) or already open (`fd`), exactly one of them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Name of an existing tap the VMM may open (owned by the VMM's user:
    /// the VMM does not create taps).
    #[serde(default)]
    pub tap: Option<String>,
    /// An open tap descriptor (`IFF_TAP|IFF_NO_PI|IFF_VNET_HDR`). On the
    /// command line: a descriptor number the VMM inherited. In an API
    /// request: the index (from 0) of a descriptor passed with `SCM_RIGHTS`
    /// in the same request on the API connection, never a descriptor
    /// number of the VMM's.
    #[serde(default)]
    pub fd: Option<i32>,
    /// MAC address `xx:xx:xx:xx:xx:xx` (unicast, not all zeroes); random
    /// and locally administered when absent.
    #[serde(default)]
    pub mac: Option<String>,
    /// MTU reported to the guest, 68 to 65535; 1500 when absent.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Device id; generated when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// Topology node to place the device under.
    #[serde(default)]
    pub port: Option<String>,
    /// Exact placement.
    #[serde(default)]
    pub pci_path: Option<String>,
    /// Function of the slot, 0 to 7 (also given as `.F` in `pci_path`):
    /// functions 1-7 added to an empty slot are staged until function 0
    /// commits the slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<u8>,
}

/// Smallest MTU a NIC accepts (IPv4's minimum).
pub const MIN_MTU: u32 = 68;
/// Largest MTU a NIC accepts.
pub const MAX_MTU: u32 = 65535;

/// Parses a MAC address `xx:xx:xx:xx:xx:xx` (hex digits, either case) and
/// refuses multicast (and broadcast) and all-zero addresses.
pub fn parse_mac(text: &str) -> Result<[u8; 6], ApiError> {
    let bad = |why: &str| ApiError::bad_request(format!("invalid MAC address '{text}': {why}"));
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut mac {
        let p = parts
            .next()
            .ok_or_else(|| bad("expected six hex octets separated by ':'"))?;
        if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad("expected six hex octets separated by ':'"));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad("not hex"))?;
    }
    if parts.next().is_some() {
        return Err(bad("expected six hex octets separated by ':'"));
    }
    if mac[0] & 1 != 0 {
        return Err(bad(
            "multicast address (the low bit of the first octet is set)",
        ));
    }
    if mac == [0; 6] {
        return Err(bad("all zeroes"));
    }
    Ok(mac)
}

/// Formats a MAC address as `xx:xx:xx:xx:xx:xx`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl NetConfig {
    /// Keys accepted by [`NetConfig::from_kv`].
    pub const KV_KEYS: &'static [&'static str] = &[
        "tap", "fd", "mac", "mtu", "id", "port", "pci_path", "function",
    ];

    /// Checks what can be checked without the VM.
    pub fn validate(&self) -> Result<(), ApiError> {
        match (&self.tap, self.fd) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request("give either 'tap' or 'fd', not both"))
            }
            (None, None) => {
                return Err(ApiError::bad_request(
                    "a NIC needs 'tap' (an existing tap's name) or 'fd' (an open tap)",
                ))
            }
            (Some(tap), None) => {
                if tap.is_empty()
                    || tap.len() > MAX_TAP_NAME_LEN
                    || tap == "."
                    || tap == ".."
                    || !tap
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
                {
                    return Err(ApiError::bad_request(format!(
                        "invalid tap name '{tap}': 1 to {MAX_TAP_NAME_LEN} printable ASCII \
                         bytes without '/', ':' or spaces"
                    )));
                }
            }
            (None, Some(fd)) => {
                if fd < 0 {
                    return Err(ApiError::bad_request(format!(
                        "'fd' must not be negative, not {fd}"
                    )));
                }
            }
        }
        if let Some(mac) = &self.mac {
            parse_mac(mac)?;
        }
        if let Some(mtu) = self.mtu {
            if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
                return Err(ApiError::bad_request(format!(
                    "MTU {mtu} is out of range ({MIN_MTU} to {MAX_MTU})"
                )));
            }
        }
        validate_opt_id("id", &self.id)?;
        validate_placement(&self.port, &self.pci_path, self.function)
    }

    /// Builds a NIC configuration from `tap=..|fd=..,mac=..,mtu=..,id=..,
    /// port=..,pci_path=..`.
    pub fn from_kv(input: &str) -> Result<Self, KvError> {
        let o = kv::parse(input, Self::KV_KEYS)?;
        Ok(NetConfig {
            tap: o.string("tap"),
            fd: o.parse("fd")?,
            mac: o.string("mac"),
            mtu: o.parse("mtu")?,
            id: o.string("id"),
            port: o.string("port"),
            pci_path: o.string("pci_path"),
            function: o.parse("function")?,
        })
    }
}

/// Body of `PUT /api/v1/vm.remove-device`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveDeviceRequest {
    /// Id of the device to unplug.
    pub id: String,
}

/// The body accepted by endpoints that take none: absent, or `{}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmptyRequest {}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

/// Checks an identifier (`id`, `port`): 1 to [`MAX_ID_LEN`] bytes of ASCII
/// letters, digits, `-`, `_` and `.`.
pub fn validate_id(field: &str, id: &str) -> Result<(), ApiError> {
    if id.is_empty() {
        return Err(ApiError::bad_request(format!(
            "'{field}' must not be empty"
        )));
    }
    if id.len() > MAX_ID_LEN {
        return Err(ApiError::bad_request(format!(
            "'{field}' is longer than {MAX_ID_LEN} bytes"
        )));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(ApiError::bad_request(format!(
            "'{field}' may contain only ASCII letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

fn validate_opt_id(field: &str, id: &Option<String>) -> Result<(), ApiError> {
    id.as_deref().map_or(Ok(()), |v| validate_id(field, v))
}

/// Checks the syntax-free parts of a PCI path: non-empty, at most
/// [`MAX_PCI_PATH_LEN`] bytes, printable ASCII without spaces. The VMM checks
/// that it parses and names a usable slot.
pub fn validate_pci_path(field: &str, path: &str) -> Result<(), ApiError> {
    if path.is_empty() {
        return Err(ApiError::bad_request(format!(
            "'{field}' must not be empty"
        )));
    }
    if path.len() > MAX_PCI_PATH_LEN {
        return Err(ApiError::bad_request(format!(
            "'{field}' is longer than {MAX_PCI_PATH_LEN} bytes"
        )));
    }
    if !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::bad_request(format!(
            "'{field}' may contain only printable ASCII without spaces"
        )));
    }
    Ok(())
}

/// Highest function number of a slot.
pub const MAX_FUNCTION: u8 = 7;

fn validate_placement(
    port: &Option<String>,
    pci_path: &Option<String>,
    function: Option<u8>,
) -> Result<(), ApiError> {
    validate_opt_id("port", port)?;
    if let Some(f) = function.filter(|f| *f > MAX_FUNCTION) {
        return Err(ApiError::bad_request(format!(
            "'function' {f} is out of range (a slot has functions 0 to {MAX_FUNCTION})"
        )));
    }
    pci_path
        .as_deref()
        .map_or(Ok(()), |p| validate_pci_path("pci_path", p))
}

fn validate_file_path(field: &str, path: &str) -> Result<(), ApiError> {
    if path.is_empty() {
        return Err(ApiError::bad_request(format!(
            "'{field}' must not be empty"
        )));
    }
    if path.len() > MAX_FILE_PATH_LEN {
        return Err(ApiError::bad_request(format!(
            "'{field}' is longer than {MAX_FILE_PATH_LEN} bytes"
        )));
    }
    if path.contains('\0') {
        return Err(ApiError::bad_request(format!(
            "'{field}' must not contain a NUL character"
        )));
    }
    Ok(())
}

/// The checks a passthrough device's request shares: its `(field, value)`
/// file path, not empty and absolute (`hint` says why it must be), the
/// id, and the `(port, pci_path, function)` placement.
fn validate_passthrough(
    (field, path): (&str, &str),
    hint: &str,
    id: &Option<String>,
    (port, pci_path, function): (&Option<String>, &Option<String>, Option<u8>),
) -> Result<(), ApiError> {
    validate_file_path(field, path)?;
    if !path.starts_with('/') {
        return Err(ApiError::bad_request(format!(
            "'{field}' must be absolute, not '{path}': {hint}"
        )));
    }
    validate_opt_id("id", id)?;
    validate_placement(port, pci_path, function)
}

impl DiskConfig {
    /// Keys accepted by [`DiskConfig::from_kv`].
    pub const KV_KEYS: &'static [&'static str] = &[
        "path", "readonly", "id", "serial", "port", "pci_path", "function", "lock",
    ];

    /// Checks what can be checked without the VM.
    pub fn validate(&self) -> Result<(), ApiError> {
        validate_file_path("path", &self.path)?;
        if !self.path.starts_with('/') {
            return Err(ApiError::bad_request(format!(
                "'path' must be absolute, not '{}': the VMM's working directory is not the client's",
                self.path
            )));
        }
        validate_opt_id("id", &self.id)?;
        if let Some(serial) = &self.serial {
            if serial.len() > MAX_SERIAL_LEN {
                return Err(ApiError::bad_request(format!(
                    "'serial' is longer than {MAX_SERIAL_LEN} bytes"
                )));
            }
            if !serial.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
                return Err(ApiError::bad_request(
                    "'serial' may contain only printable ASCII",
                ));
            }
        }
        validate_placement(&self.port, &self.pci_path, self.function)
    }

    /// Builds a disk configuration from `path=..,readonly=on|off,id=..,
    /// serial=..,port=..,pci_path=..,lock=on|off`; a bare first item is the
    /// path.
    pub fn from_kv(input: &str) -> Result<Self, KvError> {
        let o = kv::parse_with_positional(input, Self::KV_KEYS, "path")?;
        Ok(DiskConfig {
            path: o.required("path")?.to_string(),
            readonly: o.bool("readonly")?.unwrap_or(false),
            lock: o.bool("lock")?.unwrap_or(true),
            id: o.string("id"),
            serial: o.string("serial"),
            port: o.string("port"),
            pci_path: o.string("pci_path"),
            function: o.parse("function")?,
        })
    }
}

impl RngConfig {
    /// Keys accepted by [`RngConfig::from_kv`].
    pub const KV_KEYS: &'static [&'static str] = &["id", "port", "pci_path", "function"];

    /// Checks what can be checked without the VM.
    pub fn validate(&self) -> Result<(), ApiError> {
        validate_opt_id("id", &self.id)?;
        validate_placement(&self.port, &self.pci_path, self.function)
    }

    /// Builds an rng configuration from `id=..,port=..,pci_path=..`.
    pub fn from_kv(input: &str) -> Result<Self, KvError> {
        let o = kv::parse(input, Self::KV_KEYS)?;
        Ok(RngConfig {
            id: o.string("id"),
            port: o.string("port"),
            pci_path: o.string("pci_path"),
            function: o.parse("function")?,
        })
    }
}

impl UserDeviceConfig {
    /// Keys accepted by [`UserDeviceConfig::from_kv`].
    pub const KV_KEYS: &'static [&'static str] = &["socket", "id", "port", "pci_path", "function"];

    /// Checks what can be checked without the VM.
    pub fn validate(&self) -> Result<(), ApiError> {
        validate_passthrough(
            ("socket", &self.socket),
            "the VMM's working directory is not the client's",
            &self.id,
            (&self.port, &self.pci_path, self.function),
        )
    }

    /// Builds a configuration from `socket=..,id=..,port=..,pci_path=..`; a
    /// bare first item is the socket.
    pub fn from_kv(input: &str) -> Result<Self, KvError> {
        let o = kv::parse_with_positional(input, Self::KV_KEYS, "socket")?;
        Ok(UserDeviceConfig {
            socket: o.required("socket")?.to_string(),
            id: o.string("id"),
            port: o.string("port"),
            pci_path: o.string("pci_path"),
            function: o.parse("function")?,
        })
    }
}

/// Checks a list of host functions (`assigned`, `unassigned`): each
/// `DDDD:BB:DD.F`, none twice.
fn validate_host_functions(field: &str, list: &[String]) -> Result<(), ApiError> {
    if list.len() > MAX_HOST_FUNCTIONS {
        return Err(ApiError::bad_request(format!(
            "'{field}' names more than {MAX_HOST_FUNCTIONS} functions"
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for s in list {
        let b: pci::assignment::HostBdf = s
            .parse()
            .map_err(|e: String| ApiError::bad_request(format!("'{field}': {e}")))?;
        if !seen.insert(b) {
            return Err(ApiError::bad_request(format!("'{field}' names {b} twice")));
        }
    }
    Ok(())
}

/// Most host functions `assigned` or `unassigned` may name.
pub const MAX_HOST_FUNCTIONS: usize = 256;

/// A `+`-separated list of a `key=value` option (`unassigned=A+B`).
fn kv_list(o: &kv::KvOptions, key: &str) -> Option<Vec<String>> {
    o.get(key)
        .map(|v| v.split('+').map(str::to_string).collect())
}

impl DeviceConfig {
    /// Keys accepted by [`DeviceConfig::from_kv`].
    pub const KV_KEYS: &'static [&'static str] = &[
        "path",
        "id",
        "port",
        "pci_path",
        "function",
        "assigned",
        "unassigned",
    ];

    /// Checks what can be checked without the VM (the VMM checks that the
    /// path names a PCI function, its driver and its IOMMU group).
    pub fn validate(&self) -> Result<(), ApiError> {
        validate_passthrough(
            ("path", &self.path),
            "it names /sys/bus/pci/devices/DDDD:BB:DD.F",
            &self.id,
            (&self.port, &self.pci_path, self.function),
        )?;
        if let Some(a) = &self.assigned {
            if a.is_empty() {
                return Err(ApiError::bad_request(
                    "'assigned' must name at least one host function",
                ));
            }
            validate_host_functions("assigned", a)?;
        }
        validate_host_functions("unassigned", &self.unassigned)
    }

    /// Builds a configuration from `path=..,id=..,port=..,pci_path=..,
    /// function=..,assigned=A+B,unassigned=A+B`; a bare first item is the
    /// path.
    pub fn from_kv(input: &str) -> Result<Self, KvError> {
        let o = kv::parse_with_positional(input, Self::KV_KEYS, "path")?;
        Ok(DeviceConfig {
            path: o.required("path")?.to_string(),
            id: o.string("id"),
            port: o.string("port"),
            pci_path: o.string("pci_path"),
            function: o.parse("function")?,
            assigned: kv_list(&o, "assigned"),
            unassigned: kv_list(&o, "unassigned").unwrap_or_default(),
        })
    }
}

impl RemoveDeviceRequest {
    /// Checks the id's syntax.
    pub fn validate(&self) -> Result<(), ApiError> {
        validate_id("id", &self.id)
    }
}

// ---------------------------------------------------------------------------
// Vsock
// ---------------------------------------------------------------------------

/// Lowest guest CID (0, 1 and 2 are reserved: hypervisor, local, host).
pub const MIN_VSOCK_CID: u64 = 3;
/// Highest guest CID (`u32::MAX` is `VMADDR_CID_ANY`).
pub const MAX_VSOCK_CID: u64 = u32::MAX as u64 - 1;
/// Longest vsock socket path: `PATH_<port>` (up to 11 more bytes) must still
/// fit in a UNIX socket address (107 bytes).
pub const MAX_VSOCK_SOCKET_LEN: usize = 96;

/// Body of `PUT /api/v1/vm.add-vsock` (and the `--vsock` option): at most
/// one per VM.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id, 3 to 4294967294.
    pub cid: u64,
    /// UNIX socket the VMM creates and listens on: host programs connect,
    /// write `CONNECT <port>\n` and get `OK <host port>\n`; guest
    /// connections to host port P go to `<socket>_P`. Absolute in API
    /// requests; the directory must exist and the path must be free.
    pub socket: String,
    /// Device id; generated when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// Topology node to place the device under.
    #[serde(default)]
    pub port: Option<String>,
    /// Exact placement.
    #[serde(default)]
    pub pci_path: Option<String>,
    /// Function of the slot, 0 to 7 (also given as `.F` in `pci_path`):
    /// functions 1-7 added to an empty slot are staged until function 0
    /// commits the slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<u8>,
}

impl VsockConfig {
    /// Keys accepted by [`VsockConfig::from_kv`].
    pub const KV_KEYS: &'static [&'static str] =
        &["cid", "socket", "id", "port", "pci_path", "function"];

    /// Checks what can be checked without the VM (the socket path may be
    /// relative here: the command line resolves it from the VMM's working
    /// directory; the VMM refuses relative paths in API requests).
    pub fn validate(&self) -> Result<(), ApiError> {
        if !(MIN_VSOCK_CID..=MAX_VSOCK_CID).contains(&self.cid) {
            return Err(ApiError::bad_request(format!(
                "'cid' {} is reserved or out of range: use {MIN_VSOCK_CID} to {MAX_VSOCK_CID}",
                self.cid
            )));
        }
        validate_file_path("socket", &self.socket)?;
        if self.socket.len() > MAX_VSOCK_SOCKET_LEN {
            return Err(ApiError::bad_request(format!(
                "'socket' is longer than {MAX_VSOCK_SOCKET_LEN} bytes (a UNIX socket address \
                 holds 107, and '<socket>_<port>' must fit too)"
            )));
        }
        validate_opt_id("id", &self.id)?;
        validate_placement(&self.port, &self.pci_path, self.function)
    }

    /// Builds a vsock configuration from `cid=N,socket=PATH,id=..,port=..,
    /// pci_path=..`.
    pub fn from_kv(input: &str) -> Result<Self, KvError> {
        let o = kv::parse(input, Self::KV_KEYS)?;
        let cid_text = o.required("cid")?;
        let cid = cid_text.parse().map_err(|_| KvError::InvalidValue {
            key: "cid".into(),
            value: cid_text.to_string(),
            reason: "expected a number from 3 to 4294967294".into(),
        })?;
        Ok(VsockConfig {
            cid,
            socket: o.required("socket")?.to_string(),
            id: o.string("id"),
            port: o.string("port"),
            pci_path: o.string("pci_path"),
            function: o.parse("function")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::ApiErrorKind;

    #[test]
    fn net_validation_and_kv() {
        let n = NetConfig::from_kv("tap=tap0,mac=52:54:00:ab:CD:ef,mtu=9000,id=n0").unwrap();
        assert_eq!(n.tap.as_deref(), Some("tap0"));
        assert_eq!(n.mtu, Some(9000));
        n.validate().unwrap();
        assert_eq!(parse_mac("52:54:00:ab:CD:ef").unwrap()[5], 0xef);
        assert_eq!(format_mac(&[0x52, 0, 1, 2, 3, 0xff]), "52:00:01:02:03:ff");
        for (cfg, msg) in [
            ("tap=t,fd=3", "either 'tap' or 'fd'"),
            ("mac=52:54:00:00:00:01", "needs 'tap'"),
            ("tap=a/b", "invalid tap name"),
            ("tap=0123456789abcdef", "invalid tap name"),
            ("fd=-1", "must not be negative"),
            ("tap=t,mac=01:00:5e:00:00:01", "multicast"),
            ("tap=t,mac=00:00:00:00:00:00", "all zeroes"),
            ("tap=t,mac=52:54:00:00:00", "six hex octets"),
            ("tap=t,mac=52:54:00:00:00:0g", "six hex octets"),
            ("tap=t,mac=52:54:00:00:00:01:02", "six hex octets"),
            ("tap=t,mtu=67", "out of range (68 to 65535)"),
            ("tap=t,mtu=65536", "out of range"),
        ] {
            let m = bad(NetConfig::from_kv(cfg).unwrap().validate());
            assert!(m.contains(msg), "{cfg}: {m}");
        }
        assert!(NetConfig::from_kv("tap=t,mtu=x").is_err());
        assert!(NetConfig::from_kv("tap=t,colour=red").is_err());
        let e = serde_json::from_str::<NetConfig>(r#"{"tap": "t", "x": 1}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    fn bad(r: Result<(), ApiError>) -> String {
        let e = r.unwrap_err();
        assert_eq!(e.kind, ApiErrorKind::BadRequest);
        e.message
    }

    #[test]
    fn disk_defaults_and_unknown_fields() {
        let d: DiskConfig = serde_json::from_str(r#"{"path": "/a"}"#).unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "/a".into(),
                ..Default::default()
            }
        );
        let e = serde_json::from_str::<DiskConfig>(r#"{"path": "/a", "ro": true}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `ro`"), "{e}");
        assert!(serde_json::from_str::<DiskConfig>(r#"{"readonly": true}"#).is_err());
        assert!(serde_json::from_str::<EmptyRequest>("{}").is_ok());
        assert!(serde_json::from_str::<EmptyRequest>(r#"{"x": 1}"#).is_err());
    }

    #[test]
    fn id_rules() {
        assert!(validate_id("id", "disk-0_a.b").is_ok());
        assert_eq!(bad(validate_id("id", "")), "'id' must not be empty");
        assert!(bad(validate_id("id", "a b")).contains("may contain only"));
        assert!(bad(validate_id("id", &"x".repeat(65))).contains("longer than 64"));
        assert!(validate_id("id", &"x".repeat(64)).is_ok());
    }

    #[test]
    fn disk_validation() {
        let mut d = DiskConfig {
            path: "/img".into(),
            serial: Some("S".repeat(20)),
            port: Some("rp0".into()),
            pci_path: Some("00:02.0/00.0".into()),
            ..Default::default()
        };
        assert!(d.validate().is_ok());
        d.serial = Some("S".repeat(21));
        assert!(bad(d.validate()).contains("'serial' is longer"));
        d.serial = None;
        d.pci_path = Some("00:02.0 /0".into());
        assert!(bad(d.validate()).contains("pci_path"));
        d.pci_path = None;
        d.function = Some(7);
        assert!(d.validate().is_ok());
        d.function = Some(8);
        assert_eq!(
            bad(d.validate()),
            "'function' 8 is out of range (a slot has functions 0 to 7)"
        );
        d.function = None;
        d.path = "img".into();
        assert!(bad(d.validate()).contains("'path' must be absolute, not 'img'"));
        d.path = "./img".into();
        assert!(bad(d.validate()).contains("must be absolute"));
        d.path = String::new();
        assert_eq!(bad(d.validate()), "'path' must not be empty");
    }

    #[test]
    fn disk_from_kv() {
        let d = DiskConfig::from_kv("path=/x.raw,readonly=on,id=d0,serial=SN,port=rp1").unwrap();
        assert_eq!(d.path, "/x.raw");
        assert!(d.readonly);
        assert_eq!(d.id.as_deref(), Some("d0"));
        assert_eq!(d.serial.as_deref(), Some("SN"));
        assert_eq!(d.port.as_deref(), Some("rp1"));
        assert_eq!(d.pci_path, None);
        assert_eq!(d.function, None);
        assert!(d.lock);
        let d = DiskConfig::from_kv("/x.raw,port=rp1,function=3").unwrap();
        assert_eq!(d.function, Some(3));
        assert!(DiskConfig::from_kv("/x.raw,function=x").is_err());
        assert_eq!(
            RngConfig::from_kv("pci_path=03/00.2,function=2")
                .unwrap()
                .function,
            Some(2)
        );
        assert_eq!(
            NetConfig::from_kv("tap=t0,function=1").unwrap().function,
            Some(1)
        );
        assert_eq!(
            VsockConfig::from_kv("cid=3,socket=/v,function=4")
                .unwrap()
                .function,
            Some(4)
        );
        assert_eq!(
            UserDeviceConfig::from_kv("/s,function=5").unwrap().function,
            Some(5)
        );
        assert_eq!(
            DeviceConfig::from_kv("/sys/bus/pci/devices/0000:03:00.0,function=6")
                .unwrap()
                .function,
            Some(6)
        );
        // Absent, the field is left out of the JSON.
        let v = serde_json::to_value(DiskConfig::from_kv("/y.raw").unwrap()).unwrap();
        assert!(v.get("function").is_none());
        let d = DiskConfig::from_kv("/y.raw").unwrap();
        assert_eq!(d.path, "/y.raw");
        assert!(!d.readonly);
        assert!(d.lock);
        assert!(!DiskConfig::from_kv("/y.raw,lock=off").unwrap().lock);
        assert!(DiskConfig::from_kv("/y.raw,lock=on").unwrap().lock);
        assert_eq!(
            DiskConfig::from_kv("readonly=on").unwrap_err(),
            KvError::MissingKey { key: "path".into() }
        );
    }

    #[test]
    fn vsock_config_checks() {
        let v = VsockConfig::from_kv("cid=3,socket=/run/v.sock,id=vs,port=rp1").unwrap();
        assert_eq!(v.cid, 3);
        assert_eq!(v.socket, "/run/v.sock");
        assert_eq!(v.id.as_deref(), Some("vs"));
        assert!(v.validate().is_ok());
        for cid in [0u64, 1, 2, u64::from(u32::MAX), u64::MAX] {
            let c = VsockConfig { cid, ..v.clone() };
            assert!(bad(c.validate()).contains("'cid'"), "{cid}");
        }
        let c = VsockConfig {
            cid: u64::from(u32::MAX) - 1,
            ..v.clone()
        };
        assert!(c.validate().is_ok());
        let long = VsockConfig {
            socket: format!("/{}", "s".repeat(96)),
            ..v.clone()
        };
        assert!(bad(long.validate()).contains("longer than 96"));
        assert!(VsockConfig::from_kv("cid=x,socket=/a")
            .unwrap_err()
            .to_string()
            .contains("cid"));
        assert!(VsockConfig::from_kv("cid=-1,socket=/a").is_err());
        assert_eq!(
            VsockConfig::from_kv("cid=3").unwrap_err(),
            KvError::MissingKey {
                key: "socket".into()
            }
        );
        assert!(serde_json::from_str::<VsockConfig>(r#"{"cid": 3}"#).is_err());
        assert!(
            serde_json::from_str::<VsockConfig>(r#"{"cid": 3, "socket": "/a", "x": 1}"#).is_err()
        );
    }

    #[test]
    fn user_device_config() {
        let u = UserDeviceConfig::from_kv("/run/gpio.sock,id=g0,port=br0").unwrap();
        assert_eq!(u.socket, "/run/gpio.sock");
        assert_eq!(u.id.as_deref(), Some("g0"));
        assert_eq!(u.port.as_deref(), Some("br0"));
        assert!(u.validate().is_ok());
        assert_eq!(
            UserDeviceConfig::from_kv("id=g0").unwrap_err(),
            KvError::MissingKey {
                key: "socket".into()
            }
        );
        let mut u = UserDeviceConfig {
            socket: "gpio.sock".into(),
            ..Default::default()
        };
        assert!(bad(u.validate()).contains("'socket' must be absolute"));
        u.socket = String::new();
        assert_eq!(bad(u.validate()), "'socket' must not be empty");
        u.socket = "/s".into();
        u.pci_path = Some("00:02.0 /0".into());
        assert!(bad(u.validate()).contains("pci_path"));
        let e = serde_json::from_str::<UserDeviceConfig>(r#"{"socket": "/s", "path": "/x"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `path`"), "{e}");
        assert_eq!(
            serde_json::to_string(&DeviceKind::VfioUser).unwrap(),
            "\"vfio_user\""
        );
    }

    #[test]
    fn device_config() {
        let d = DeviceConfig::from_kv("/sys/bus/pci/devices/0000:03:00.0,id=nic,port=rp1").unwrap();
        assert_eq!(d.path, "/sys/bus/pci/devices/0000:03:00.0");
        assert_eq!(d.id.as_deref(), Some("nic"));
        assert_eq!(d.port.as_deref(), Some("rp1"));
        assert!(d.validate().is_ok());
        assert_eq!(
            DeviceConfig::from_kv("id=nic").unwrap_err(),
            KvError::MissingKey { key: "path".into() }
        );
        let mut d = DeviceConfig {
            path: "0000:03:00.0".into(),
            ..Default::default()
        };
        assert!(bad(d.validate()).contains("'path' must be absolute"));
        d.path = String::new();
        assert_eq!(bad(d.validate()), "'path' must not be empty");
        d.path = "/sys/bus/pci/devices/0000:03:00.0".into();
        d.id = Some("a b".into());
        assert!(bad(d.validate()).contains("'id'"));
        d.id = None;
        // Partial assignment: '+'-separated host functions.
        let p = DeviceConfig::from_kv(
            "/sys/bus/pci/devices/0000:09:00.0,unassigned=0000:09:00.1+0000:09:00.3",
        )
        .unwrap();
        assert_eq!(p.unassigned, ["0000:09:00.1", "0000:09:00.3"]);
        assert_eq!(p.assigned, None);
        assert!(p.validate().is_ok());
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["unassigned"][1], "0000:09:00.3");
        assert!(v.get("assigned").is_none());
        let a = DeviceConfig::from_kv("/sys/bus/pci/devices/0000:09:00.0,assigned=0000:09:00.0")
            .unwrap();
        assert_eq!(
            a.assigned.as_deref(),
            Some(&["0000:09:00.0".to_string()][..])
        );
        assert!(a.unassigned.is_empty());
        assert!(serde_json::to_value(&a)
            .unwrap()
            .get("unassigned")
            .is_none());
        for (assigned, unassigned, want) in [
            (
                None,
                vec!["09:00.1"],
                "'unassigned': '09:00.1' is not a host PCI function",
            ),
            (
                None,
                vec!["0000:09:00.1", "0000:09:00.1"],
                "names 0000:09:00.1 twice",
            ),
            (Some(vec![]), vec![], "'assigned' must name at least one"),
            (
                Some(vec!["0000:09:00.8"]),
                vec![],
                "'assigned': '0000:09:00.8'",
            ),
        ] {
            let c = DeviceConfig {
                assigned: assigned.map(|v: Vec<&str>| v.iter().map(|s| s.to_string()).collect()),
                unassigned: unassigned.iter().map(|s| s.to_string()).collect(),
                ..d.clone()
            };
            assert!(
                bad(c.validate()).contains(want),
                "{want}: {:?}",
                c.validate()
            );
        }
        let e =
            serde_json::from_str::<DeviceConfig>(r#"{"path": "/x", "socket": "/s"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `socket`"), "{e}");
        assert_eq!(
            serde_json::to_string(&DeviceState::Failed).unwrap(),
            "\"failed\""
        );
    }

    #[test]
    fn enums_serialize_snake_case() {
        assert_eq!(
            serde_json::to_string(&TopologyNodeType::PcieRootPort).unwrap(),
            "\"pcie_root_port\""
        );
        assert_eq!(
            serde_json::to_string(&HotplugMechanism::PcieNative).unwrap(),
            "\"pcie_native\""
        );
        assert_eq!(
            serde_json::to_string(&VmState::Paused).unwrap(),
            "\"paused\""
        );
        assert_eq!(
            serde_json::to_string(&DeviceKind::Vfio).unwrap(),
            "\"vfio\""
        );
    }

    #[test]
    fn topology_node_uses_type_key() {
        let n = TopologyNode {
            id: "rp0".into(),
            node_type: TopologyNodeType::PcieRootPort,
            hotplug: HotplugMechanism::PcieNative,
            pci_path: "00:02.0".into(),
            parent: None,
            secondary_bus: Some(1),
            subordinate_bus: Some(1),
            slots: vec![SlotInfo {
                slot: 0,
                pci_path: "00:02.0/00.0".into(),
                device: None,
                functions: Vec::new(),
                staged: false,
            }],
        };
        let v = serde_json::to_value(&n).unwrap();
        assert_eq!(v["type"], "pcie_root_port");
        assert_eq!(v["hotplug"], "pcie_native");
        assert_eq!(v["slots"][0]["device"], serde_json::Value::Null);
        let back: TopologyNode = serde_json::from_value(v).unwrap();
        assert_eq!(back, n);
    }
}
