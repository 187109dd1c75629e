//! Muxer tests with real UNIX sockets and a poll(2)-based stand-in for the event worker.

use super::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

const GUEST: u64 = 3;

/// Records registrations like an epoll set; `pump` polls them and dispatches events.
#[derive(Default)]
struct FakeReg {
    fds: BTreeMap<RawFd, (EventSet, u64)>,
}

impl FdRegistry for FakeReg {
    fn add(&mut self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
        assert!(self.fds.insert(fd, (events, token)).is_none(), "double add");
        Ok(())
    }
    fn modify(&mut self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
        assert!(
            self.fds.insert(fd, (events, token)).is_some(),
            "modify unknown"
        );
        Ok(())
    }
    fn remove(&mut self, fd: RawFd) -> io::Result<()> {
        self.fds.remove(&fd);
        Ok(())
    }
}

struct Env {
    dir: PathBuf,
    path: PathBuf,
    mux: Muxer,
    reg: FakeReg,
    /// How long `pump` waits for an event.
    poll_ms: i32,
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

impl Env {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "arbor-vsock-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let mut mux = Muxer::new(GUEST, path.clone(), listener).unwrap();
        let mut reg = FakeReg::default();
        mux.start(&mut reg).unwrap();
        Self {
            dir,
            path,
            mux,
            reg,
            poll_ms: 50,
        }
    }

    /// Dispatch every ready registered fd once; returns how many were ready.
    fn pump(&mut self) -> usize {
        let mut pfds: Vec<libc::pollfd> = self
            .reg
            .fds
            .iter()
            .map(|(fd, (ev, _))| libc::pollfd {
                fd: *fd,
                events: ev.bits() as i16,
                revents: 0,
            })
            .collect();
        // SAFETY: pfds is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, self.poll_ms) };
        assert!(n >= 0);
        let mut ready = 0;
        for p in pfds {
            if p.revents != 0 {
                if let Some((_, tok)) = self.reg.fds.get(&p.fd).copied() {
                    ready += 1;
                    let ev = EventSet::from_bits_truncate(p.revents as u32);
                    self.mux.fd_event(tok, ev, &mut self.reg);
                }
            }
        }
        ready
    }

    fn pump_until(&mut self, mut f: impl FnMut(&mut Self) -> bool) {
        for _ in 0..200 {
            if f(self) {
                return;
            }
            self.pump();
        }
        panic!("condition not reached");
    }

    fn rx(&mut self) -> Option<(Header, Vec<u8>)> {
        let mut buf = vec![0u8; 4096];
        let (h, n) = self.mux.fill_rx(&mut buf, &mut self.reg)?;
        assert_eq!(h.len as usize, n);
        buf.truncate(n);
        Some((h, buf))
    }

    /// All RX packets available now (and after pumping once).
    fn drain_rx(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        for _ in 0..3 {
            while let Some(p) = self.rx() {
                out.push(p);
            }
            self.pump();
        }
        out
    }

    fn tx(&mut self, h: Header, payload: &[u8]) {
        self.mux.handle_tx(&h, payload, &mut self.reg);
    }

    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut c = UnixStream::connect(&self.path).unwrap();
        c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let mut req = None;
        self.pump_until(|e| {
            req = e.rx();
            req.is_some()
        });
        let (h, _) = req.unwrap();
        assert_eq!(
            (h.op, h.dst_port, h.dst_cid, h.src_cid),
            (op::REQUEST, port, GUEST, 2)
        );
        self.tx(pkt(op::RESPONSE, port, h.src_port), &[]);
        let line = read_line(&mut c);
        assert_eq!(line, format!("OK {}\n", h.src_port));
        (c, h.src_port)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn read_line(c: &mut UnixStream) -> String {
    c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut s = Vec::new();
    let mut b = [0u8; 1];
    // A reset counts as closed (we close clients whose input we did not read).
    while matches!(c.read(&mut b), Ok(1)) {
        s.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(s).unwrap()
}

/// A guest packet from guest port `gport` to host port `hport`.
fn pkt(op: u16, gport: u32, hport: u32) -> Header {
    Header {
        src_cid: GUEST,
        dst_cid: HOST_CID,
        src_port: gport,
        dst_port: hport,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 1 << 20,
        ..Default::default()
    }
}

fn rw(gport: u32, hport: u32, n: usize) -> Header {
    Header {
        len: n as u32,
        ..pkt(op::RW, gport, hport)
    }
}

#[test]
fn parse_connect_lines() {
    assert_eq!(parse_connect(b"CONNECT 5000\n"), Some(5000));
    assert_eq!(parse_connect(b"CONNECT 5000\r\n"), Some(5000));
    assert_eq!(parse_connect(b"CONNECT 4294967295\n"), Some(u32::MAX));
    for bad in [
        &b"CONNECT 4294967296\n"[..],
        b"CONNECT \n",
        b"CONNECT -1\n",
        b"CONNECT +1\n",
        b"connect 1\n",
        b"CONNECT 1",
        b"CONNECT 1 2\n",
        b"\xff\xfe\n",
    ] {
        assert_eq!(parse_connect(bad), None, "{bad:?}");
    }
}

#[test]
fn host_initiated_stream_both_ways_and_clean_shutdown() {
    let mut e = Env::new();
    let (mut c, hport) = e.host_connect(5000);
    assert_eq!(hport, EPHEMERAL_START);
    c.write_all(b"hello").unwrap();
    let mut got = None;
    e.pump_until(|e| {
        got = e.rx();
        got.is_some()
    });
    let (h, data) = got.unwrap();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RW, hport, 5000));
    assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);
    assert_eq!(data, b"hello");
    e.tx(rw(5000, hport, 5), b"world");
    let mut b = [0u8; 5];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"world");
    // Host half-closes: the guest gets SHUTDOWN(SEND).
    c.shutdown(Shutdown::Write).unwrap();
    let pkts = e.drain_rx();
    assert!(
        pkts.iter()
            .any(|(h, _)| h.op == op::SHUTDOWN && h.flags == shutdown::SEND),
        "{pkts:?}"
    );
    // The guest can still send; then it closes: RST and EOF for the host.
    e.tx(rw(5000, hport, 3), b"bye");
    e.tx(
        Header {
            flags: shutdown::RCV | shutdown::SEND,
            ..pkt(op::SHUTDOWN, 5000, hport)
        },
        &[],
    );
    let pkts = e.drain_rx();
    assert!(pkts.iter().any(|(h, _)| h.op == op::RST), "{pkts:?}");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
    assert_eq!(e.mux.stats().connections, 0);
}

#[test]
fn guest_initiated_connects_to_path_port() {
    let mut e = Env::new();
    let mut p = e.path.clone().into_os_string();
    p.push("_6000");
    let l = UnixListener::bind(&p).unwrap();
    e.tx(pkt(op::REQUEST, 1234, 6000), &[]);
    let (h, _) = e.rx().unwrap();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RESPONSE, 6000, 1234));
    let (mut s, _) = l.accept().unwrap();
    e.tx(rw(1234, 6000, 4), b"ping");
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    s.write_all(b"pong").unwrap();
    let mut got = None;
    e.pump_until(|e| {
        got = e.rx();
        got.is_some()
    });
    assert_eq!(got.unwrap().1, b"pong");
    // Host closes entirely: SHUTDOWN to the guest, then the guest's reply ends it.
    drop(s);
    let pkts = e.drain_rx();
    assert!(pkts.iter().any(|(h, _)| h.op == op::SHUTDOWN), "{pkts:?}");
    e.tx(
        Header {
            flags: 3,
            ..pkt(op::SHUTDOWN, 1234, 6000)
        },
        &[],
    );
    assert!(e.drain_rx().iter().any(|(h, _)| h.op == op::RST));
    assert_eq!(e.mux.stats().connections, 0);
    assert!(e.reg.fds.len() == 1, "only the listener stays registered");
}

#[test]
fn host_data_after_guest_half_close_is_delivered_before_rst() {
    let mut e = Env::new();
    let mut p = e.path.clone().into_os_string();
    p.push("_6100");
    let l = UnixListener::bind(&p).unwrap();
    e.tx(pkt(op::REQUEST, 77, 6100), &[]);
    assert_eq!(e.rx().unwrap().0.op, op::RESPONSE);
    let (mut s, _) = l.accept().unwrap();
    // The guest sends nothing and half-closes at once (vsock-connect recv).
    e.tx(
        Header {
            flags: shutdown::SEND,
            ..pkt(op::SHUTDOWN, 77, 6100)
        },
        &[],
    );
    // The host writes, then closes entirely (hang-up).
    s.write_all(&[5u8; 3000]).unwrap();
    drop(s);
    let pkts = e.drain_rx();
    let data: u32 = pkts
        .iter()
        .filter(|(h, _)| h.op == op::RW)
        .map(|(h, _)| h.len)
        .sum();
    assert_eq!(data, 3000, "{pkts:?}");
    let ops: Vec<u16> = pkts.iter().map(|(h, _)| h.op).collect();
    let sd = ops.iter().position(|&o| o == op::SHUTDOWN).unwrap();
    let rst = ops.iter().position(|&o| o == op::RST).unwrap();
    assert!(
        sd < rst && ops[..sd].iter().all(|&o| o == op::RW),
        "{ops:?}"
    );
    assert_eq!(e.mux.stats().connections, 0);
}

#[test]
fn nobody_listening_gets_rst_both_ways() {
    let mut e = Env::new();
    // Guest to a host port without a PATH_P socket.
    e.tx(pkt(op::REQUEST, 1, 7777), &[]);
    let (h, _) = e.rx().unwrap();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RST, 7777, 1));
    // A stale file at PATH_P that is not a listening socket.
    let mut p = e.path.clone().into_os_string();
    p.push("_7778");
    std::fs::write(&p, b"x").unwrap();
    e.tx(pkt(op::REQUEST, 1, 7778), &[]);
    assert_eq!(e.rx().unwrap().0.op, op::RST);
    // Host to a guest port without listener: the guest answers RST, the host sees EOF.
    let mut c = UnixStream::connect(&e.path).unwrap();
    c.write_all(b"CONNECT 9\n").unwrap();
    let mut req = None;
    e.pump_until(|e| {
        req = e.rx();
        req.is_some()
    });
    let h = req.unwrap().0;
    e.tx(pkt(op::RST, 9, h.src_port), &[]);
    assert_eq!(read_line(&mut c), "");
    assert_eq!(e.mux.stats().connections, 0);
}

#[test]
fn garbage_instead_of_connect_is_dropped_others_continue() {
    let mut e = Env::new();
    let (mut good, hport) = e.host_connect(5000);
    let mut bad1 = UnixStream::connect(&e.path).unwrap();
    bad1.write_all(b"HELLO THERE\n").unwrap();
    let mut bad2 = UnixStream::connect(&e.path).unwrap();
    bad2.write_all(&[b'A'; 100]).unwrap();
    let mut bad3 = UnixStream::connect(&e.path).unwrap();
    bad3.write_all(b"CONNECT 99999999999\n").unwrap();
    for _ in 0..5 {
        e.pump();
    }
    for b in [&mut bad1, &mut bad2, &mut bad3] {
        assert_eq!(read_line(b), "", "garbage client closed");
    }
    assert_eq!(e.mux.stats().handshakes, 0);
    assert!(e.drain_rx().is_empty(), "no REQUEST for garbage");
    e.tx(rw(5000, hport, 2), b"ok");
    let mut b = [0u8; 2];
    good.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ok");
}

#[test]
fn handshakes_are_capped() {
    let mut e = Env::new();
    let clients: Vec<UnixStream> = (0..MAX_HANDSHAKES + 10)
        .map(|_| UnixStream::connect(&e.path).unwrap())
        .collect();
    for _ in 0..10 {
        e.pump();
    }
    assert_eq!(e.mux.stats().handshakes, MAX_HANDSHAKES);
    drop(clients);
    for _ in 0..5 {
        e.pump();
    }
    assert_eq!(e.mux.stats().handshakes, 0);
}

#[test]
fn hostile_packets_never_panic_or_grow_state() {
    let mut e = Env::new();
    let (_c, hport) = e.host_connect(5000);
    // Wrong source CID, wrong destination CID: dropped silently.
    e.tx(
        Header {
            src_cid: 77,
            ..rw(5000, hport, 0)
        },
        &[],
    );
    e.tx(
        Header {
            dst_cid: 5,
            ..pkt(op::REQUEST, 1, 2)
        },
        &[],
    );
    assert!(e.rx().is_none());
    assert_eq!(e.mux.stats().connections, 1);
    // Unsupported type (SEQPACKET = 2) and unknown ops on unknown connections: RST.
    e.tx(
        Header {
            type_: 2,
            ..pkt(op::REQUEST, 1, 2)
        },
        &[],
    );
    e.tx(pkt(0xffff, 1, 2), &[]);
    e.tx(rw(1, 2, 3), b"abc");
    assert_eq!(e.drain_rx().len(), 3);
    // A flood to unknown connections: the RST queue is bounded.
    for i in 0..(MAX_STRAY_RST as u32 + 5000) {
        e.tx(rw(i, 3, 0), &[]);
    }
    assert_eq!(e.mux.stats().stray_rst, MAX_STRAY_RST);
    while e.rx().is_some() {}
    // Credit values that overflow: no panic, no credit.
    e.tx(
        Header {
            buf_alloc: u32::MAX,
            fwd_cnt: 1,
            ..pkt(op::CREDIT_UPDATE, 5000, hport)
        },
        &[],
    );
    let c = e.mux.conns.get(&(hport, 5000)).unwrap();
    assert_eq!(
        c.peer_credit(),
        0,
        "fwd_cnt beyond what we sent means no credit"
    );
    e.tx(
        Header {
            buf_alloc: u32::MAX,
            fwd_cnt: u32::MAX,
            ..pkt(op::CREDIT_UPDATE, 5000, hport)
        },
        &[],
    );
    let c = e.mux.conns.get(&(hport, 5000)).unwrap();
    assert_eq!(
        c.peer_credit(),
        u32::MAX - 1,
        "wrapped: plausible, bounded per packet"
    );
    // Duplicate REQUEST and bogus op on a live connection: it is reset.
    e.tx(pkt(op::REQUEST, 5000, hport), &[]);
    assert_eq!(e.mux.stats().connections, 0);
    let pkts = e.drain_rx();
    assert!(pkts
        .iter()
        .any(|(h, _)| h.op == op::RST && h.dst_port == 5000));
}

#[test]
fn peer_credit_arithmetic_wraps() {
    let (a, _b) = UnixStream::pair().unwrap();
    let mut c = Conn::new(a, 1, State::Established);
    c.peer_buf_alloc = 100;
    c.rx_cnt = 5; // wrapped past u32::MAX
    c.peer_fwd_cnt = u32::MAX - 4; // 10 bytes in flight
    assert_eq!(c.peer_credit(), 90);
    c.peer_fwd_cnt = 6; // claims more than we sent
    assert_eq!(c.peer_credit(), 0);
    c.peer_buf_alloc = 0;
    c.peer_fwd_cnt = 5;
    assert_eq!(c.peer_credit(), 0);
}

#[test]
fn request_flood_is_capped() {
    let mut e = Env::new();
    e.mux.max_conns = 8;
    let mut p = e.path.clone().into_os_string();
    p.push("_80");
    let l = UnixListener::bind(&p).unwrap();
    for i in 0..20 {
        e.tx(pkt(op::REQUEST, 100 + i, 80), &[]);
    }
    let pkts = e.drain_rx();
    let ok = pkts.iter().filter(|(h, _)| h.op == op::RESPONSE).count();
    let rst = pkts.iter().filter(|(h, _)| h.op == op::RST).count();
    assert_eq!((ok, rst), (8, 12));
    assert_eq!(e.mux.stats().connections, 8);
    drop(l);
}

#[test]
fn guest_beyond_credit_is_reset_and_buffer_bounded() {
    let mut e = Env::new();
    let (c, hport) = e.host_connect(5000);
    // The host never reads: we buffer at most CONN_BUF_ALLOC bytes.
    let chunk = vec![7u8; 60000];
    let mut sent = 0usize;
    while e.mux.stats().connections == 1 {
        e.tx(rw(5000, hport, chunk.len()), &chunk);
        sent += chunk.len();
        assert!(e.mux.stats().buffered <= CONN_BUF_ALLOC as usize);
        assert!(sent < 100 << 20, "never reset");
    }
    let pkts = e.drain_rx();
    assert!(pkts.iter().any(|(h, _)| h.op == op::RST));
    drop(c);
}

#[test]
fn slow_host_reader_gets_everything_with_credit_updates() {
    let mut e = Env::new();
    let (mut c, hport) = e.host_connect(5000);
    c.set_nonblocking(true).unwrap();
    e.poll_ms = 1;
    let total = 4 << 20;
    let (mut sent, mut got) = (0usize, 0usize);
    let mut guest_fwd_seen = 0u32;
    let mut sum_in = 0u64;
    let mut sum_out = 0u64;
    let mut rbuf = vec![0u8; 7000];
    while got < total {
        // The guest sends while its credit allows (as the Linux driver does).
        let credit = CONN_BUF_ALLOC - (sent as u32).wrapping_sub(guest_fwd_seen);
        let n = (credit as usize).min(32768).min(total - sent);
        if n > 0 {
            let data: Vec<u8> = (sent..sent + n).map(|i| (i % 251) as u8).collect();
            sum_in += data.iter().map(|&b| u64::from(b)).sum::<u64>();
            e.tx(rw(5000, hport, n), &data);
            sent += n;
        }
        assert!(e.mux.stats().buffered <= CONN_BUF_ALLOC as usize);
        // A slow reader: a few KiB per round.
        if let Ok(k) = c.read(&mut rbuf) {
            sum_out += rbuf[..k].iter().map(|&b| u64::from(b)).sum::<u64>();
            got += k;
        }
        e.pump();
        while let Some((h, _)) = e.rx() {
            assert_eq!(h.op, op::CREDIT_UPDATE);
            guest_fwd_seen = h.fwd_cnt;
        }
    }
    assert_eq!(sum_in, sum_out);
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let mut e = Env::new();
    let (mut c, hport) = e.host_connect(5000);
    e.tx(
        Header {
            buf_alloc: 100,
            ..pkt(op::CREDIT_UPDATE, 5000, hport)
        },
        &[],
    );
    c.write_all(&[1u8; 1000]).unwrap();
    let pkts = e.drain_rx();
    let n: u32 = pkts.iter().map(|(h, _)| h.len).sum();
    assert_eq!(n, 100, "{pkts:?}");
    // No credit: the socket is out of the poll set (no busy loop).
    assert!(!e.reg.fds.values().any(|(_, t)| *t != LISTENER_TOKEN));
    // The guest consumed 100 bytes: 100 more.
    e.tx(
        Header {
            buf_alloc: 100,
            fwd_cnt: 100,
            ..pkt(op::CREDIT_UPDATE, 5000, hport)
        },
        &[],
    );
    let n: u32 = e.drain_rx().iter().map(|(h, _)| h.len).sum();
    assert_eq!(n, 100);
    // CREDIT_REQUEST gets a CREDIT_UPDATE.
    e.tx(
        Header {
            buf_alloc: 100,
            fwd_cnt: 100,
            ..pkt(op::CREDIT_REQUEST, 5000, hport)
        },
        &[],
    );
    let pkts = e.drain_rx();
    assert!(pkts.iter().any(|(h, _)| h.op == op::CREDIT_UPDATE));
}

#[test]
fn many_concurrent_streams() {
    let mut e = Env::new();
    let mut clients = Vec::new();
    for i in 0..32 {
        let (c, hport) = e.host_connect(6000 + i);
        clients.push((c, hport, 6000 + i));
    }
    for (c, _, port) in &mut clients {
        c.write_all(format!("from {port}").as_bytes()).unwrap();
    }
    let mut seen = std::collections::HashSet::new();
    e.pump_until(|e| {
        while let Some((h, d)) = e.rx() {
            assert_eq!(d, format!("from {}", h.dst_port).as_bytes());
            seen.insert(h.dst_port);
        }
        seen.len() == 32
    });
    e.mux.shutdown_all(&mut e.reg);
    for (c, _, _) in &mut clients {
        assert_eq!(read_line(c), "");
    }
    assert_eq!(e.reg.fds.len(), 1);
}
