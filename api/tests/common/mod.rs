//! A fake VMM for the API tests: a thread that waits on the wake-up EventFd,
//! drains the request channel and answers from a small in-memory VM model.
//!
//! Special disk paths trigger misbehaviour:
//! - `/fail`: the VMM answers 500;
//! - `/wrong-answer`: the VMM answers with the wrong kind of reply;
//! - `/drop`: the VMM drops the request without answering;
//! - `/slow`: the VMM answers after [`SLOW_REPLY`] from another thread.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use api::client::Client;
use api::types::{
    AddDeviceResponse, DeviceInfo, DeviceKind, HotplugMechanism, SlotInfo, TopologyNode,
    TopologyNodeType, VmInfo, VmState, VmmPingResponse,
};
use api::{start_server, ApiError, ApiMessage, ApiReply, ApiRequest, ApiResponse, ApiServerHandle};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

pub const FAKE_VERSION: &str = "fake-1.2.3";
pub const SLOW_REPLY: Duration = Duration::from_millis(600);

/// State of the fake VM.
pub struct FakeVm {
    pub info: VmInfo,
    pub next_id: u32,
    pub vmm_shutdown_requested: bool,
}

fn port(id: &str, pci_path: &str, slots: u8) -> TopologyNode {
    TopologyNode {
        id: id.into(),
        node_type: TopologyNodeType::PcieRootPort,
        hotplug: HotplugMechanism::PcieNative,
        pci_path: pci_path.into(),
        parent: None,
        secondary_bus: None,
        subordinate_bus: None,
        slots: (0..slots)
            .map(|s| SlotInfo {
                slot: s,
                pci_path: format!("{pci_path}/{s:02x}.0"),
                device: None,
                functions: Vec::new(),
                staged: false,
            })
            .collect(),
    }
}

/// A hot-plugged device as `vm.info` lists it, with no kind-specific field.
fn hotplugged_device(
    id: String,
    kind: DeviceKind,
    pci_path: String,
    port: Option<String>,
) -> DeviceInfo {
    DeviceInfo {
        id,
        kind,
        pci_path,
        bdf: None,
        port,
        hotplugged: true,
        path: None,
        readonly: None,
        serial: None,
        cid: None,
        socket: None,
        mac: None,
        tap: None,
        mtu: None,
        host_bdf: None,
        iommu_group: None,
        unassigned: Vec::new(),
        state: None,
        error: None,
    }
}

impl FakeVm {
    fn new() -> Self {
        let cold = DeviceInfo {
            id: "rootdisk".into(),
            kind: DeviceKind::Disk,
            pci_path: "00:02.0".into(),
            bdf: Some("00:02.0".into()),
            port: None,
            hotplugged: false,
            path: Some("/images/root.raw".into()),
            readonly: Some(false),
            serial: None,
            cid: None,
            socket: None,
            mac: None,
            tap: None,
            mtu: None,
            host_bdf: None,
            iommu_group: None,
            unassigned: Vec::new(),
            state: None,
            error: None,
        };
        FakeVm {
            info: VmInfo {
                state: VmState::Running,
                cpus: Some(2),
                memory: Some(512 << 20),
                devices: vec![cold],
                topology: vec![port("rp0", "00:04.0", 1), port("rp1", "00:05.0", 5)],
            },
            next_id: 0,
            vmm_shutdown_requested: false,
        }
    }

    fn place(
        &mut self,
        id: &str,
        port: Option<&str>,
        pci_path: Option<&str>,
    ) -> Result<(String, String), ApiError> {
        let nodes = &mut self.info.topology;
        let slot = match (port, pci_path) {
            (_, Some(p)) => nodes
                .iter_mut()
                .flat_map(|n| {
                    let id = n.id.clone();
                    n.slots.iter_mut().map(move |s| (id.clone(), s))
                })
                .find(|(_, s)| s.pci_path == p)
                .ok_or_else(|| ApiError::bad_request(format!("'{p}' is not a hot-plug slot")))?,
            (Some(port), None) => {
                let node = nodes
                    .iter_mut()
                    .find(|n| n.id == port)
                    .ok_or_else(|| ApiError::not_found(format!("no port '{port}'")))?;
                let name = node.id.clone();
                let s = node
                    .slots
                    .iter_mut()
                    .find(|s| s.device.is_none())
                    .ok_or_else(|| ApiError::conflict(format!("port '{port}' has no free slot")))?;
                (name, s)
            }
            (None, None) => nodes
                .iter_mut()
                .flat_map(|n| {
                    let id = n.id.clone();
                    n.slots.iter_mut().map(move |s| (id.clone(), s))
                })
                .find(|(_, s)| s.device.is_none())
                .ok_or_else(|| ApiError::conflict("no free hot-plug slot"))?,
        };
        let (port_id, slot) = slot;
        if let Some(other) = &slot.device {
            return Err(ApiError::conflict(format!(
                "slot {} is taken by '{other}'",
                slot.pci_path
            )));
        }
        slot.device = Some(id.to_string());
        Ok((port_id, slot.pci_path.clone()))
    }

    fn new_id(&mut self, kind: &str, given: &Option<String>) -> Result<String, ApiError> {
        let id = match given {
            Some(id) => id.clone(),
            None => {
                self.next_id += 1;
                format!("{kind}{}", self.next_id)
            }
        };
        if self.info.devices.iter().any(|d| d.id == id) {
            return Err(ApiError::conflict(format!("a device named '{id}' exists")));
        }
        Ok(id)
    }

    fn handle(&mut self, request: ApiRequest) -> ApiReply {
        match request {
            ApiRequest::VmmPing => Ok(ApiResponse::VmmPing(VmmPingResponse {
                version: FAKE_VERSION.into(),
            })),
            ApiRequest::VmInfo => Ok(ApiResponse::VmInfo(self.info.clone())),
            ApiRequest::VmPause => match self.info.state {
                VmState::Running => {
                    self.info.state = VmState::Paused;
                    Ok(ApiResponse::Empty)
                }
                _ => Err(ApiError::conflict("the VM is not running")),
            },
            ApiRequest::VmResume => match self.info.state {
                VmState::Paused => {
                    self.info.state = VmState::Running;
                    Ok(ApiResponse::Empty)
                }
                _ => Err(ApiError::conflict("the VM is not paused")),
            },
            ApiRequest::VmShutdown => match self.info.state {
                VmState::Shutdown => Err(ApiError::conflict("the VM is already shut down")),
                _ => {
                    self.info.state = VmState::Shutdown;
                    Ok(ApiResponse::Empty)
                }
            },
            ApiRequest::VmmShutdown => {
                self.vmm_shutdown_requested = true;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmCreate(_) | ApiRequest::VmBoot | ApiRequest::VmDelete => Err(
                ApiError::conflict(format!("the VM is {}", self.info.state.describe())),
            ),
            ApiRequest::VmAddDisk(d) => {
                if d.path == "/fail" {
                    return Err(ApiError::internal("cannot open /fail: I/O error"));
                }
                if d.path == "/wrong-answer" {
                    return Ok(ApiResponse::Empty);
                }
                let id = self.new_id("disk", &d.id)?;
                let (port, pci_path) = self.place(&id, d.port.as_deref(), d.pci_path.as_deref())?;
                self.info.devices.push(DeviceInfo {
                    path: Some(d.path),
                    readonly: Some(d.readonly),
                    serial: d.serial,
                    ..hotplugged_device(id.clone(), DeviceKind::Disk, pci_path.clone(), Some(port))
                });
                Ok(ApiResponse::DeviceAdded(AddDeviceResponse {
                    id,
                    pci_path,
                    ..Default::default()
                }))
            }
            ApiRequest::VmAddRng(r) => {
                let id = self.new_id("rng", &r.id)?;
                let (port, pci_path) = self.place(&id, r.port.as_deref(), r.pci_path.as_deref())?;
                self.info.devices.push(hotplugged_device(
                    id.clone(),
                    DeviceKind::Rng,
                    pci_path.clone(),
                    Some(port),
                ));
                Ok(ApiResponse::DeviceAdded(AddDeviceResponse {
                    id,
                    pci_path,
                    ..Default::default()
                }))
            }
            ApiRequest::VmAddVsock(v) => {
                if self
                    .info
                    .devices
                    .iter()
                    .any(|d| d.kind == DeviceKind::Vsock)
                {
                    return Err(ApiError::conflict("the VM has a vsock device already"));
                }
                let id = self.new_id("vsock", &v.id)?;
                let (port, pci_path) = self.place(&id, v.port.as_deref(), v.pci_path.as_deref())?;
                self.info.devices.push(DeviceInfo {
                    cid: Some(v.cid),
                    socket: Some(v.socket),
                    ..hotplugged_device(id.clone(), DeviceKind::Vsock, pci_path.clone(), Some(port))
                });
                Ok(ApiResponse::DeviceAdded(AddDeviceResponse {
                    id,
                    pci_path,
                    ..Default::default()
                }))
            }
            ApiRequest::VmAddDevice(d) => {
                // As the VMM without kernel VFIO would: a path that does not
                // name a PCI function is refused.
                let bdf = d
                    .path
                    .strip_prefix("/sys/bus/pci/devices/")
                    .filter(|b| b.len() == 12)
                    .ok_or_else(|| {
                        ApiError::bad_request(format!("'{}' does not name a PCI function", d.path))
                    })?
                    .to_string();
                let id = self.new_id("vfio", &d.id)?;
                let (port, pci_path) = self.place(&id, d.port.as_deref(), d.pci_path.as_deref())?;
                self.info.devices.push(DeviceInfo {
                    host_bdf: Some(bdf),
                    iommu_group: Some(7),
                    state: Some(api::types::DeviceState::Ok),
                    ..hotplugged_device(id.clone(), DeviceKind::Vfio, pci_path.clone(), Some(port))
                });
                Ok(ApiResponse::DeviceAdded(AddDeviceResponse {
                    id,
                    pci_path,
                    ..Default::default()
                }))
            }
            ApiRequest::VmAddUserDevice(u) => {
                let id = self.new_id("vfio-user", &u.id)?;
                let (port, pci_path) = self.place(&id, u.port.as_deref(), u.pci_path.as_deref())?;
                self.info.devices.push(DeviceInfo {
                    socket: Some(u.socket),
                    ..hotplugged_device(
                        id.clone(),
                        DeviceKind::VfioUser,
                        pci_path.clone(),
                        Some(port),
                    )
                });
                Ok(ApiResponse::DeviceAdded(AddDeviceResponse {
                    id,
                    pci_path,
                    ..Default::default()
                }))
            }
            ApiRequest::VmAddNet(n, fds) => {
                // The fake "tap" is whatever the passed descriptor reads.
                let tap = match (n.tap, n.fd) {
                    (Some(t), _) => t,
                    (None, Some(i)) => {
                        let fd = fds.take(i as usize).ok_or_else(|| {
                            ApiError::bad_request(format!("no descriptor {i} was passed"))
                        })?;
                        let mut text = String::new();
                        std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut text)
                            .map_err(|e| ApiError::bad_request(e.to_string()))?;
                        text
                    }
                    (None, None) => return Err(ApiError::bad_request("no tap")),
                };
                let id = self.new_id("net", &n.id)?;
                let (port, pci_path) = self.place(&id, n.port.as_deref(), n.pci_path.as_deref())?;
                self.info.devices.push(DeviceInfo {
                    mac: n.mac,
                    tap: Some(tap),
                    mtu: n.mtu,
                    ..hotplugged_device(id.clone(), DeviceKind::Net, pci_path.clone(), Some(port))
                });
                Ok(ApiResponse::DeviceAdded(AddDeviceResponse {
                    id,
                    pci_path,
                    ..Default::default()
                }))
            }
            ApiRequest::VmRemoveDevice(r) => {
                let pos = self
                    .info
                    .devices
                    .iter()
                    .position(|d| d.id == r.id)
                    .ok_or_else(|| ApiError::not_found(format!("no device '{}'", r.id)))?;
                self.info.devices.remove(pos);
                for node in &mut self.info.topology {
                    for slot in &mut node.slots {
                        if slot.device.as_deref() == Some(&r.id) {
                            slot.device = None;
                        }
                    }
                }
                Ok(ApiResponse::Empty)
            }
        }
    }
}

/// A running API server with the fake VMM behind it.
pub struct Fixture {
    pub dir: TempDir,
    pub socket: PathBuf,
    pub vm: Arc<Mutex<FakeVm>>,
    /// How many wake-ups the fake VMM consumed (EventFd counter total).
    pub wakes: Arc<AtomicU64>,
    server: Option<ApiServerHandle>,
    stop: Arc<AtomicBool>,
    wake: EventFd,
    vmm: Option<JoinHandle<()>>,
}

pub fn temp_dir() -> TempDir {
    TempDir::new_with_prefix("/tmp/arbor-api-test-").unwrap()
}

fn vmm_loop(
    rx: Receiver<ApiMessage>,
    wake: EventFd,
    vm: Arc<Mutex<FakeVm>>,
    wakes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    loop {
        // Block until the API thread (or the fixture, to stop us) wakes us.
        let n = wake.read().unwrap();
        wakes.fetch_add(n, Ordering::SeqCst);
        loop {
            match rx.try_recv() {
                Ok(ApiMessage { request, reply }) => {
                    let path = match &request {
                        ApiRequest::VmAddDisk(d) => d.path.clone(),
                        _ => String::new(),
                    };
                    match path.as_str() {
                        "/drop" => drop(reply),
                        "/slow" => {
                            std::thread::spawn(move || {
                                std::thread::sleep(SLOW_REPLY);
                                let _ = reply.send(Err(ApiError::conflict("slow and refused")));
                            });
                        }
                        _ => {
                            let answer = vm.lock().unwrap().handle(request);
                            let _ = reply.send(answer);
                        }
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
    }
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = temp_dir();
        let socket = dir.as_path().join("api.sock");
        Self::at(dir, socket)
    }

    pub fn at(dir: TempDir, socket: PathBuf) -> Fixture {
        let (tx, rx) = mpsc::channel();
        let wake = EventFd::new(0).unwrap();
        let server = start_server(&socket, tx, wake.try_clone().unwrap()).unwrap();
        let vm = Arc::new(Mutex::new(FakeVm::new()));
        let wakes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let vmm = {
            let (wake, vm, wakes, stop) = (
                wake.try_clone().unwrap(),
                vm.clone(),
                wakes.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || vmm_loop(rx, wake, vm, wakes, stop))
        };
        Fixture {
            dir,
            socket,
            vm,
            wakes,
            server: Some(server),
            stop,
            wake,
            vmm: Some(vmm),
        }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.socket).with_timeout(Duration::from_secs(20))
    }

    /// Stops the server (dropping its handle) and returns how long it took.
    pub fn stop_server(&mut self) -> Duration {
        let start = std::time::Instant::now();
        drop(self.server.take());
        start.elapsed()
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        drop(self.server.take());
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        if let Some(t) = self.vmm.take() {
            let _ = t.join();
        }
    }
}
