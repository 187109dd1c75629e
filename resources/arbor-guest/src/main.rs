//! `arbor-guest`: the program Arbor's test guest carries (in
//! `initramfs-user.cpio`). It does inside the guest what a sandbox runtime's
//! agent does with the answers of Arbor's API: turn a `pci_path` into the
//! device the guest sees, wait for its driver, and use the disk.
//!
//! ```text
//! arbor-guest resolve PCI_PATH              bdf=, sysfs=, driver=, block=, sectors= lines
//! arbor-guest wait-device PCI_PATH SECONDS  waits until the function is probed, then as resolve
//! arbor-guest blk-write DEV SEED BYTES      writes the pattern of SEED (O_DIRECT), fsyncs
//! arbor-guest blk-verify DEV SEED BYTES     reads back (O_DIRECT) and compares with the pattern
//! arbor-guest vsock-echo PORT               listens on vsock PORT, echoes every connection
//!                                           (one thread each) until killed
//! arbor-guest vsock-connect CID PORT BYTES [echo|send|recv]
//!                                           connects to CID:PORT; echo (default): sends BYTES
//!                                           of the pattern of seed PORT and reads the echo;
//!                                           send: sends them and reads until EOF; recv: sends
//!                                           nothing, reads until EOF. Prints sent=,
//!                                           sent_checksum=, received=, checksum=, ms=, mb_per_s=
//! arbor-guest bar-write PCI_PATH BAR OFFSET HEX
//!                                           writes the bytes HEX at OFFSET of memory BAR
//!                                           BAR through an mmap of its sysfs resourceN file
//! arbor-guest bar-read PCI_PATH BAR OFFSET LEN
//!                                           reads LEN bytes there, prints hex=
//! arbor-guest bar-time PCI_PATH BAR OFFSET COUNT
//!                                           COUNT 4-byte reads there, prints reads=, ns=,
//!                                           ns_per_read=
//! ```
//!
//! The BAR accesses are 4 bytes wide when the offset and length are
//! multiples of 4, else 1 byte wide; the function's memory decoding must be
//! on (a bound driver, or `echo 1 > .../enable`).
//!
//! Exit status: 0 success, 1 failure (message on stderr), 2 bad usage.
//! `BYTES` takes a `K` or `M` suffix and must be a multiple of 4096.
//!
//! Built statically (`-C target-feature=+crt-static`) by the guest kit for
//! the baseline x86-64 CPU: no instruction the emulated KVM of the
//! project's machines cannot run (see resources/guest-kit/README.md).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant};

use arbor_guest::{fill, Checksum, StreamChecksum};
use pci::path::resolve_sysfs;
use pci::PciPath;

const DEVICES: &str = "/sys/bus/pci/devices";
/// Bytes per O_DIRECT request.
const CHUNK: usize = 256 << 10;
/// O_DIRECT buffer alignment (covers 512- and 4096-byte logical blocks).
const ALIGN: usize = 4096;

const USAGE: &str = "usage: arbor-guest resolve PCI_PATH
       arbor-guest wait-device PCI_PATH SECONDS
       arbor-guest blk-write DEV SEED BYTES
       arbor-guest blk-verify DEV SEED BYTES
       arbor-guest vsock-echo PORT
       arbor-guest vsock-connect CID PORT BYTES [echo|send|recv]
       arbor-guest bar-write PCI_PATH BAR OFFSET HEX
       arbor-guest bar-read PCI_PATH BAR OFFSET LEN
       arbor-guest bar-time PCI_PATH BAR OFFSET COUNT";

enum Failure {
    Usage(String),
    Failed(String),
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match argv.as_slice() {
        ["resolve", path] => resolve(path),
        ["wait-device", path, secs] => wait_device(path, secs),
        ["blk-write", dev, seed, bytes] => blk(dev, seed, bytes, true),
        ["blk-verify", dev, seed, bytes] => blk(dev, seed, bytes, false),
        ["vsock-echo", port] => vsock_echo(port),
        ["vsock-connect", cid, port, bytes] => vsock_connect(cid, port, bytes, "echo"),
        ["vsock-connect", cid, port, bytes, mode] => vsock_connect(cid, port, bytes, mode),
        ["bar-write", path, bar, offset, hex] => bar_write(path, bar, offset, hex),
        ["bar-read", path, bar, offset, len] => bar_read(path, bar, offset, len),
        ["bar-time", path, bar, offset, count] => bar_time(path, bar, offset, count),
        _ => Err(Failure::Usage(USAGE.into())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("arbor-guest: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Failed(m)) => {
            eprintln!("arbor-guest: {m}");
            ExitCode::from(1)
        }
    }
}

fn parse_path(s: &str) -> Result<PciPath, Failure> {
    PciPath::from_str(s).map_err(|e| Failure::Usage(format!("bad PCI path '{s}': {e}")))
}

/// The name of the driver bound to the sysfs device `dir`, if any.
fn driver(dir: &Path) -> Option<String> {
    let link = fs::read_link(dir.join("driver")).ok()?;
    link.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// The virtio devices (`virtioN`) under the PCI function `dir`.
fn virtio_children(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("virtio"))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Prints what the guest has at `dir`: BDF, sysfs path, drivers, disks.
fn describe(dir: &Path) {
    let bdf = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    println!("bdf={bdf}");
    let real = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    println!("sysfs={}", real.display());
    println!("driver={}", driver(dir).unwrap_or_else(|| "-".into()));
    for v in virtio_children(dir) {
        if let Some(d) = driver(&v) {
            println!("virtio-driver={d}");
        }
        let Ok(rd) = fs::read_dir(v.join("block")) else {
            continue;
        };
        for e in rd.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            let sectors = fs::read_to_string(e.path().join("size")).unwrap_or_default();
            println!("block={name}");
            println!("sectors={}", sectors.trim());
        }
    }
}

fn resolve(path: &str) -> Result<(), Failure> {
    let p = parse_path(path)?;
    let dir = resolve_sysfs(&p, Path::new(DEVICES))
        .map_err(|e| Failure::Failed(format!("{path}: {e}")))?;
    describe(&dir);
    Ok(())
}

/// Whether `dir` has a non-empty subdirectory `sub`.
fn has_entries(dir: &Path, sub: &str) -> bool {
    fs::read_dir(dir.join(sub)).is_ok_and(|mut rd| rd.next().is_some())
}

/// Ready: the function exists and a driver is bound to it; for virtio-pci,
/// its virtio device exists with a driver bound, and for virtio_blk the
/// block device exists. (The kernel links `driver` before it calls the
/// driver's probe, so a bound driver alone does not mean probing is done.)
fn ready(p: &PciPath) -> Option<PathBuf> {
    let dir = resolve_sysfs(p, Path::new(DEVICES)).ok()?;
    let drv = driver(&dir)?;
    let children = virtio_children(&dir);
    if drv == "virtio-pci" && children.is_empty() {
        return None;
    }
    for v in children {
        if driver(&v)? == "virtio_blk" && !has_entries(&v, "block") {
            return None;
        }
    }
    Some(dir)
}

fn wait_device(path: &str, secs: &str) -> Result<(), Failure> {
    let p = parse_path(path)?;
    let secs: f64 = secs
        .parse()
        .map_err(|_| Failure::Usage(format!("bad timeout '{secs}' (seconds)")))?;
    let start = Instant::now();
    let limit = Duration::from_secs_f64(secs.max(0.0));
    loop {
        if let Some(dir) = ready(&p) {
            describe(&dir);
            println!("waited_ms={}", start.elapsed().as_millis());
            return Ok(());
        }
        if start.elapsed() >= limit {
            let why = match resolve_sysfs(&p, Path::new(DEVICES)) {
                Err(e) => e.to_string(),
                Ok(dir) => format!("{} has no driver bound", dir.display()),
            };
            return Err(Failure::Failed(format!(
                "{path} not ready after {secs} s: {why}"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn parse_bytes(s: &str) -> Result<u64, Failure> {
    let (num, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1u64 << 20),
        _ => (s, 1),
    };
    let n = num
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| Failure::Usage(format!("bad byte count '{s}'")))?;
    if n == 0 || n % ALIGN as u64 != 0 {
        return Err(Failure::Usage(format!(
            "byte count {n} must be a positive multiple of {ALIGN}"
        )));
    }
    Ok(n)
}

fn parse_seed(s: &str) -> Result<u64, Failure> {
    let r = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|_| Failure::Usage(format!("bad seed '{s}'")))
}

/// A buffer of `len` bytes aligned for O_DIRECT, inside `storage`.
fn aligned(storage: &mut Vec<u8>, len: usize) -> &mut [u8] {
    storage.resize(len + ALIGN, 0);
    let off = storage.as_ptr().align_offset(ALIGN);
    &mut storage[off..off + len]
}

fn blk(dev: &str, seed: &str, bytes: &str, write: bool) -> Result<(), Failure> {
    let seed = parse_seed(seed)?;
    let total = parse_bytes(bytes)?;
    let fail = |what: &str, e: std::io::Error| Failure::Failed(format!("{dev}: {what}: {e}"));
    let mut f: File = OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .map_err(|e| fail("open", e))?;
    let mut storage = Vec::new();
    let buf = aligned(&mut storage, CHUNK);
    let mut expect = vec![0u8; CHUNK];
    let mut sum = Checksum::default();
    let start = Instant::now();
    let mut done = 0u64;
    while done < total {
        let n = (total - done).min(CHUNK as u64) as usize;
        if write {
            fill(seed, done, &mut buf[..n]);
            f.write_all(&buf[..n])
                .map_err(|e| fail(&format!("write at {done}"), e))?;
            sum.update(&buf[..n]);
        } else {
            f.read_exact(&mut buf[..n])
                .map_err(|e| fail(&format!("read at {done}"), e))?;
            fill(seed, done, &mut expect[..n]);
            if buf[..n] != expect[..n] {
                let at = buf[..n]
                    .iter()
                    .zip(&expect[..n])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(Failure::Failed(format!(
                    "{dev}: mismatch at byte {} (seed {seed})",
                    done + at as u64
                )));
            }
            sum.update(&buf[..n]);
        }
        done += n as u64;
    }
    if write {
        f.sync_all().map_err(|e| fail("fsync", e))?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!("bytes={total}");
    println!("checksum={:#018x}", sum.value());
    println!("ms={}", (secs * 1000.0) as u64);
    println!(
        "mb_per_s={:.2}",
        total as f64 / (1 << 20) as f64 / secs.max(1e-9)
    );
    Ok(())
}

/// A vsock address (`sockaddr_vm`).
fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

/// A new vsock stream socket, owned as a `UnixStream` (whose read, write
/// and shutdown are the plain socket calls).
fn vsock_socket() -> std::io::Result<std::os::unix::net::UnixStream> {
    use std::os::unix::io::FromRawFd;
    // SAFETY: plain socket(2) call; the result is checked and then owned.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    Ok(unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) })
}

fn parse_u32(what: &str, s: &str) -> Result<u32, Failure> {
    s.parse()
        .map_err(|_| Failure::Usage(format!("bad {what} '{s}'")))
}

fn echo_conn(mut s: std::os::unix::net::UnixStream) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
}

fn vsock_echo(port: &str) -> Result<(), Failure> {
    use std::os::unix::io::{AsRawFd, FromRawFd};
    let port = parse_u32("port", port)?;
    let fail = |what: &str, e: std::io::Error| Failure::Failed(format!("vsock {what}: {e}"));
    let l = vsock_socket().map_err(|e| fail("socket", e))?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: `addr` is a valid sockaddr_vm that outlives the call.
    let r = unsafe {
        libc::bind(
            l.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(fail("bind", std::io::Error::last_os_error()));
    }
    // SAFETY: listen(2) on a socket we own.
    if unsafe { libc::listen(l.as_raw_fd(), 128) } < 0 {
        return Err(fail("listen", std::io::Error::last_os_error()));
    }
    println!("listening port={port}");
    let mut served = 0u64;
    loop {
        // SAFETY: accept4 on our listening socket; peer address not wanted.
        let fd = unsafe {
            libc::accept4(
                l.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(fail("accept", e));
        }
        // SAFETY: `fd` is a fresh connection nobody else owns.
        let s = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
        served += 1;
        let spawned = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || echo_conn(s));
        if let Err(e) = spawned {
            eprintln!("arbor-guest: connection {served}: no thread: {e}");
        }
    }
}

fn vsock_connect(cid: &str, port: &str, bytes: &str, mode: &str) -> Result<(), Failure> {
    use std::os::unix::io::AsRawFd;
    let cid = parse_u32("cid", cid)?;
    let port = parse_u32("port", port)?;
    let total = parse_bytes(bytes)?;
    let (send, expect_back) = match mode {
        "echo" => (true, true),
        "send" => (true, false),
        "recv" => (false, false),
        other => {
            return Err(Failure::Usage(format!(
                "bad mode '{other}' (echo, send or recv)"
            )))
        }
    };
    let fail = |what: &str, e: std::io::Error| Failure::Failed(format!("vsock {what}: {e}"));
    let s = vsock_socket().map_err(|e| fail("socket", e))?;
    let addr = vsock_addr(cid, port);
    let start = Instant::now();
    // SAFETY: `addr` is a valid sockaddr_vm that outlives the call.
    let r = unsafe {
        libc::connect(
            s.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(fail(
            &format!("connect to {cid}:{port}"),
            std::io::Error::last_os_error(),
        ));
    }
    let mut w = s.try_clone().map_err(|e| fail("dup", e))?;
    let seed = u64::from(port);
    let writer = std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(move || -> std::io::Result<u64> {
            let mut sum = Checksum::default();
            if send {
                let mut buf = vec![0u8; 64 << 10];
                let mut done = 0u64;
                while done < total {
                    let n = (total - done).min(buf.len() as u64) as usize;
                    fill(seed, done, &mut buf[..n]);
                    w.write_all(&buf[..n])?;
                    sum.update(&buf[..n]);
                    done += n as u64;
                }
            }
            w.shutdown(std::net::Shutdown::Write)?;
            Ok(sum.value())
        })
        .map_err(|e| fail("thread", e))?;
    let mut r = s;
    let mut got = StreamChecksum::default();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail("read", e)),
        }
    }
    let sent_sum = writer
        .join()
        .map_err(|_| Failure::Failed("writer thread panicked".into()))?
        .map_err(|e| fail("write", e))?;
    let secs = start.elapsed().as_secs_f64();
    let sent = if send { total } else { 0 };
    println!("sent={sent}");
    println!("sent_checksum={sent_sum:#018x}");
    println!("received={}", got.bytes());
    println!("checksum={:#018x}", got.value());
    println!("ms={}", (secs * 1000.0) as u64);
    let moved = sent.max(got.bytes());
    println!(
        "mb_per_s={:.2}",
        moved as f64 / (1 << 20) as f64 / secs.max(1e-9)
    );
    if expect_back && (got.bytes() != total || got.value() != sent_sum) {
        return Err(Failure::Failed(format!(
            "echo differs: sent {total} bytes, got {} back",
            got.bytes()
        )));
    }
    Ok(())
}

/// Memory BAR `bar` of the function at PCI path `path`, mmap-ed through its
/// sysfs `resourceN` file (shared, read/write); unmapped on drop.
struct BarMap {
    addr: *mut u8,
    len: usize,
}

impl BarMap {
    fn open(path: &str, bar: &str) -> Result<BarMap, Failure> {
        let p = parse_path(path)?;
        let bar: u8 = bar
            .parse()
            .ok()
            .filter(|b| *b < 6)
            .ok_or_else(|| Failure::Usage(format!("bad BAR '{bar}' (0-5)")))?;
        let dir = resolve_sysfs(&p, Path::new(DEVICES))
            .map_err(|e| Failure::Failed(format!("{path}: {e}")))?;
        let res = dir.join(format!("resource{bar}"));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open(&res)
            .map_err(|e| Failure::Failed(format!("{}: {e}", res.display())))?;
        let len = f
            .metadata()
            .map_err(|e| Failure::Failed(format!("{}: {e}", res.display())))?
            .len() as usize;
        if len == 0 {
            return Err(Failure::Failed(format!("{}: empty", res.display())));
        }
        // SAFETY: a new shared mapping of the BAR's resource file, `len`
        // bytes (its size); the result is checked and unmapped on drop.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(Failure::Failed(format!(
                "mmap {}: {}",
                res.display(),
                std::io::Error::last_os_error()
            )));
        }
        Ok(BarMap {
            addr: addr.cast(),
            len,
        })
    }

    /// Checks that `len` bytes at `offset` are inside the BAR; returns
    /// whether 4-byte accesses fit them.
    fn check(&self, offset: usize, len: usize) -> Result<bool, Failure> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(Failure::Failed(format!(
                "{len} bytes at {offset:#x} are outside the BAR ({:#x} bytes)",
                self.len
            )));
        }
        Ok(offset.is_multiple_of(4) && len.is_multiple_of(4))
    }

    fn write(&self, offset: usize, data: &[u8]) -> Result<(), Failure> {
        if self.check(offset, data.len())? {
            for (i, c) in data.chunks(4).enumerate() {
                let v = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                // SAFETY: inside the mapping (checked), 4-byte aligned.
                unsafe { std::ptr::write_volatile(self.addr.add(offset + 4 * i).cast::<u32>(), v) };
            }
        } else {
            for (i, b) in data.iter().enumerate() {
                // SAFETY: inside the mapping (checked).
                unsafe { std::ptr::write_volatile(self.addr.add(offset + i), *b) };
            }
        }
        Ok(())
    }

    fn read(&self, offset: usize, len: usize) -> Result<Vec<u8>, Failure> {
        let mut out = Vec::with_capacity(len);
        if self.check(offset, len)? {
            for i in 0..len / 4 {
                // SAFETY: inside the mapping (checked), 4-byte aligned.
                let v =
                    unsafe { std::ptr::read_volatile(self.addr.add(offset + 4 * i).cast::<u32>()) };
                out.extend_from_slice(&v.to_le_bytes());
            }
        } else {
            for i in 0..len {
                // SAFETY: inside the mapping (checked).
                out.push(unsafe { std::ptr::read_volatile(self.addr.add(offset + i)) });
            }
        }
        Ok(out)
    }
}

impl Drop for BarMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

fn parse_offset(s: &str) -> Result<usize, Failure> {
    let r = match s.strip_prefix("0x") {
        Some(hex) => usize::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|_| Failure::Usage(format!("bad number '{s}'")))
}

fn bar_write(path: &str, bar: &str, offset: &str, hex: &str) -> Result<(), Failure> {
    let offset = parse_offset(offset)?;
    if hex.is_empty() || !hex.len().is_multiple_of(2) {
        return Err(Failure::Usage(format!("bad hex bytes '{hex}'")));
    }
    let data = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("x"), 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| Failure::Usage(format!("bad hex bytes '{hex}'")))?;
    BarMap::open(path, bar)?.write(offset, &data)
}

fn bar_read(path: &str, bar: &str, offset: &str, len: &str) -> Result<(), Failure> {
    let offset = parse_offset(offset)?;
    let len = parse_offset(len)?;
    let data = BarMap::open(path, bar)?.read(offset, len)?;
    let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
    println!("hex={hex}");
    Ok(())
}

fn bar_time(path: &str, bar: &str, offset: &str, count: &str) -> Result<(), Failure> {
    let offset = parse_offset(offset)?;
    let count = parse_offset(count)?.max(1);
    let map = BarMap::open(path, bar)?;
    if !map.check(offset, 4)? {
        return Err(Failure::Usage(format!(
            "offset {offset:#x} is not 4-byte aligned"
        )));
    }
    // SAFETY: inside the mapping (checked), 4-byte aligned.
    let at = unsafe { map.addr.add(offset) }.cast::<u32>();
    let start = Instant::now();
    for _ in 0..count {
        // SAFETY: as above; the mapping lives as long as `map`.
        unsafe { std::ptr::read_volatile(at) };
    }
    let ns = start.elapsed().as_nanos();
    println!("reads={count}");
    println!("ns={ns}");
    println!("ns_per_read={:.2}", ns as f64 / count as f64);
    Ok(())
}
