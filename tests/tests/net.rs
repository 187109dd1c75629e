//! virtio-net on taps with a real guest.
//!
//! Networking happens only inside network namespaces these tests create
//! (`ip netns add arbor-net-...`): the taps are created there (owned by
//! root, the user `arbor` runs as, since `arbor` drops `CAP_NET_ADMIN`),
//! get their addresses there, and `arbor` runs there (`ip netns exec`), as
//! do the host's pings. A [`Netns`] guard deletes the namespace (and its
//! taps) at the end, failed or not.
//!
//! Two boots:
//!
//! - a kernel-log guest (no user space) with a cold-plugged NIC configured
//!   by `ip=` on the kernel command line: 100 host pings, none lost; the
//!   bad-input list (missing tap, tap in use, bad MAC, MTU out of range, a
//!   descriptor that is not a tap, a descriptor index with none passed) is
//!   refused over the API with `vm.info` unchanged, and on the command
//!   line;
//! - a user-space guest: a NIC hot-plugged into a native root port, an
//!   ACPI bridge and the root bus, each on its own tap and subnet; the
//!   returned `pci_path` resolves in the guest (`arbor-guest wait-device`)
//!   to the function virtio-net bound, the guest configures the address
//!   (`ip addr add`) and the host pings it; removal, re-add with another
//!   MAC (the guest sees the new address), and a tap handed over as a
//!   descriptor with `SCM_RIGHTS` by `arbor-remote add-net fd=0`.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use api::client::Client;
use api::types::{DeviceInfo, NetConfig};
use api::ApiErrorKind;
use arbor_tests::{
    arbor_bin, guest_kit, kvm_available, wait_for_socket, Guest, Scratch, WITH_ACPI_BRIDGE,
};

/// One guest at a time from this file.
static ONE_GUEST: Mutex<()> = Mutex::new(());

/// A network namespace of this test, deleted on drop.
struct Netns {
    name: String,
}

fn run(cmd: &[&str]) -> Output {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("arbor-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "delete", &name]).output();
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `cmd` inside the namespace; panics unless it succeeds.
    fn exec(&self, cmd: &[&str]) -> Output {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(cmd);
        run(&v)
    }

    /// Creates tap `name` owned by root with `addr` (CIDR) on it, up.
    fn tap(&self, name: &str, addr: &str) {
        self.exec(&[
            "ip", "tuntap", "add", "dev", name, "mode", "tap", "user", "0",
        ]);
        self.exec(&["ip", "addr", "add", addr, "dev", name]);
        self.exec(&["ip", "link", "set", name, "up"]);
    }

    /// The prefix that runs a program inside the namespace.
    fn wrapper(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.name]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// `count` pings from the host side of the namespace; the summary line.
    fn ping(&self, addr: &str, count: u32, interval: &str) -> String {
        let mut v = vec!["ip", "netns", "exec", &self.name, "busybox", "ping"];
        let c = count.to_string();
        v.extend_from_slice(&["-c", &c, "-i", interval, "-W", "10", addr]);
        let out = Command::new(v[0]).args(&v[1..]).output().expect("ping");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Pings `addr` once a second until it answers; how long that took.
    /// The guest kernel configures its address (`ip=`) before it has
    /// finished booting; on a loaded emulated host the first answers have
    /// been seen to lag by seconds, so the no-loss counts start once the
    /// guest answers at all.
    fn wait_answer(&self, addr: &str) -> Duration {
        let t = Instant::now();
        loop {
            let out = Command::new("ip")
                .args([
                    "netns", "exec", &self.name, "busybox", "ping", "-c", "1", "-W", "1", addr,
                ])
                .output()
                .expect("ping");
            if out.status.success() {
                return t.elapsed();
            }
            assert!(
                t.elapsed() < arbor_tests::timeout(),
                "{addr} never answered a ping: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }

    /// Opens the existing tap `name` from inside the namespace (a thread
    /// that joins it with `setns`), as a runtime handing it over would.
    fn open_tap(&self, name: &str) -> OwnedFd {
        let ns_path = format!("/run/netns/{}", self.name);
        let name = name.to_string();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&ns_path).expect("open netns");
            // SAFETY: setns on a namespace descriptor we hold; it only
            // changes this thread's network namespace.
            let r =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            let tun = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .expect("open /dev/net/tun");
            // SAFETY: ifreq is plain data; all-zero is valid.
            let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
                *d = s as libc::c_char;
            }
            ifr.ifr_ifru.ifru_flags =
                (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
            // SAFETY: TUNSETIFF reads the valid ifreq.
            let r = unsafe {
                libc::ioctl(
                    std::os::fd::AsRawFd::as_raw_fd(&tun),
                    libc::TUNSETIFF,
                    &mut ifr,
                )
            };
            assert_eq!(r, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
            OwnedFd::from(tun)
        })
        .join()
        .expect("tap opener")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Taps are persistent: delete them with the namespace's links.
        if let Ok(out) = Command::new("ip")
            .args([
                "netns", "exec", &self.name, "ip", "-o", "link", "show", "type", "tun",
            ])
            .output()
        {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(dev) = line.split(':').nth(1) {
                    let dev = dev.trim().split('@').next().unwrap_or("");
                    let _ = Command::new("ip")
                        .args(["netns", "exec", &self.name, "ip", "link", "del", dev])
                        .output();
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}

fn assert_no_loss(summary: &str, count: u32) {
    let want = format!("{count} packets transmitted, {count} packets received, 0% packet loss");
    assert!(summary.contains(&want), "ping: {summary}");
}

fn net(tap: &str) -> NetConfig {
    NetConfig {
        tap: Some(tap.into()),
        ..Default::default()
    }
}

fn devices(c: &Client) -> Vec<DeviceInfo> {
    c.vm_info().expect("vm.info").devices
}

/// The value of the first `key=value` line of `out`.
fn kv<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
}

fn arbor_remote() -> PathBuf {
    arbor_bin().with_file_name("arbor-remote")
}

#[test]
fn cold_plugged_nic_answers_ping_and_bad_input_is_refused() {
    if !kvm_available() {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::new("net-cold");
    ns.tap("tapc0", "10.77.1.1/24");
    ns.tap("tapc1", "10.77.2.1/24");
    let s = Scratch::new("net-cold");
    let sock = s.path("api.sock");
    let sock_arg = sock.display().to_string();

    // The command line refuses a missing tap before booting anything.
    let kit = guest_kit();
    let mut base: Vec<String> = ns.wrapper();
    base.push(arbor_bin().display().to_string());
    for a in ["--kernel", &kit.vmlinux.display().to_string()] {
        base.push(a.to_string());
    }
    let cli = |extra: &[&str]| {
        let out = Command::new(&base[0])
            .args(&base[1..])
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = cli(&["--net", "tap=nosuch0"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("tap 'nosuch0' does not exist"), "{err}");
    let (code, err) = cli(&["--net", "fd=200"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("descriptor 200 is not open"), "{err}");
    let (code, err) = cli(&["--net", "tap=tapc0,mtu=70000"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("out of range"), "{err}");

    let g = Guest::boot_wrapped(
        "net-cold",
        &ns.wrapper(),
        1,
        "ip=10.77.1.2::10.77.1.1:255.255.255.0::eth0:off",
        &[
            "--net",
            "tap=tapc0,mac=52:54:00:12:34:56,id=nic0",
            "--api-socket",
            &sock_arg,
        ],
    );
    wait_for_socket(&sock);
    let c = Client::new(&sock).with_timeout(Duration::from_secs(60));
    let info = devices(&c);
    let nic = info
        .iter()
        .find(|d| d.id == "nic0")
        .expect("nic0 in vm.info");
    assert_eq!(nic.mac.as_deref(), Some("52:54:00:12:34:56"));
    assert_eq!(nic.tap.as_deref(), Some("tapc0"));
    assert_eq!(nic.mtu, Some(1500));
    g.wait_for("IP-Config: Complete");
    // The kernel configures the address before its boot ends: freeing and
    // write-protecting its init memory then holds the CPU for seconds here
    // (6 s measured), and the frames queued meanwhile are answered late.
    // Busybox's ping waits only about a second for the last answers, so
    // the no-loss count starts once init runs.
    g.wait_for("Run /init as init process");
    let first = ns.wait_answer("10.77.1.2");
    let t = Instant::now();
    let summary = ns.ping("10.77.1.2", 100, "0.05");
    assert_no_loss(&summary, 100);
    eprintln!(
        "cold-plugged NIC: first answer after {first:?}, then 100 pings in {:?}: {}",
        t.elapsed(),
        summary.trim()
    );

    // Bad input: a clear error each, and nothing changes.
    let before = devices(&c);
    let refused = |cfg: NetConfig, fds: Vec<OwnedFd>, kind: ApiErrorKind, msg: &str| {
        let e = c.vm_add_net(&cfg, fds).expect_err(msg);
        assert_eq!(e.api_error_kind(), Some(kind), "{cfg:?}: {e}");
        assert!(e.to_string().contains(msg), "{cfg:?}: {e}");
        assert_eq!(devices(&c), before, "{cfg:?} changed the VM");
    };
    refused(
        net("nosuch0"),
        vec![],
        ApiErrorKind::BadRequest,
        "does not exist",
    );
    refused(
        net("tapc0"),
        vec![],
        ApiErrorKind::Conflict,
        "already in use",
    );
    let mut bad_mac = net("tapc1");
    bad_mac.mac = Some("01:00:5e:00:00:01".into());
    refused(bad_mac, vec![], ApiErrorKind::BadRequest, "multicast");
    let mut bad_mac = net("tapc1");
    bad_mac.mac = Some("52:54:00:zz:00:01".into());
    refused(
        bad_mac,
        vec![],
        ApiErrorKind::BadRequest,
        "invalid MAC address",
    );
    let mut bad_mtu = net("tapc1");
    bad_mtu.mtu = Some(67);
    refused(bad_mtu, vec![], ApiErrorKind::BadRequest, "out of range");
    let by_fd = NetConfig {
        fd: Some(0),
        ..Default::default()
    };
    let devnull = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
    refused(
        by_fd.clone(),
        vec![devnull],
        ApiErrorKind::BadRequest,
        "is not a tap",
    );
    refused(
        by_fd,
        vec![],
        ApiErrorKind::BadRequest,
        "no descriptor 0 was passed",
    );
    // The refused taps are still free: tapc1 works afterwards.
    let added = c.vm_add_net(&net("tapc1"), vec![]).expect("add tapc1");
    assert_eq!(devices(&c).len(), before.len() + 1, "{added:?}");
    drop(g);
}

/// Hot-plugs a NIC on `tap` at (`port`, `pci_path`), waits for the guest's
/// driver, configures `addr` in the guest and pings `peer` from the host.
/// Returns the id and the guest's interface name.
#[allow(clippy::too_many_arguments)]
fn hotplug_and_ping(
    g: &Guest,
    c: &Client,
    ns: &Netns,
    what: &str,
    cfg: NetConfig,
    fds: Vec<OwnedFd>,
    guest_addr: &str,
    expect_mac: Option<&str>,
) -> (String, String) {
    let t = Instant::now();
    let added = c
        .vm_add_net(&cfg, fds)
        .unwrap_or_else(|e| panic!("{what}: add failed: {e}"));
    hotplugged_ping(
        g,
        c,
        ns,
        what,
        &added.id,
        &added.pci_path,
        t,
        guest_addr,
        expect_mac,
    )
}

#[allow(clippy::too_many_arguments)]
fn hotplugged_ping(
    g: &Guest,
    c: &Client,
    ns: &Netns,
    what: &str,
    id: &str,
    pci_path: &str,
    t: Instant,
    guest_addr: &str,
    expect_mac: Option<&str>,
) -> (String, String) {
    let (st, out) = g.run(&format!("arbor-guest wait-device {pci_path} 120"));
    assert_eq!(st, 0, "{what}: wait-device {pci_path}: {out}");
    let bound = t.elapsed();
    let bdf = kv(&out, "bdf").unwrap_or_else(|| panic!("{what}: no bdf in {out}"));
    assert_eq!(
        kv(&out, "virtio-driver"),
        Some("virtio_net"),
        "{what}: {out}"
    );
    let dev = devices(c)
        .into_iter()
        .find(|d| d.id == id)
        .expect("in vm.info");
    assert_eq!(dev.bdf.as_deref(), Some(bdf), "{what}");
    let mac = dev.mac.clone().expect("mac in vm.info");
    if let Some(m) = expect_mac {
        assert_eq!(mac, m, "{what}");
    }
    let (st, out) = g.run(&format!("ls /sys/bus/pci/devices/{bdf}/virtio*/net/"));
    assert_eq!(st, 0, "{what}: {out}");
    let ifname = out
        .split_whitespace()
        .find(|w| w.starts_with("eth"))
        .unwrap_or_else(|| panic!("{what}: no interface under {bdf}: {out}"))
        .to_string();
    let (st, addr) = g.run(&format!("cat /sys/class/net/{ifname}/address"));
    assert_eq!((st, addr.trim()), (0, mac.as_str()), "{what}: guest MAC");
    let (st, out) = g.run(&format!(
        "ip addr add {guest_addr}/24 dev {ifname} && ip link set {ifname} up"
    ));
    assert_eq!(st, 0, "{what}: {out}");
    let peer = guest_addr;
    let summary = ns.ping(peer, 5, "0.2");
    assert_no_loss(&summary, 5);
    eprintln!(
        "{what}: pci_path {pci_path} -> {bdf} {ifname} {mac}; driver bound {bound:?} after the \
         request, pinged at {:?}",
        t.elapsed()
    );
    (id.to_string(), ifname)
}

#[test]
fn hotplugged_nics_everywhere_and_a_passed_tap() {
    if !kvm_available() {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::new("net-hot");
    ns.tap("tapn", "10.77.11.1/24");
    ns.tap("tapa", "10.77.12.1/24");
    ns.tap("tapr", "10.77.13.1/24");
    ns.tap("tapf", "10.77.14.1/24");
    let s = Scratch::new("net-hot");
    let sock = s.path("api.sock");
    let sock_arg = sock.display().to_string();
    let g = Guest::boot_user_wrapped(
        "net-hot",
        &ns.wrapper(),
        1,
        "",
        &[
            &["--api-socket", &sock_arg, "--remove-timeout", "60"][..],
            &WITH_ACPI_BRIDGE,
        ]
        .concat(),
    );
    wait_for_socket(&sock);
    let c = Client::new(&sock).with_timeout(Duration::from_secs(120));
    g.wait_shell();

    let with = |tap: &str, port: Option<&str>, pci_path: Option<&str>| NetConfig {
        tap: Some(tap.into()),
        port: port.map(String::from),
        pci_path: pci_path.map(String::from),
        ..Default::default()
    };
    let places = [
        (
            "root port, native",
            with("tapn", Some("rp0"), None),
            "10.77.11.2",
        ),
        (
            "bridge, ACPI",
            with("tapa", Some("br0"), None),
            "10.77.12.2",
        ),
        (
            "root bus, ACPI",
            with("tapr", None, Some("1f")),
            "10.77.13.2",
        ),
    ];
    let mut ids = Vec::new();
    for (what, cfg, addr) in places {
        ids.push(hotplug_and_ping(&g, &c, &ns, what, cfg, vec![], addr, None));
    }

    // Removal: the interface leaves the guest, the tap is free again; the
    // re-added NIC (another MAC) works on the same tap and address.
    let (id, ifname) = &ids[0];
    let t = Instant::now();
    c.vm_remove_device(id).expect("remove");
    eprintln!("root port, native: removal took {:?}", t.elapsed());
    let (st, out) = g.run(&format!("test -e /sys/class/net/{ifname}; echo gone=$?"));
    assert_eq!(st, 0);
    assert_eq!(kv(&out, "gone"), Some("1"), "{ifname} still there: {out}");
    assert!(!devices(&c).iter().any(|d| &d.id == id));
    let mut again = with("tapn", Some("rp0"), None);
    again.mac = Some("52:54:00:aa:bb:02".into());
    again.id = Some("again".into());
    hotplug_and_ping(
        &g,
        &c,
        &ns,
        "root port, re-added",
        again,
        vec![],
        "10.77.11.2",
        Some("52:54:00:aa:bb:02"),
    );

    // A tap opened by the "runtime" and handed over as a descriptor:
    // arbor-remote passes its stdin (the tap) with SCM_RIGHTS.
    let tap = ns.open_tap("tapf");
    let t = Instant::now();
    let out = Command::new(arbor_remote())
        .arg("--api-socket")
        .arg(&sock)
        .args(["add-net", "fd=0,id=passed,mac=52:54:00:aa:bb:03,port=rp1"])
        .stdin(Stdio::from(tap))
        .output()
        .expect("arbor-remote");
    assert!(
        out.status.success(),
        "arbor-remote add-net fd=0: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let path = v["pci_path"].as_str().unwrap().to_string();
    let dev = devices(&c).into_iter().find(|d| d.id == "passed").unwrap();
    assert_eq!(dev.tap.as_deref(), Some("tapf"));
    hotplugged_ping(
        &g,
        &c,
        &ns,
        "passed descriptor",
        "passed",
        &path,
        t,
        "10.77.14.2",
        Some("52:54:00:aa:bb:03"),
    );
    // The VMM holds the only descriptor now: a second attach is refused.
    let e = c.vm_add_net(&net("tapf"), vec![]).unwrap_err();
    assert_eq!(e.api_error_kind(), Some(ApiErrorKind::Conflict), "{e}");
    // Guest-to-host traffic as well, through the passed tap. One request:
    // busybox ping paces further ones with a POSIX timer, which the test
    // kernel does not have (CONFIG_POSIX_TIMERS is off), so `-c 3` hangs.
    let (st, out) = g.run("ping -c 1 -W 10 10.77.14.1");
    assert_eq!(st, 0, "guest ping: {out}");
    assert!(out.contains("1 packets received"), "guest ping: {out}");

    // A tap deleted under an attached NIC (the runtime tore its network
    // down first): the guest's traffic on it is dropped, the VMM and the
    // other NICs carry on, and the NIC can still be removed.
    let (gone_id, gone_if) = &ids[1];
    ns.exec(&["ip", "link", "del", "tapa"]);
    // Busybox's ping times out with an interval timer, which the test
    // kernel lacks (no CONFIG_POSIX_TIMERS): it would wait forever for the
    // answer that cannot come, so the shell stops it.
    let (st, out) = g.run(&format!(
        "ping -c 1 -I {gone_if} 10.77.12.1 & sleep 3; kill $! 2>/dev/null; wait $!; echo status=$?"
    ));
    assert_eq!(st, 0, "{out}");
    assert_ne!(
        kv(&out, "status"),
        Some("0"),
        "ping through a deleted tap: {out}"
    );
    assert!(devices(&c).iter().any(|d| &d.id == gone_id));
    assert_no_loss(&ns.ping("10.77.14.2", 3, "0.2"), 3);
    c.vm_remove_device(gone_id)
        .expect("remove the NIC whose tap is gone");
    assert!(!devices(&c).iter().any(|d| &d.id == gone_id));
    g.wait_stderr("tap failed");
    drop(g);
}
