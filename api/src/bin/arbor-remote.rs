//! `arbor-remote`: command-line client for a running Arbor VMM.
//!
//! ```text
//! arbor-remote --api-socket PATH <command> [key=value,...]
//! ```
//!
//! Options may be given as one comma-separated argument or spread over
//! several arguments (`add-disk path=/a.raw readonly=on`). A successful JSON
//! answer is printed pretty on stdout; an empty one (204) prints nothing.
//! An error answer's body is printed on stderr.
//!
//! Exit status: 0 success, 1 the VMM answered with an error, 2 usage error,
//! 3 the VMM could not be reached or its answer could not be read.

use std::path::PathBuf;
use std::process::ExitCode;

use api::client::{Client, ClientError};
use api::kv::{self, KvError};
use api::types::{DiskConfig, NetConfig, RemoveDeviceRequest, RngConfig, VsockConfig};
use api::Endpoint;

const EXIT_API_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_CONNECTION: u8 = 3;

const USAGE: &str = "\
Usage: arbor-remote --api-socket PATH <command> [key=value,...]

Commands:
  ping                       check the VMM answers; prints its version
  info                       print the VM's state, devices and PCI topology
  create FILE.json           create the VM from its whole configuration (the JSON
                             `arbor ... --print-config` prints); prints its info
  boot                       boot the created VM
  delete                     tear a created or shut-down VM down
  events                     follow the event stream: one JSON event per line,
                             until the VMM exits
  add-disk path=FILE[,readonly=on|off][,id=ID][,serial=SERIAL][,port=PORT][,pci_path=PATH][,function=F][,lock=on|off]
                             hot-plug a virtio-blk disk (a bare first value is the path;
                             a relative path is made absolute from this directory)
  add-rng [id=ID][,port=PORT][,pci_path=PATH][,function=F]
                             hot-plug a virtio-rng device
  add-net tap=NAME|fd=N[,mac=MAC][,mtu=N][,id=ID][,port=PORT][,pci_path=PATH][,function=F]
                             hot-plug a virtio-net NIC on an existing tap, by name or
                             as this program's open descriptor N (passed to the VMM
                             with SCM_RIGHTS)
  remove-device ID | id=ID   hot-unplug a device (function 0 of a multifunction
                             slot: the whole slot)
  add-device path=/sys/bus/pci/devices/DDDD:BB:DD.F[,id=ID][,port=PORT][,pci_path=PATH][,function=F][,assigned=BDF+BDF][,unassigned=BDF+BDF]
                             hot-plug a host PCI device bound to vfio-pci (kernel
                             VFIO; a bare first value is the path): all its functions
                             and its IOMMU groups' endpoints but those unassigned
  add-user-device socket=PATH[,id=ID][,port=PORT][,pci_path=PATH][,function=F]
                             hot-plug the PCI function a vfio-user server serves on
                             its UNIX socket (a bare first value is the socket; a
                             relative path is made absolute from this directory)
  pause                      pause the VM's vCPUs
  resume                     resume the VM's vCPUs
  shutdown                   shut the VM down
  shutdown-vmm               stop the VMM process
  add-vsock cid=N,socket=PATH[,id=ID][,port=PORT][,pci_path=PATH][,function=F]
                             hot-plug the VM's virtio-vsock device (one per VM; a
                             relative socket path is made absolute from this directory)

Options may be one comma-separated argument or several arguments. Quote a
value containing commas: path=\"/images/a,b.raw\".

Exit status: 0 success; 1 the VMM answered with an error (its JSON error
body is printed on stderr); 2 usage error; 3 the VMM could not be reached
or its answer could not be read.
";

/// A parsed command line.
struct Invocation {
    socket: PathBuf,
    endpoint: Endpoint,
    body: Option<Vec<u8>>,
    /// Descriptors passed with the request (`add-net fd=N`).
    fds: Vec<std::os::fd::OwnedFd>,
}

enum Parsed {
    Run(Invocation),
    Help,
    Version,
}

fn usage_error(msg: impl std::fmt::Display) -> String {
    msg.to_string()
}

fn kv_error(command: &str, e: KvError) -> String {
    format!("{command}: {e}")
}

/// A duplicate of this process's open descriptor `n`.
fn own_fd(n: i32) -> Result<std::os::fd::OwnedFd, String> {
    use std::os::fd::BorrowedFd;
    // SAFETY: F_GETFD only checks that `n` is open; no memory is passed.
    if n < 0 || unsafe { libc::fcntl(n, libc::F_GETFD) } < 0 {
        return Err(usage_error(format!(
            "add-net: fd={n} is not an open descriptor"
        )));
    }
    // SAFETY: `n` is open (checked above) and stays open while borrowed here.
    let fd = unsafe { BorrowedFd::borrow_raw(n) };
    fd.try_clone_to_owned()
        .map_err(|e| usage_error(format!("add-net: cannot duplicate fd={n}: {e}")))
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec(value).map_err(|e| format!("cannot encode the request: {e}"))
}

fn parse_args(args: Vec<String>) -> Result<Parsed, String> {
    let mut socket: Option<PathBuf> = None;
    let mut command: Option<String> = None;
    let mut options: Vec<String> = Vec::new();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        if command.is_none() {
            match arg.as_str() {
                "-h" | "--help" | "help" => return Ok(Parsed::Help),
                "-V" | "--version" => return Ok(Parsed::Version),
                _ => {}
            }
        }
        if arg == "--api-socket" {
            let value = it
                .next()
                .ok_or_else(|| usage_error("--api-socket needs a path"))?;
            if socket.replace(PathBuf::from(value)).is_some() {
                return Err(usage_error("--api-socket is given more than once"));
            }
        } else if let Some(value) = arg.strip_prefix("--api-socket=") {
            if socket.replace(PathBuf::from(value)).is_some() {
                return Err(usage_error("--api-socket is given more than once"));
            }
        } else if command.is_none() {
            if arg.starts_with('-') {
                return Err(usage_error(format!("unknown option '{arg}'")));
            }
            command = Some(arg);
        } else {
            options.push(arg);
        }
    }
    let socket = socket.ok_or_else(|| usage_error("--api-socket PATH is required"))?;
    let command = command.ok_or_else(|| usage_error("no command given"))?;
    let opts = options.join(",");
    let no_options = |endpoint: Endpoint| {
        if options.is_empty() {
            Ok((endpoint, None))
        } else {
            Err(usage_error(format!("{command} takes no options")))
        }
    };
    let mut fds = Vec::new();
    let (endpoint, body) = match command.as_str() {
        "ping" => no_options(Endpoint::VmmPing)?,
        "info" => no_options(Endpoint::VmInfo)?,
        "pause" => no_options(Endpoint::VmPause)?,
        "resume" => no_options(Endpoint::VmResume)?,
        "shutdown" => no_options(Endpoint::VmShutdown)?,
        "shutdown-vmm" => no_options(Endpoint::VmmShutdown)?,
        "boot" => no_options(Endpoint::VmBoot)?,
        "delete" => no_options(Endpoint::VmDelete)?,
        "events" => no_options(Endpoint::VmEvents)?,
        "create" => {
            let [file] = options.as_slice() else {
                return Err(usage_error(
                    "create takes one argument: the configuration file",
                ));
            };
            let text = std::fs::read(file)
                .map_err(|e| usage_error(format!("cannot read '{file}': {e}")))?;
            let value: serde_json::Value = serde_json::from_slice(&text)
                .map_err(|e| usage_error(format!("'{file}' is not JSON: {e}")))?;
            (Endpoint::VmCreate, Some(to_json(&value)?))
        }
        "add-disk" => {
            let mut config = DiskConfig::from_kv(&opts).map_err(|e| kv_error(&command, e))?;
            // The VMM refuses relative paths (its working directory is not
            // ours): name the file the user means.
            if !config.path.is_empty() && !config.path.starts_with('/') {
                let abs = std::path::absolute(&config.path).map_err(|e| {
                    usage_error(format!("cannot make '{}' absolute: {e}", config.path))
                })?;
                config.path = abs
                    .to_str()
                    .ok_or_else(|| usage_error(format!("'{}' is not UTF-8", abs.display())))?
                    .to_string();
            }
            (Endpoint::VmAddDisk, Some(to_json(&config)?))
        }
        "add-rng" => {
            let config = RngConfig::from_kv(&opts).map_err(|e| kv_error(&command, e))?;
            (Endpoint::VmAddRng, Some(to_json(&config)?))
        }
        "add-net" => {
            let mut config = NetConfig::from_kv(&opts).map_err(|e| kv_error(&command, e))?;
            if let Some(n) = config.fd {
                // Our descriptor N goes along with the request; the VMM
                // sees it as the first passed descriptor.
                fds.push(own_fd(n)?);
                config.fd = Some(0);
            }
            (Endpoint::VmAddNet, Some(to_json(&config)?))
        }
        "remove-device" => {
            let o = kv::parse_with_positional(&opts, &["id"], "id")
                .map_err(|e| kv_error(&command, e))?;
            let id = o.required("id").map_err(|e| kv_error(&command, e))?;
            let req = RemoveDeviceRequest { id: id.to_string() };
            (Endpoint::VmRemoveDevice, Some(to_json(&req)?))
        }
        "add-vsock" => {
            let mut config = VsockConfig::from_kv(&opts).map_err(|e| kv_error(&command, e))?;
            make_absolute(&mut config.socket)?;
            (Endpoint::VmAddVsock, Some(to_json(&config)?))
        }
        "add-device" => {
            let config =
                api::types::DeviceConfig::from_kv(&opts).map_err(|e| kv_error(&command, e))?;
            (Endpoint::VmAddDevice, Some(to_json(&config)?))
        }
        "add-user-device" => {
            let mut config =
                api::types::UserDeviceConfig::from_kv(&opts).map_err(|e| kv_error(&command, e))?;
            make_absolute(&mut config.socket)?;
            (Endpoint::VmAddUserDevice, Some(to_json(&config)?))
        }
        other => return Err(usage_error(format!("unknown command '{other}'"))),
    };
    Ok(Parsed::Run(Invocation {
        socket,
        endpoint,
        body,
        fds,
    }))
}

/// A socket path relative to this client's working directory, made
/// absolute (the VMM's working directory is not ours).
fn make_absolute(socket: &mut String) -> Result<(), String> {
    if !socket.is_empty() && !socket.starts_with('/') {
        let abs = std::path::absolute(&*socket)
            .map_err(|e| usage_error(format!("cannot make '{socket}' absolute: {e}")))?;
        *socket = abs
            .to_str()
            .ok_or_else(|| usage_error(format!("'{}' is not UTF-8", abs.display())))?
            .to_string();
    }
    Ok(())
}

fn print_json_or_text(body: &[u8], to_stderr: bool) {
    let text = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => serde_json::to_string_pretty(&v)
            .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned()),
        Err(_) => String::from_utf8_lossy(body).trim_end().to_string(),
    };
    if to_stderr {
        eprintln!("{text}");
    } else {
        println!("{text}");
    }
}

/// `events`: prints each event line as it comes, until the stream ends.
fn follow(client: &Client) -> ExitCode {
    use std::io::Write;
    let mut stream = match client.vm_events() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("arbor-remote: {e}");
            return ExitCode::from(match e {
                ClientError::Api { .. } => EXIT_API_ERROR,
                _ => EXIT_CONNECTION,
            });
        }
    };
    let mut out = std::io::stdout();
    loop {
        match stream.next_line() {
            Ok(Some(line)) => {
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return ExitCode::SUCCESS;
                }
            }
            Ok(None) => return ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("arbor-remote: the event stream broke: {e}");
                return ExitCode::from(EXIT_CONNECTION);
            }
        }
    }
}

/// The id in a `vm.remove-device` body.
fn removal_id(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<RemoveDeviceRequest>(body)
        .ok()
        .map(|r| r.id)
}

fn run(inv: Invocation) -> ExitCode {
    let client = Client::new(&inv.socket);
    if inv.endpoint == Endpoint::VmEvents {
        return follow(&client);
    }
    let removing = (inv.endpoint == Endpoint::VmRemoveDevice)
        .then(|| inv.body.as_deref().and_then(removal_id))
        .flatten();
    let started = std::time::Instant::now();
    let response = match client.request_with_fds(
        inv.endpoint.method(),
        inv.endpoint.path(),
        inv.body,
        inv.fds,
    ) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("arbor-remote: {e}");
            return ExitCode::from(match e {
                ClientError::Api { .. } => EXIT_API_ERROR,
                _ => EXIT_CONNECTION,
            });
        }
    };
    if response.is_success() {
        if !response.body.is_empty() {
            print_json_or_text(&response.body, false);
        }
        if let Some(id) = removing {
            // The VMM answers once the guest has released the device.
            println!(
                "removed {id}: the guest released it after {} ms",
                started.elapsed().as_millis()
            );
        }
        ExitCode::SUCCESS
    } else {
        if response.body.is_empty() {
            eprintln!("arbor-remote: HTTP status {}", response.status);
        } else {
            print_json_or_text(&response.body, true);
        }
        ExitCode::from(EXIT_API_ERROR)
    }
}

fn main() -> ExitCode {
    match parse_args(std::env::args().skip(1).collect()) {
        Ok(Parsed::Run(inv)) => run(inv),
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Parsed::Version) => {
            println!("arbor-remote {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("arbor-remote: {msg}");
            eprintln!("Run 'arbor-remote --help' for usage.");
            ExitCode::from(EXIT_USAGE)
        }
    }
}
