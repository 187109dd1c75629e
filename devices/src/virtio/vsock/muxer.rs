//! The vsock muxer: guest stream connections on one side, host UNIX sockets on the other.
//!
//! Host side (the Firecracker / Cloud Hypervisor convention):
//! - a host program connects to the device's listening socket `PATH`, writes
//!   `CONNECT <port>\n` and, once the guest accepted, reads `OK <host port>\n`; from then on
//!   the UNIX stream is the guest's port. Anything else than that line (at most
//!   [`HANDSHAKE_MAX`] bytes) closes the client; at most [`MAX_HANDSHAKES`] clients may be
//!   in that state at once.
//! - a guest connection to host port `P` (destination CID 2) is forwarded to the UNIX socket
//!   `PATH_P`; nobody listening there means RST.
//!
//! Each connection is keyed by (host port, guest port). Flow control follows virtio
//! 5.10.6.3: we advertise [`CONN_BUF_ALLOC`] bytes per connection, buffer what the host
//! reader has not taken yet (never more than that: a guest that sends beyond its credit is
//! reset) and send `CREDIT_UPDATE` as the reader drains; in the other direction we read a
//! UNIX socket only while the guest has credit for us (its `buf_alloc` minus what is in
//! flight) and an RX buffer to put it in, and drop the socket from the poll set otherwise,
//! so a guest that stops reading leaves the data in the host kernel's socket buffer.
//!
//! Everything in a guest packet is treated as hostile: wrong CIDs are dropped, unsupported
//! types and unknown connections get RST (from a bounded queue: a flood is dropped, not
//! buffered), credit arithmetic is wrapping and clamped, and at most [`MAX_CONNECTIONS`]
//! connections exist. The muxer does no virtqueue work itself: the device hands it TX
//! packets ([`Muxer::handle_tx`]) and asks it for RX packets ([`Muxer::fill_rx`]), which
//! keeps it testable with plain sockets.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::EventSet;

use super::packet::{op, shutdown, Header, HOST_CID, TYPE_STREAM};
use crate::guest_warn;

/// Receive buffer we advertise per connection (and the most we buffer for it).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Most simultaneous connections (both directions together).
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host clients that have connected but not yet sent their `CONNECT` line.
pub const MAX_HANDSHAKES: usize = 64;
/// Longest accepted `CONNECT <port>\n` line.
pub const HANDSHAKE_MAX: usize = 32;
/// Most queued RST replies to packets that match no connection (more are dropped).
pub const MAX_STRAY_RST: usize = MAX_CONNECTIONS + 256;
/// First host port handed out to host-initiated connections.
pub const EPHEMERAL_START: u32 = 1 << 30;
/// Epoll token of the listening socket.
pub const LISTENER_TOKEN: u64 = 0;
/// Connections accepted per listener event (level-triggered epoll brings us back).
const ACCEPTS_PER_EVENT: usize = 16;
/// Tokens are below this (the event worker reserves the rest).
const TOKEN_LIMIT: u64 = 1 << 32;

/// Where the muxer registers host file descriptors (the event worker's epoll).
pub trait FdRegistry {
    /// Start watching `fd` for `events`.
    fn add(&mut self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()>;
    /// Change the events watched on `fd`.
    fn modify(&mut self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()>;
    /// Stop watching `fd`.
    fn remove(&mut self, fd: RawFd) -> io::Result<()>;
}

/// (host port, guest port).
type ConnKey = (u32, u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's RESPONSE.
    Connecting,
    /// Data may flow.
    Established,
}

const P_REQUEST: u8 = 1;
const P_RESPONSE: u8 = 2;
const P_CREDIT: u8 = 4;
const P_SHUTDOWN: u8 = 8;

struct Conn {
    stream: UnixStream,
    token: u64,
    state: State,
    /// Control packets to send (P_*).
    pending: u8,
    /// In the RX queue.
    queued: bool,
    /// Events currently registered (empty: not in the poll set).
    registered: EventSet,
    /// Epoll said readable and we have not hit EAGAIN since.
    readable: bool,
    /// The host end hung up (no more polling needed).
    hup: bool,
    /// Read EOF from the host end.
    host_eof: bool,
    /// We told the guest we send no more (SHUTDOWN SEND).
    shut_sent: bool,
    /// We shut down the host socket's write side (the guest sends no more).
    wr_shut: bool,
    /// SHUTDOWN flags received from the guest.
    peer_shut: u32,
    /// Payload bytes sent to the guest.
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Guest payload not yet written to the host socket (at most CONN_BUF_ALLOC bytes).
    tx_buf: VecDeque<u8>,
    /// Guest payload bytes written to the host socket.
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    fwd_sent: u32,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, state: State) -> Self {
        Self {
            stream,
            token,
            state,
            pending: 0,
            queued: false,
            registered: EventSet::empty(),
            readable: false,
            hup: false,
            host_eof: false,
            shut_sent: false,
            wr_shut: false,
            peer_shut: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_buf: VecDeque::new(),
            fwd_cnt: 0,
            fwd_sent: 0,
        }
    }

    /// Bytes the guest can still take from us (clamped: a guest claiming to have consumed
    /// more than we sent has no credit).
    fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.host_eof
            && self.peer_shut & shutdown::RCV == 0
            && self.peer_credit() > 0
    }

    fn has_work(&self) -> bool {
        self.pending != 0 || self.can_send_data()
    }

    fn wanted_events(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.hup {
            return ev;
        }
        if self.state == State::Established
            && !self.readable
            && !self.host_eof
            && self.peer_shut & shutdown::RCV == 0
        {
            ev |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        ev
    }

    /// Write buffered guest data to the host socket. Err: the host end is gone.
    fn flush(&mut self) -> io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (a, _) = self.tx_buf.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.fwd_cnt.wrapping_sub(self.fwd_sent) >= CONN_BUF_ALLOC / 4 {
            self.pending |= P_CREDIT;
        }
        Ok(())
    }

    /// Both directions are finished: the guest sends no more and everything it sent reached
    /// the host socket; the host's data up to EOF went to the guest (or the guest receives no
    /// more). A host hang-up alone is not the end: what it wrote before is still delivered.
    fn finished(&self) -> bool {
        self.peer_shut & shutdown::SEND != 0
            && self.tx_buf.is_empty()
            && (self.shut_sent || self.peer_shut & shutdown::RCV != 0)
    }
}

struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

enum Owner {
    Handshake(Handshake),
    Conn(ConnKey),
}

/// Statistics for tests and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MuxerStats {
    /// Live connections.
    pub connections: usize,
    /// Host clients still in the `CONNECT` handshake.
    pub handshakes: usize,
    /// Queued RST replies.
    pub stray_rst: usize,
    /// Guest payload bytes buffered for slow host readers.
    pub buffered: usize,
}

/// The connection multiplexer of one vsock device.
pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    conns: HashMap<ConnKey, Conn>,
    owners: HashMap<u64, Owner>,
    rxq: VecDeque<ConnKey>,
    stray: VecDeque<Header>,
    next_token: u64,
    next_port: u32,
    max_conns: usize,
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let s = s.strip_suffix('\n')?;
    let s = s.strip_suffix('\r').unwrap_or(s);
    let port = s.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// `connect(2)` to a UNIX socket without blocking (a full backlog fails instead of stalling
/// the device thread).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the returned fd is checked and then owned by UnixStream.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket we own exclusively.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes, alive during the call.
    let r = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

impl Muxer {
    /// A muxer for a guest with CID `guest_cid`, accepting host clients on `listener` (bound
    /// at `path`, the prefix of the `PATH_P` sockets of guest-initiated connections).
    pub fn new(guest_cid: u64, path: PathBuf, listener: UnixListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self {
            guest_cid,
            path,
            listener,
            conns: HashMap::new(),
            owners: HashMap::new(),
            rxq: VecDeque::new(),
            stray: VecDeque::new(),
            next_token: LISTENER_TOKEN + 1,
            next_port: EPHEMERAL_START,
            max_conns: MAX_CONNECTIONS,
        })
    }

    /// Register the listening socket.
    pub fn start(&mut self, reg: &mut dyn FdRegistry) -> io::Result<()> {
        reg.add(self.listener.as_raw_fd(), EventSet::IN, LISTENER_TOKEN)
    }

    /// Counters.
    pub fn stats(&self) -> MuxerStats {
        MuxerStats {
            connections: self.conns.len(),
            handshakes: self.owners.len() - self.conns.len(),
            stray_rst: self.stray.len(),
            buffered: self.conns.values().map(|c| c.tx_buf.len()).sum(),
        }
    }

    /// Whether [`Muxer::fill_rx`] may have a packet.
    pub fn has_rx(&self) -> bool {
        !self.stray.is_empty() || !self.rxq.is_empty()
    }

    fn alloc_token(&mut self) -> u64 {
        loop {
            let t = self.next_token;
            self.next_token = if t + 1 >= TOKEN_LIMIT { 1 } else { t + 1 };
            if t != LISTENER_TOKEN && !self.owners.contains_key(&t) {
                return t;
            }
        }
    }

    fn reply_rst(&mut self, h: &Header) {
        if self.stray.len() >= MAX_STRAY_RST {
            return;
        }
        self.stray.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Default::default()
        });
    }

    fn rst_for(&self, key: ConnKey) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Default::default()
        }
    }

    /// Drop a connection and its host socket.
    fn remove(&mut self, key: ConnKey, reg: &mut dyn FdRegistry) -> Option<Conn> {
        let c = self.conns.remove(&key)?;
        if !c.registered.is_empty() {
            let _ = reg.remove(c.stream.as_raw_fd());
        }
        self.owners.remove(&c.token);
        Some(c)
    }

    /// Drop a connection and tell the guest with RST.
    fn kill(&mut self, key: ConnKey, reg: &mut dyn FdRegistry) {
        if self.remove(key, reg).is_some() && self.stray.len() < MAX_STRAY_RST {
            let rst = self.rst_for(key);
            self.stray.push_back(rst);
        }
    }

    /// Bring a connection's poll registration and RX queue membership up to date, and close
    /// it if both directions are done.
    fn update(&mut self, key: ConnKey, reg: &mut dyn FdRegistry) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.peer_shut & shutdown::SEND != 0 && c.tx_buf.is_empty() && !c.wr_shut {
            // The guest sends no more and the host reader has everything: pass the EOF on.
            let _ = c.stream.shutdown(Shutdown::Write);
            c.wr_shut = true;
        }
        if c.finished() {
            // Everything reached the host socket; closing it gives the reader EOF.
            let _ = c.stream.shutdown(Shutdown::Both);
            self.kill(key, reg);
            return;
        }
        let want = c.wanted_events();
        if want != c.registered {
            let fd = c.stream.as_raw_fd();
            let r = if want.is_empty() {
                reg.remove(fd)
            } else if c.registered.is_empty() {
                reg.add(fd, want, c.token)
            } else {
                reg.modify(fd, want, c.token)
            };
            if r.is_err() {
                self.kill(key, reg);
                return;
            }
            c.registered = want;
        }
        if !c.queued && c.has_work() {
            c.queued = true;
            self.rxq.push_back(key);
        }
    }

    /// A host file descriptor registered under `token` is ready.
    pub fn fd_event(&mut self, token: u64, events: EventSet, reg: &mut dyn FdRegistry) {
        if token == LISTENER_TOKEN {
            self.accept(reg);
            return;
        }
        match self.owners.get(&token) {
            Some(Owner::Handshake(_)) => self.handshake(token, reg),
            Some(Owner::Conn(key)) => {
                let key = *key;
                self.conn_event(key, events, reg)
            }
            None => {}
        }
    }

    fn accept(&mut self, reg: &mut dyn FdRegistry) {
        for _ in 0..ACCEPTS_PER_EVENT {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.owners.len() - self.conns.len() >= MAX_HANDSHAKES
                || stream.set_nonblocking(true).is_err()
            {
                continue; // dropped: the client sees EOF
            }
            let token = self.alloc_token();
            if reg.add(stream.as_raw_fd(), EventSet::IN, token).is_err() {
                continue;
            }
            self.owners.insert(
                token,
                Owner::Handshake(Handshake {
                    stream,
                    line: Vec::new(),
                }),
            );
        }
    }

    /// Read the `CONNECT <port>\n` line byte by byte (so nothing after it is consumed).
    fn handshake(&mut self, token: u64, reg: &mut dyn FdRegistry) {
        let Some(Owner::Handshake(hs)) = self.owners.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        let done = loop {
            match hs.stream.read(&mut byte) {
                Ok(0) => break None,
                Ok(_) => {
                    hs.line.push(byte[0]);
                    if byte[0] == b'\n' {
                        break parse_connect(&hs.line);
                    }
                    if hs.line.len() >= HANDSHAKE_MAX {
                        break None;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        let Some(Owner::Handshake(hs)) = self.owners.remove(&token) else {
            return;
        };
        let _ = reg.remove(hs.stream.as_raw_fd());
        let Some(port) = done else {
            log::info!("vsock: host client sent no valid CONNECT line; closed");
            return;
        };
        if self.conns.len() >= self.max_conns {
            log::warn!("vsock: {MAX_CONNECTIONS} connections open; host client refused");
            return;
        }
        let Some(local) = self.alloc_port(port) else {
            return;
        };
        let key = (local, port);
        let mut c = Conn::new(hs.stream, token, State::Connecting);
        c.pending = P_REQUEST;
        self.owners.insert(token, Owner::Conn(key));
        self.conns.insert(key, c);
        self.update(key, reg);
    }

    fn alloc_port(&mut self, guest_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_port;
            self.next_port = if p >= u32::MAX - 1 {
                EPHEMERAL_START
            } else {
                p + 1
            };
            if !self.conns.contains_key(&(p, guest_port)) {
                return Some(p);
            }
        }
        None
    }

    fn conn_event(&mut self, key: ConnKey, events: EventSet, reg: &mut dyn FdRegistry) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            c.hup = true;
            if c.state == State::Connecting {
                self.kill(key, reg);
                return;
            }
        }
        if events
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP)
        {
            c.readable = true;
        }
        if (events.contains(EventSet::OUT) || c.hup) && c.flush().is_err() {
            self.kill(key, reg);
            return;
        }
        self.update(key, reg);
    }

    /// Handle one packet the guest put on the TX queue (header already length-checked by
    /// [`Header::parse`]; `payload` holds its `len` bytes).
    pub fn handle_tx(&mut self, h: &Header, payload: &[u8], reg: &mut dyn FdRegistry) {
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            guest_warn!(
                "vsock: dropped packet from cid {} to cid {} (guest cid {})",
                h.src_cid,
                h.dst_cid,
                self.guest_cid
            );
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.type_ != TYPE_STREAM {
            if h.op != op::RST {
                self.reply_rst(h);
            }
            return;
        }
        if !self.conns.contains_key(&key) {
            match h.op {
                op::REQUEST => self.guest_connect(h, reg),
                op::RST => {}
                _ => self.reply_rst(h),
            }
            return;
        }
        self.conn_packet(key, h, payload, reg);
    }

    fn guest_connect(&mut self, h: &Header, reg: &mut dyn FdRegistry) {
        if self.conns.len() >= self.max_conns {
            guest_warn!("vsock: {MAX_CONNECTIONS} connections open; guest request refused");
            self.reply_rst(h);
            return;
        }
        let mut p = self.path.clone().into_os_string();
        p.push(format!("_{}", h.dst_port));
        let stream = match connect_nonblocking(Path::new(&p)) {
            Ok(s) => s,
            Err(_) => {
                self.reply_rst(h);
                return;
            }
        };
        let key = (h.dst_port, h.src_port);
        let token = self.alloc_token();
        let mut c = Conn::new(stream, token, State::Established);
        c.pending = P_RESPONSE;
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        self.owners.insert(token, Owner::Conn(key));
        self.conns.insert(key, c);
        self.update(key, reg);
    }

    fn conn_packet(&mut self, key: ConnKey, h: &Header, payload: &[u8], reg: &mut dyn FdRegistry) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        let ok = match h.op {
            op::RESPONSE if c.state == State::Connecting => {
                c.state = State::Established;
                let line = format!("OK {}\n", key.0);
                // A fresh socket's buffer holds a short line; a short write means trouble.
                matches!(c.stream.write(line.as_bytes()), Ok(n) if n == line.len())
            }
            op::RW if c.state == State::Established && c.peer_shut & shutdown::SEND == 0 => {
                if c.tx_buf.len() + payload.len() > CONN_BUF_ALLOC as usize {
                    guest_warn!("vsock: guest sent beyond its credit; connection reset");
                    false
                } else {
                    c.tx_buf.extend(payload);
                    c.flush().is_ok()
                }
            }
            op::CREDIT_UPDATE => true,
            op::CREDIT_REQUEST => {
                c.pending |= P_CREDIT;
                true
            }
            op::SHUTDOWN => {
                c.peer_shut |= h.flags & (shutdown::RCV | shutdown::SEND);
                true
            }
            op::RST => {
                self.remove(key, reg);
                return;
            }
            // Duplicate REQUEST, RESPONSE out of state, RW before RESPONSE or after
            // SHUTDOWN, unknown op.
            _ => false,
        };
        if ok {
            self.update(key, reg);
        } else {
            self.kill(key, reg);
        }
    }

    /// The next packet for the guest: header and, for RW, payload bytes written to the
    /// start of `buf` (at most `buf.len()`). `None`: nothing to send now.
    pub fn fill_rx(&mut self, buf: &mut [u8], reg: &mut dyn FdRegistry) -> Option<(Header, usize)> {
        if let Some(h) = self.stray.pop_front() {
            return Some((h, 0));
        }
        while let Some(key) = self.rxq.pop_front() {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.queued = false;
            if let Some(r) = self.conn_rx(key, buf, reg) {
                self.update(key, reg);
                return Some(r);
            }
            self.update(key, reg);
            if let Some(h) = self.stray.pop_front() {
                return Some((h, 0));
            }
        }
        None
    }

    fn conn_rx(
        &mut self,
        key: ConnKey,
        buf: &mut [u8],
        reg: &mut dyn FdRegistry,
    ) -> Option<(Header, usize)> {
        let guest_cid = self.guest_cid;
        let c = self.conns.get_mut(&key)?;
        let mut h = Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: key.0,
            dst_port: key.1,
            type_: TYPE_STREAM,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: c.fwd_cnt,
            ..Default::default()
        };
        let mut len = 0;
        if c.pending & P_REQUEST != 0 {
            c.pending &= !P_REQUEST;
            h.op = op::REQUEST;
        } else if c.pending & P_RESPONSE != 0 {
            c.pending &= !P_RESPONSE;
            h.op = op::RESPONSE;
        } else if c.can_send_data() && !buf.is_empty() {
            let want = buf.len().min(c.peer_credit() as usize);
            match c.stream.read(&mut buf[..want]) {
                Ok(0) => {
                    c.host_eof = true;
                    c.pending |= P_SHUTDOWN;
                    return None;
                }
                Ok(n) => {
                    c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
                    h.op = op::RW;
                    h.len = n as u32;
                    len = n;
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    c.readable = e.kind() == io::ErrorKind::Interrupted;
                    return None;
                }
                Err(_) => {
                    self.kill(key, reg);
                    return None;
                }
            }
        } else if c.pending & P_SHUTDOWN != 0 {
            c.pending &= !P_SHUTDOWN;
            c.shut_sent = true;
            h.op = op::SHUTDOWN;
            h.flags = shutdown::SEND;
        } else if c.pending & P_CREDIT != 0 {
            h.op = op::CREDIT_UPDATE;
        } else {
            return None;
        }
        // Every packet carries our credit.
        c.pending &= !P_CREDIT;
        c.fwd_sent = c.fwd_cnt;
        Some((h, len))
    }

    /// Close every connection (device reset). Host clients see EOF.
    pub fn shutdown_all(&mut self, reg: &mut dyn FdRegistry) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove(k, reg);
        }
        for (_, o) in self.owners.drain() {
            if let Owner::Handshake(hs) = o {
                let _ = reg.remove(hs.stream.as_raw_fd());
            }
        }
        self.rxq.clear();
        self.stray.clear();
    }
}

#[cfg(test)]
#[path = "muxer_tests.rs"]
mod tests;
