//! The VMM with or without a VM: the life cycle a runtime drives over the
//! API (`vm.create`, `vm.boot`, `vm.delete`), around [`Vm`].
//!
//! States: **not created** (no VM), **created** (`vm.create` built it,
//! nothing runs), **running** and **paused** (the VM's own event loop serves
//! requests), **shut down** (the guest powered off or rebooted, or
//! `vm.shutdown` stopped it; `vm.info` still describes it). `vm.delete`
//! takes a created or shut-down VM back to not created. A request the
//! state does not allow is answered 409 naming the state, and changes
//! nothing.
//!
//! One request channel serves the whole life of the process: this loop
//! reads it while no VM runs, the VM's event loop while one does.

use std::os::fd::AsRawFd;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

use api::events::{EventBus, VmEventKind};
use api::types::{VmInfo, VmState, VmmPingResponse};
use api::{ApiError, ApiMessage, ApiRequest, ApiResponse};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::handle::VmmHandle;
use crate::vm::{Link, SharedReceiver};
use crate::{Error, ExitReason, ProcessPolicy, Result, Vm, VmConfig};

/// The VMM process's side of the life cycle: a request channel, an event
/// bus, and at most one VM.
pub struct Vmm {
    tx: Sender<ApiMessage>,
    rx: SharedReceiver,
    wake: Arc<EventFd>,
    events: EventBus,
    vm: Option<Vm>,
    policy: ProcessPolicy,
}

impl Vmm {
    /// A VMM with no VM.
    pub fn new() -> Result<Vmm> {
        let (tx, rx) = channel();
        Ok(Vmm {
            tx,
            rx: Arc::new(Mutex::new(rx)),
            wake: Arc::new(EventFd::new(EFD_NONBLOCK).map_err(Error::EventLoop)?),
            events: EventBus::new(),
            vm: None,
            policy: ProcessPolicy::default(),
        })
    }

    /// What every configuration `vm.create` sends is held to (by default
    /// nothing: no seccomp, no path check, as for embedders).
    pub fn set_policy(&mut self, policy: ProcessPolicy) {
        self.policy = policy;
    }

    /// A handle for requests (what the API server and the signal thread use).
    pub fn handle(&self) -> VmmHandle {
        VmmHandle::new(self.tx.clone(), self.wake.clone())
    }

    /// The event bus: every event of every VM this VMM holds.
    pub fn events(&self) -> EventBus {
        self.events.clone()
    }

    /// The VM's state (`NotCreated` when there is none).
    pub fn state(&self) -> VmState {
        self.vm.as_ref().map_or(VmState::NotCreated, Vm::state)
    }

    /// `vm.info`.
    pub fn info(&self) -> VmInfo {
        match &self.vm {
            Some(vm) => vm.info(),
            None => VmInfo {
                state: VmState::NotCreated,
                cpus: None,
                memory: None,
                devices: Vec::new(),
                topology: Vec::new(),
            },
        }
    }

    /// Validates `config` and builds its VM (the command line's path and
    /// `vm.create`'s). Nothing is left behind on failure.
    pub fn create(&mut self, config: VmConfig) -> Result<VmInfo> {
        if self.vm.is_some() {
            return Err(Error::Guest(format!(
                "a VM exists (it is {})",
                self.state().describe()
            )));
        }
        let link = Link {
            tx: self.tx.clone(),
            rx: self.rx.clone(),
            wake: self.wake.clone(),
            events: self.events.clone(),
            refuse_after_stop: false,
        };
        let vm = Vm::build(config, link)?;
        let info = vm.info();
        self.vm = Some(vm);
        Ok(info)
    }

    /// Boots the created VM and runs it until it stops (the command line's
    /// path); requests are served meanwhile by the VM's event loop.
    pub fn run(&mut self) -> Result<ExitReason> {
        match self.vm.as_mut() {
            Some(vm) => vm.run(),
            None => Err(Error::Guest("no VM to boot".into())),
        }
    }

    /// Refuses whatever requests are still queued (before the process ends).
    pub fn refuse_queued(&self) {
        let rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        while let Ok(msg) = rx.try_recv() {
            let _ = msg
                .reply
                .send(Err(ApiError::conflict("the VMM is exiting")));
        }
    }

    /// Serves requests until `vmm.shutdown`: creates, boots, runs and
    /// deletes VMs as asked. Returns [`ExitReason::VmmShutdown`], or the
    /// error that ended the VMM.
    pub fn serve(&mut self) -> Result<ExitReason> {
        loop {
            loop {
                let next = self.rx.lock().unwrap_or_else(|e| e.into_inner()).try_recv();
                let Ok(msg) = next else {
                    break;
                };
                if let Some(end) = self.handle_request(msg) {
                    self.refuse_queued();
                    return end;
                }
            }
            self.wait_for_requests()?;
        }
    }

    /// Sleeps until the request channel's wake-up descriptor is written.
    fn wait_for_requests(&self) -> Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) reads and writes one pollfd we own, for a
        // descriptor that lives as long as `self`.
        let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::EventLoop(e));
            }
        }
        let _ = self.wake.read();
        Ok(())
    }

    /// Answers one request with no VM running; `Some` ends [`Vmm::serve`].
    fn handle_request(&mut self, msg: ApiMessage) -> Option<Result<ExitReason>> {
        let ApiMessage { request, reply } = msg;
        let state = self.state();
        match request {
            ApiRequest::VmmPing => {
                let _ = reply.send(Ok(ApiResponse::VmmPing(VmmPingResponse {
                    version: env!("CARGO_PKG_VERSION").to_string(),
                })));
            }
            ApiRequest::VmmShutdown => {
                let _ = reply.send(Ok(ApiResponse::Empty));
                return Some(Ok(ExitReason::VmmShutdown));
            }
            ApiRequest::VmInfo => {
                let _ = reply.send(Ok(ApiResponse::VmInfo(self.info())));
            }
            ApiRequest::VmCreate(json) if self.vm.is_none() => {
                log::info!("request vm.create");
                let answer = VmConfig::from_json(&json)
                    .and_then(|cfg| self.policy.admit(cfg))
                    .map_err(|e| ApiError::bad_request(e.to_string()))
                    .and_then(|cfg| {
                        self.create(cfg).map_err(|e| match e {
                            Error::Config(_) | Error::Boot(_) => {
                                ApiError::bad_request(e.to_string())
                            }
                            other => ApiError::internal(other.to_string()),
                        })
                    });
                let _ = reply.send(answer.map(ApiResponse::VmInfo));
            }
            ApiRequest::VmBoot if state == VmState::Created => {
                log::info!("request vm.boot");
                let vm = self.vm.as_mut()?;
                match vm.boot(reply) {
                    Ok(ExitReason::VmmShutdown) => return Some(Ok(ExitReason::VmmShutdown)),
                    Ok(reason) => log::info!("the VM stopped: {reason:?}"),
                    Err(e) => log::error!("the VM stopped: {e}"),
                }
            }
            ApiRequest::VmDelete if matches!(state, VmState::Created | VmState::Shutdown) => {
                log::info!("request vm.delete");
                // Dropping the VM stops nothing that runs (nothing does)
                // and frees its memory, devices and image locks.
                self.vm = None;
                self.events.emit(VmEventKind::Deleted);
                let _ = reply.send(Ok(ApiResponse::Empty));
            }
            request => match &self.vm {
                Some(vm) => vm.serve_request(ApiMessage { request, reply }),
                None => {
                    let _ = reply.send(Err(ApiError::conflict(format!(
                        "the VM is not created; {} needs a VM (vm.create first)",
                        request.name()
                    ))));
                }
            },
        }
        None
    }
}
