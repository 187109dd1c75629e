//! The embedding API: a cloneable [`VmmHandle`] that sends requests to a
//! running VM's event loop (the same channel the HTTP server uses), a
//! stream of [`VmEvent`]s (the same type as the API's event stream), and [`RunningVm`] to wait for the end.

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;

use api::types::{
    AddDeviceResponse, DiskConfig, NetConfig, RemoveDeviceRequest, RngConfig, VmInfo, VsockConfig,
};
use api::{ApiError, ApiMessage, ApiReply, ApiRequest, ApiResponse};
use vmm_sys_util::eventfd::EventFd;

use crate::{Error, ExitReason, Result};

pub use api::events::{StopReason, Subscription, VmEvent, VmEventKind};

/// Sends requests to a VM's event loop. Cheap to clone; usable from any
/// thread except the event loop's own.
#[derive(Clone)]
pub struct VmmHandle {
    sender: Sender<ApiMessage>,
    wake: Arc<EventFd>,
}

impl VmmHandle {
    pub(crate) fn new(sender: Sender<ApiMessage>, wake: Arc<EventFd>) -> Self {
        VmmHandle { sender, wake }
    }

    /// The request channel and a wake-up descriptor, for an API server.
    pub fn channel(&self) -> std::io::Result<(Sender<ApiMessage>, EventFd)> {
        Ok((self.sender.clone(), self.wake.try_clone()?))
    }

    /// Sends `request` and waits for the answer.
    pub fn request(&self, request: ApiRequest) -> ApiReply {
        let (msg, rx) = ApiMessage::new(request);
        self.sender
            .send(msg)
            .map_err(|_| ApiError::conflict("the VM is not running"))?;
        self.wake
            .write(1)
            .map_err(|e| ApiError::internal(format!("cannot wake the VMM: {e}")))?;
        rx.blocking_recv()
            .unwrap_or_else(|| Err(ApiError::conflict("the VM stopped before answering")))
    }

    fn expect_empty(&self, request: ApiRequest) -> std::result::Result<(), ApiError> {
        match self.request(request)? {
            ApiResponse::Empty => Ok(()),
            other => Err(ApiError::internal(format!("unexpected answer {other:?}"))),
        }
    }

    fn expect_added(
        &self,
        request: ApiRequest,
    ) -> std::result::Result<AddDeviceResponse, ApiError> {
        match self.request(request)? {
            ApiResponse::DeviceAdded(a) => Ok(a),
            other => Err(ApiError::internal(format!("unexpected answer {other:?}"))),
        }
    }

    /// The VM's state, devices and topology.
    pub fn info(&self) -> std::result::Result<VmInfo, ApiError> {
        match self.request(ApiRequest::VmInfo)? {
            ApiResponse::VmInfo(i) => Ok(i),
            other => Err(ApiError::internal(format!("unexpected answer {other:?}"))),
        }
    }

    /// Hot-plugs a disk; answers its id and PCI path.
    pub fn add_disk(&self, cfg: DiskConfig) -> std::result::Result<AddDeviceResponse, ApiError> {
        self.expect_added(ApiRequest::VmAddDisk(cfg))
    }

    /// Hot-plugs an entropy device.
    pub fn add_rng(&self, cfg: RngConfig) -> std::result::Result<AddDeviceResponse, ApiError> {
        self.expect_added(ApiRequest::VmAddRng(cfg))
    }

    /// Hot-plugs the vsock device (one per VM).
    pub fn add_vsock(&self, cfg: VsockConfig) -> std::result::Result<AddDeviceResponse, ApiError> {
        self.expect_added(ApiRequest::VmAddVsock(cfg))
    }

    /// Hot-plugs the function a vfio-user server serves.
    pub fn add_user_device(
        &self,
        cfg: api::types::UserDeviceConfig,
    ) -> std::result::Result<AddDeviceResponse, ApiError> {
        self.expect_added(ApiRequest::VmAddUserDevice(cfg))
    }

    /// Hot-plugs a NIC. `fds` are the descriptors `cfg.fd` indexes (an
    /// embedder's `SCM_RIGHTS`); a tap by name needs none.
    pub fn add_net(
        &self,
        cfg: NetConfig,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> std::result::Result<AddDeviceResponse, ApiError> {
        self.expect_added(ApiRequest::VmAddNet(
            cfg,
            api::fd_passing::PassedFds::new(fds),
        ))
    }

    /// Hot-plugs a host PCI function bound to vfio-pci (kernel VFIO).
    pub fn add_device(
        &self,
        cfg: api::types::DeviceConfig,
    ) -> std::result::Result<AddDeviceResponse, ApiError> {
        self.expect_added(ApiRequest::VmAddDevice(cfg))
    }

    /// Hot-unplugs a device; returns once the guest released it.
    pub fn remove_device(&self, id: &str) -> std::result::Result<(), ApiError> {
        self.expect_empty(ApiRequest::VmRemoveDevice(RemoveDeviceRequest {
            id: id.to_string(),
        }))
    }

    /// Pauses the vCPUs.
    pub fn pause(&self) -> std::result::Result<(), ApiError> {
        self.expect_empty(ApiRequest::VmPause)
    }

    /// Resumes the vCPUs.
    pub fn resume(&self) -> std::result::Result<(), ApiError> {
        self.expect_empty(ApiRequest::VmResume)
    }

    /// Presses the ACPI power button; the VM stops when the guest powers
    /// off or when the grace period ends.
    pub fn shutdown(&self) -> std::result::Result<(), ApiError> {
        self.expect_empty(ApiRequest::VmShutdown)
    }

    /// Stops the VM at once.
    pub fn stop(&self) -> std::result::Result<(), ApiError> {
        self.expect_empty(ApiRequest::VmmShutdown)
    }

    /// `vm.create`: builds a VM from the JSON of [`crate::VmConfig::to_json`]
    /// (served by a [`crate::Vmm`]); answers its `vm.info`.
    pub fn create(&self, config: serde_json::Value) -> std::result::Result<VmInfo, ApiError> {
        match self.request(ApiRequest::VmCreate(Box::new(config)))? {
            ApiResponse::VmInfo(i) => Ok(i),
            other => Err(ApiError::internal(format!("unexpected answer {other:?}"))),
        }
    }

    /// `vm.boot`: starts the created VM's vCPUs.
    pub fn boot(&self) -> std::result::Result<(), ApiError> {
        self.expect_empty(ApiRequest::VmBoot)
    }

    /// `vm.delete`: tears a created or stopped VM down.
    pub fn delete(&self) -> std::result::Result<(), ApiError> {
        self.expect_empty(ApiRequest::VmDelete)
    }
}

/// A VM running on its own thread.
pub struct RunningVm {
    pub(crate) thread: JoinHandle<Result<ExitReason>>,
    pub(crate) handle: VmmHandle,
}

impl RunningVm {
    /// A handle to send requests.
    pub fn handle(&self) -> VmmHandle {
        self.handle.clone()
    }

    /// Waits until the VM stops.
    pub fn wait(self) -> Result<ExitReason> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err(Error::Guest("the VMM thread panicked".into())))
    }
}
