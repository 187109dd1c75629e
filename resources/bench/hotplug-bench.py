#!/usr/bin/python3
"""Hotplug benchmark: arbor's API against QEMU's QMP, same guest.

Boots the guest kit once per VMM (one guest at a time) and, once the guest
has reached /init, measures (n, median, p99, min, max, in milliseconds):

  * ping:        API round trip of a no-op request: arbor `GET
                 /api/v1/vmm.ping` on an open keep-alive connection (and, as
                 an extra row, on a new connection each time); QEMU `{"execute":
                 "query-version"}` on the open QMP connection;
  * add request: wall time of the hotplug request: arbor `PUT
                 /api/v1/vm.add-disk`; QEMU `blockdev-add` of the raw file
                 then `device_add virtio-blk-pci` into a pcie-root-port;
  * pci:         from sending the add request to the guest's
                 `pci ...: [1af4:1042]` line (the device enumerated);
  * disk:        from sending the add request to the guest's
                 `virtio_blk virtioN: [vdX] <sectors> 512-byte logical blocks`
                 (each disk has its own size, so the line is the right one);
  * remove:      arbor `PUT /api/v1/vm.remove-device` (answers 204 only once
                 the guest has ejected the device); QEMU from sending
                 `device_del` to the `DEVICE_DELETED` event.

arbor places each disk itself (its --hotplug-order) unless --port names a
port; the table names the port the disk went under and its hotplug
mechanism, read from GET /api/v1/vm.info. QEMU runs q35 in two modes: "qemu-acpi" (QEMU 7.2's default: ACPI hotplug
for root ports) and "qemu-native" (native PCIe hotplug, pciehp, with
-global ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off).

Each cycle adds one disk, waits for the guest to probe it, removes it and
waits for the removal to complete. Prints a table, then one final line of
JSON. Exits non-zero with a message on any failure. See README.md beside
this file.

Python 3 standard library only.
"""

import argparse
import http.client
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import (  # noqa: E402
    MIB, BenchError, log, nonnegative_float, nonnegative_int, parse_size,
    positive_float, positive_int, quote, tail_lines,
)

benchlib.PROG = "hotplug-bench"

MARK_INIT = "Run /init as init process"
MARK_FATAL = ("Kernel panic",)
RE_DISK = re.compile(r"virtio_blk (virtio\d+): \[(vd[a-z]+)\] (\d+) 512-byte logical blocks")
RE_PCI = re.compile(r"\bpci ([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]): \[1af4:1042\]")

# Disk i (1-based, warm-up included) has DISK_BASE_MIB + i MiB, so its line
# reads (DISK_BASE_MIB + i) * 2048 sectors.
DISK_BASE_MIB = 40

QEMU_MODES = ("acpi", "native")

# vm.info's hotplug mechanisms, as the table names them (QEMU's modes alike).
HOTPLUG_NAMES = {"pcie_native": "native", "acpi": "acpi", "shpc": "shpc", "none": "none"}


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="hotplug-bench.py",
        description="Boot the guest kit under arbor and under QEMU (q35, ACPI and native "
        "PCIe hotplug) and measure API round trips, disk hotplug until the guest "
        "probes the disk, and removal until the guest has ejected it.",
        epilog="Times are wall-clock, taken with time.monotonic() around the request; guest "
        "lines are timed when they arrive on the VMM's standard output. "
        "See resources/bench/README.md.",
    )
    p.add_argument("--cycles", type=positive_int, default=10,
                   help="measured add/remove cycles per VMM (default 10)")
    p.add_argument("--warmup", type=nonnegative_int, default=1,
                   help="add/remove cycles run first and not counted (default 1)")
    p.add_argument("--pings", type=positive_int, default=200,
                   help="ping round trips per VMM (default 200)")
    p.add_argument("--timeout", type=positive_float, default=180.0, metavar="SECONDS",
                   help="seconds the guest may take to reach 'Run /init' (default 180)")
    p.add_argument("--op-timeout", type=positive_float, default=60.0, metavar="SECONDS",
                   help="seconds each hotplug step may take: a request, the guest probing "
                   "the disk, a removal (default 60)")
    p.add_argument("--settle", type=nonnegative_float, default=1.0, metavar="SECONDS",
                   help="before each add and each removal, wait until the previous step "
                   "ended this long ago and the guest console has been quiet this long "
                   "(default 1; the quiet wait is capped at --op-timeout)")
    p.add_argument("--only", choices=("arbor", "qemu"), help="benchmark one VMM only")
    p.add_argument("--qemu-hotplug", default="acpi,native", metavar="MODES",
                   help="QEMU modes, comma-separated: acpi (QEMU 7.2's q35 default for root "
                   "ports), native (pciehp; ACPI hotplug for bridges turned off). Default "
                   "acpi,native")
    p.add_argument("--kernel", choices=("vmlinux", "bzImage"), default="vmlinux",
                   help="which kernel image of the guest kit to boot (default vmlinux, PVH entry)")
    p.add_argument("--cpus", type=positive_int, default=1, help="vCPUs (default 1)")
    p.add_argument("--memory", type=parse_size, default=512 * MIB, metavar="SIZE",
                   help="guest memory, e.g. 512M (default 512M; a plain number is MiB)")
    p.add_argument("--guest-dir", default=benchlib.default_guest_dir(),
                   help="guest kit directory (default $ARBOR_GUEST_DIR, else <repo>/target/guest, "
                   "else /tmp/guest if only that exists)")
    p.add_argument("--arbor", metavar="PATH",
                   help="arbor binary (default target/release/arbor, built with 'cargo build "
                   "--release -p vmm -p api' when missing or older than the sources)")
    p.add_argument("--no-build", action="store_true",
                   help="use target/release/arbor even if it is older than the sources")
    p.add_argument("--arbor-args", default="", metavar="STRING",
                   help="extra arbor options, split like a shell would, e.g. "
                   "\"--pci-port id=rp1,type=root-port,hotplug=native\"")
    p.add_argument("--port", metavar="ID", action="append",
                   help="put each arbor disk under this port (add-disk's 'port' field), e.g. "
                   "rp0 (a root port of arbor's default topology, native hotplug), br0 (a "
                   "PCI bridge with ACPI hotplug, added to the default topology when named "
                   "here without --pci-port in --arbor-args) or a port from --arbor-args. "
                   "Repeatable: arbor "
                   "is then booted and measured once per port. Default: no port, arbor places "
                   "the disk itself (its --hotplug-order; --arbor-args \"--hotplug-order "
                   "root,native,acpi\" for the root bus)")
    p.add_argument("--qemu", default="qemu-system-x86_64", metavar="PATH",
                   help="QEMU binary (default qemu-system-x86_64)")
    p.add_argument("--qemu-cpu", default="host", metavar="MODEL",
                   help="QEMU -cpu value (default host)")
    p.add_argument("--logs", metavar="DIR",
                   help="write DIR/<vmm>.log: the VMM's console and standard error lines and "
                   "the benchmark's requests, in order, each with its arrival time in seconds "
                   "since the VMM started")
    p.add_argument("--stop-grace", type=positive_float, default=5.0, metavar="SECONDS",
                   help="seconds a VMM gets to exit after being asked to (default 5)")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.qemu_hotplug.split(",") if m.strip()]
    bad = [m for m in modes if m not in QEMU_MODES]
    if bad or not modes or len(set(modes)) != len(modes):
        p.error(f"--qemu-hotplug: expected a list of {', '.join(QEMU_MODES)}; got '{args.qemu_hotplug}'")
    args.qemu_modes = modes
    try:
        args.arbor_extra = shlex.split(args.arbor_args)
    except ValueError as e:
        p.error(f"--arbor-args: {e}")
    if args.only == "qemu" and (args.port or args.arbor_extra):
        p.error("--port and --arbor-args apply to arbor, but --only qemu was given")
    args.port = args.port or []
    if len(set(args.port)) != len(args.port) or not all(args.port):
        p.error("--port: give each port once, and not empty")
    if "br0" in args.port and "--pci-port" not in args.arbor_extra:
        args.arbor_extra += benchlib.ARBOR_WITH_ACPI_BRIDGE
    return args


# ---------------------------------------------------------------------------
# Reading a VMM's output
# ---------------------------------------------------------------------------




# ---------------------------------------------------------------------------
# VMMs
# ---------------------------------------------------------------------------


class Guest:
    """A running VMM with its console; the base of ArborVM and QemuVM."""

    def __init__(self, name, argv, opts):
        self.name = name
        self.argv = argv
        self.opts = opts
        self.proc = None
        self.console = None
        self.stderr = None
        self.events = []  # (t, text): the benchmark's own actions, for --logs

    def start(self):
        self.t_start = time.monotonic()
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, bufsize=0, start_new_session=True)
        except OSError as e:
            raise BenchError(f"{self.name}: cannot start {self.argv[0]}: {e}")
        self.console = benchlib.Stream(self.proc.stdout)
        self.stderr = benchlib.Stream(self.proc.stderr)

    def fail(self, what):
        """A BenchError for WHAT, with the console's and stderr's last lines."""
        err = self.stderr.text() if self.stderr else b""
        status = self.proc.poll() if self.proc else None
        msg = f"{self.name}: {what}"
        if status is not None:
            msg += f" (the VMM exited with status {status})"
        msg += f"\n  last console lines:\n{tail_lines(self.console.text() if self.console else b'')}"
        if err.strip():
            msg += f"\n  stderr:\n{tail_lines(err, 15)}"
        return BenchError(msg)

    def wait_line(self, match, start, timeout, what):
        deadline = time.monotonic() + timeout
        try:
            return self.console.wait_for(match, start, deadline)
        except benchlib.StreamTimeout:
            raise self.fail(f"timeout: no {what} within {timeout:g} s")
        except benchlib.StreamEof:
            raise self.fail(f"the console closed before {what}")
        except benchlib.StreamFatal as e:
            time.sleep(1.0)  # let the rest of the oops arrive
            raise self.fail(f"the guest failed ('{e}') while waiting for {what}")

    def boot(self):
        self.start()
        self.wait_ready()
        _, t, _, _ = self.wait_line(lambda l: MARK_INIT in l, 0, self.opts.timeout, f"'{MARK_INIT}'")
        self.boot_s = t - self.t_start
        self.note("'Run /init' seen", t)
        self.settle()

    def settle(self):
        """Waits until the last step finished at least --settle seconds ago and
        the console has been quiet that long: the guest keeps working after a
        step completes (an eject finishes before the guest's clean-up does)."""
        if self.opts.settle <= 0:
            return
        if self.events:
            rest = self.events[-1][0] + self.opts.settle - time.monotonic()
            if rest > 0:
                time.sleep(rest)
        self.console.wait_quiet(self.opts.settle, time.monotonic() + self.opts.op_timeout)

    def stop(self):
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                try:
                    self.ask_exit()
                    self.proc.wait(timeout=self.opts.stop_grace)
                except Exception:
                    pass
            benchlib.stop(self.proc, self.opts.stop_grace)
        finally:
            for s in (self.proc.stdout, self.proc.stderr):
                try:
                    s.close()
                except OSError:
                    pass

    def note(self, text, t=None):
        self.events.append((time.monotonic() if t is None else t, text))

    def write_logs(self, d):
        """DIR/<name>.log: the command, then the console lines, standard error
        lines ("E ") and the benchmark's actions (">>"), in arrival order."""
        os.makedirs(d, exist_ok=True)
        merged = []
        for tag, stream in (("  ", self.console), ("E ", self.stderr)):
            if stream is not None:
                with stream.cond:
                    merged += [(t, tag, l) for t, l in stream.lines]
        merged += [(t, ">>", e) for t, e in self.events]
        merged.sort(key=lambda x: x[0])
        with open(os.path.join(d, f"{self.name}.log"), "w") as f:
            f.write(" ".join(quote(a) for a in self.argv) + "\n")
            for t, tag, l in merged:
                f.write(f"[{t - self.t_start:10.3f}] {tag} {l}\n")

    def wait_disk(self, mark, sectors, t0):
        """Waits for the guest's line for the disk of SECTORS sectors; returns
        (disk_s, pci_s or None, line) counted from T0."""
        idx, t_disk, line, _ = self.wait_line(
            lambda l: (m := RE_DISK.search(l)) and int(m.group(3)) == sectors,
            mark, self.opts.op_timeout, f"'virtio_blk ... [vdX] {sectors} 512-byte logical blocks'")
        t_pci = None
        with self.console.cond:
            for t, l in self.console.lines[mark:idx]:
                if RE_PCI.search(l):
                    t_pci = t
                    break
        return t_disk - t0, (t_pci - t0 if t_pci is not None else None), line


class ArborVM(Guest):
    def __init__(self, name, binary, kit, workdir, port, opts):
        kernel, initramfs, cmdline = kit
        self.sock = os.path.join(workdir, f"{name}-api.sock")
        argv = [binary, "--kernel", kernel, "--initramfs", initramfs, "--cmdline", cmdline,
                "--cpus", str(opts.cpus), "--memory", f"{opts.memory // MIB}M",
                "--api-socket", self.sock,
                # The disks are created in workdir; arbor opens only what it may.
                "--allow-path", workdir] + opts.arbor_extra
        super().__init__(name, argv, opts)
        self.port = port

    def wait_ready(self):
        deadline = time.monotonic() + self.opts.op_timeout
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None:
                time.sleep(0.2)
                raise self.fail("exited before creating its API socket")
            if time.monotonic() > deadline:
                raise self.fail(f"no API socket {self.sock} after {self.opts.op_timeout:g} s")
            time.sleep(0.01)

    def connection(self):
        c = benchlib.UnixHTTPConnection(self.sock, self.opts.op_timeout)
        try:
            c.connect()
        except OSError as e:
            raise self.fail(f"cannot connect to the API socket {self.sock}: {e}")
        return c

    def http(self, conn, method, path, body=None):
        """One request on CONN; returns (t_sent, t_answered, status, body)."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        t0 = time.monotonic()
        try:
            conn.request(method, path, body=data, headers=headers)
            r = conn.getresponse()
            payload = r.read()
        except (OSError, http.client.HTTPException) as e:
            raise self.fail(f"{method} {path}: {type(e).__name__}: {e}")
        t1 = time.monotonic()
        return t0, t1, r.status, payload

    def expect(self, what, status, payload, want):
        if status != want:
            raise self.fail(f"{what} answered HTTP {status} (expected {want}): "
                            f"{payload.decode('utf-8', 'replace').strip()}")

    def pings(self, n):
        out = {"ping_ms": [], "ping_newconn_ms": []}
        conn = self.connection()
        try:
            for i in range(n + 1):  # the first one is not counted
                t0, t1, st, body = self.http(conn, "GET", "/api/v1/vmm.ping")
                self.expect("GET vmm.ping", st, body, 200)
                if i:
                    out["ping_ms"].append((t1 - t0) * 1e3)
        finally:
            conn.close()
        for _ in range(n):
            t0 = time.monotonic()
            conn = benchlib.UnixHTTPConnection(self.sock, self.opts.op_timeout)
            try:
                _, t1, st, body = self.http(conn, "GET", "/api/v1/vmm.ping")
            finally:
                conn.close()
            self.expect("GET vmm.ping", st, body, 200)
            out["ping_newconn_ms"].append((t1 - t0) * 1e3)
        return out

    def cycle(self, i, path, sectors):
        dev = f"hp{i}"
        body = {"path": path, "id": dev}
        if self.port:
            body["port"] = self.port
        self.settle()
        conn = self.connection()  # connected before the clock starts
        mark = self.console.mark()
        try:
            t0, t1, st, payload = self.http(conn, "PUT", "/api/v1/vm.add-disk", body)
        finally:
            conn.close()
        self.note(f"PUT vm.add-disk {json.dumps(body)} sent", t0)
        self.note(f"answered {st} {payload.decode('utf-8', 'replace').strip()}", t1)
        self.expect(f"PUT vm.add-disk {json.dumps(body)}", st, payload, 200)
        try:
            answer = json.loads(payload)
        except ValueError:
            raise self.fail(f"vm.add-disk answered 200 with a body that is not JSON: {payload!r}")
        if answer.get("id") != dev:
            raise self.fail(f"vm.add-disk answered {answer}, expected id '{dev}'")
        disk_s, pci_s, line = self.wait_disk(mark, sectors, t0)
        where = self.placement(dev, answer)
        self.settle()
        conn = self.connection()
        try:
            r0, r1, st, payload = self.http(conn, "PUT", "/api/v1/vm.remove-device", {"id": dev})
        finally:
            conn.close()
        self.note(f"PUT vm.remove-device {dev} sent", r0)
        self.note(f"answered {st}", r1)
        self.expect(f"PUT vm.remove-device {dev}", st, payload, 204)
        return {
            "add_req_ms": (t1 - t0) * 1e3,
            "pci_ms": pci_s * 1e3 if pci_s is not None else None,
            "disk_ms": disk_s * 1e3,
            "remove_ms": (r1 - r0) * 1e3,
            "pci_path": answer.get("pci_path"),
            "port": where["port"],
            "hotplug": where["hotplug"],
            "guest_line": line.strip(),
        }

    def placement(self, dev, answer):
        """Where DEV went, from GET vm.info (not timed): the topology node it
        sits under and that node's hotplug mechanism. With --port, checks
        that the disk is under that port."""
        conn = self.connection()
        try:
            _, _, st, payload = self.http(conn, "GET", "/api/v1/vm.info")
        finally:
            conn.close()
        self.expect("GET vm.info", st, payload, 200)
        try:
            info = json.loads(payload)
        except ValueError:
            raise self.fail(f"vm.info answered a body that is not JSON: {payload[:200]!r}")
        nodes = {n.get("id"): n for n in info.get("topology") or []}
        device = next((d for d in info.get("devices") or [] if d.get("id") == dev), None)
        if device is None:
            raise self.fail(f"vm.info does not list the disk '{dev}' that vm.add-disk answered {answer}")
        root = next((i for i, n in nodes.items() if n.get("type") == "root_bus"), None)
        port = device.get("port") or root
        hotplug = nodes.get(port, {}).get("hotplug") if port else None
        if self.port:
            if not nodes:
                raise self.fail(f"--port {self.port}: vm.info has no topology (does this arbor "
                                f"support ports?); the disk went to PCI path {answer.get('pci_path')}")
            if self.port not in nodes:
                raise self.fail(f"--port {self.port}: no such node in vm.info's topology "
                                f"({', '.join(sorted(map(str, nodes)))})")
            if port != self.port:
                raise self.fail(f"vm.add-disk with port '{self.port}' placed the disk under "
                                f"'{port}' (PCI path {answer.get('pci_path')})")
        return {"port": port, "hotplug": hotplug}

    def ask_exit(self):
        conn = benchlib.UnixHTTPConnection(self.sock, self.opts.stop_grace)
        try:
            conn.request("PUT", "/api/v1/vmm.shutdown")
            conn.getresponse().read()
        finally:
            conn.close()


class QMP:
    """A QMP client on a UNIX socket; a thread reads replies and events and
    stamps each with its arrival time."""

    def __init__(self, path, timeout):
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.cond = threading.Condition()
        self.replies = {}  # id -> (t, msg)
        self.events = []   # (t, msg)
        self.greeting = None
        self.closed = False
        self.next_id = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                line = self.file.readline()
            except OSError:
                line = b""
            t = time.monotonic()
            with self.cond:
                if not line:
                    self.closed = True
                    self.cond.notify_all()
                    return
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if "QMP" in msg:
                    self.greeting = msg
                elif "event" in msg:
                    self.events.append((t, msg))
                elif "id" in msg:
                    self.replies[msg["id"]] = (t, msg)
                self.cond.notify_all()

    def _wait(self, pred, timeout, what):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                v = pred()
                if v:
                    return v
                if self.closed:
                    raise ConnectionError(f"QMP connection closed while waiting for {what}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {what} within {timeout:g} s")
                self.cond.wait(remaining)

    def handshake(self):
        self._wait(lambda: self.greeting, self.timeout, "QMP greeting")
        self.execute("qmp_capabilities")

    def execute(self, command, arguments=None):
        """Runs COMMAND; returns (t_sent, t_reply, return value); raises
        RuntimeError for an error reply."""
        with self.cond:
            self.next_id += 1
            cid = f"c{self.next_id}"
        msg = {"execute": command, "id": cid}
        if arguments is not None:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        t0 = time.monotonic()
        self.sock.sendall(data)
        t1, reply = self._wait(lambda: self.replies.pop(cid, None), self.timeout, f"reply to {command}")
        if "error" in reply:
            e = reply["error"]
            raise RuntimeError(f"{command} {json.dumps(arguments)}: {e.get('class')}: {e.get('desc')}")
        return t0, t1, reply.get("return")

    def wait_event(self, name, since, match, timeout):
        """The first event NAME at or after time SINCE for which MATCH(data)
        holds; returns (t, msg)."""
        def find():
            for t, m in self.events:
                if t >= since and m.get("event") == name and match(m.get("data", {})):
                    return t, m
            return None
        return self._wait(find, timeout, f"{name} event")

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class QemuVM(Guest):
    def __init__(self, binary, kit, workdir, mode, opts):
        kernel, initramfs, cmdline = kit
        self.qmp_path = os.path.join(workdir, f"qmp-{mode}.sock")
        argv = [binary, "-accel", "kvm", "-machine", "q35", "-cpu", opts.qemu_cpu,
                "-m", f"{opts.memory // MIB}M", "-smp", str(opts.cpus),
                "-nographic", "-nodefaults", "-no-reboot", "-serial", "stdio",
                "-kernel", kernel, "-initrd", initramfs, "-append", cmdline,
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                "-device", "pcie-root-port,id=rp1,chassis=1"]
        if mode == "native":
            argv += ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]
        super().__init__(f"qemu-{mode}", argv, opts)
        self.qmp = None

    def wait_ready(self):
        deadline = time.monotonic() + self.opts.op_timeout
        while True:
            if self.proc.poll() is not None:
                time.sleep(0.2)
                raise self.fail("exited before its QMP socket was ready")
            if os.path.exists(self.qmp_path):
                try:
                    self.qmp = QMP(self.qmp_path, self.opts.op_timeout)
                    break
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise self.fail(f"no QMP socket {self.qmp_path} after {self.opts.op_timeout:g} s")
            time.sleep(0.01)
        try:
            self.qmp.handshake()
        except (OSError, RuntimeError, TimeoutError) as e:
            raise self.fail(f"QMP handshake: {e}")

    def qmp_do(self, command, arguments=None):
        try:
            return self.qmp.execute(command, arguments)
        except (OSError, RuntimeError, TimeoutError) as e:
            raise self.fail(f"QMP {e}")

    def pings(self, n):
        out = {"ping_ms": []}
        for i in range(n + 1):  # the first one is not counted
            t0, t1, _ = self.qmp_do("query-version")
            if i:
                out["ping_ms"].append((t1 - t0) * 1e3)
        return out

    def cycle(self, i, path, sectors):
        dev, node = f"hp{i}", f"hpn{i}"
        self.settle()
        mark = self.console.mark()
        t0, _, _ = self.qmp_do("blockdev-add", {"driver": "raw", "node-name": node,
                                                "file": {"driver": "file", "filename": path}})
        d0, t1, _ = self.qmp_do("device_add", {"driver": "virtio-blk-pci", "id": dev,
                                               "drive": node, "bus": "rp1"})
        self.note(f"blockdev-add {node} sent", t0)
        self.note(f"device_add {dev} sent", d0)
        self.note(f"device_add {dev} answered", t1)
        disk_s, pci_s, line = self.wait_disk(mark, sectors, t0)
        self.settle()
        r0, r_reply, _ = self.qmp_do("device_del", {"id": dev})
        self.note(f"device_del {dev} sent", r0)
        self.note(f"device_del {dev} answered", r_reply)
        try:
            r1, _ = self.qmp.wait_event("DEVICE_DELETED", r0, lambda d: d.get("device") == dev,
                                        self.opts.op_timeout)
        except (OSError, TimeoutError) as e:
            raise self.fail(f"device_del {dev}: {e}")
        self.note(f"DEVICE_DELETED {dev}", r1)
        self.qmp_do("blockdev-del", {"node-name": node})
        return {
            "add_req_ms": (t1 - t0) * 1e3,
            "device_add_ms": (t1 - d0) * 1e3,
            "pci_ms": pci_s * 1e3 if pci_s is not None else None,
            "disk_ms": disk_s * 1e3,
            "remove_ms": (r1 - r0) * 1e3,
            "remove_req_ms": (r_reply - r0) * 1e3,
            "guest_line": line.strip(),
        }

    def ask_exit(self):
        if self.qmp is not None:
            try:
                self.qmp.execute("quit")
            except (OSError, RuntimeError, TimeoutError):
                pass

    def stop(self):
        try:
            super().stop()
        finally:
            if self.qmp is not None:
                self.qmp.close()


# ---------------------------------------------------------------------------
# Statistics and output
# ---------------------------------------------------------------------------


METRICS = (
    ("ping_ms", "API ping round trip (arbor: GET vmm.ping, keep-alive; QEMU: QMP query-version)"),
    ("ping_newconn_ms", "API ping on a new connection each time (connect + GET vmm.ping)"),
    ("add_req_ms", "add request (arbor: PUT vm.add-disk; QEMU: blockdev-add + device_add)"),
    ("device_add_ms", "QMP device_add alone"),
    ("pci_ms", "add request sent -> guest line 'pci ...: [1af4:1042]'"),
    ("disk_ms", "add request sent -> guest line 'virtio_blk ... logical blocks'"),
    ("remove_ms", "removal (arbor: PUT vm.remove-device -> 204; QEMU: device_del -> DEVICE_DELETED)"),
    ("remove_req_ms", "QMP device_del reply (the removal goes on after it)"),
)


def print_table(stats, modes, args, labels):
    print()
    print(f"Hotplug benchmark: {args.kernel} + initramfs.cpio, {args.cpus} vCPU(s), "
          f"{args.memory // MIB} MiB; {args.cycles} cycle(s) after {args.warmup} warm-up, "
          f"{args.pings} pings; times in ms")
    head = f"  {'':24} {'n':>5} {'median':>10} {'p99':>10} {'min':>10} {'max':>10}"
    print(head)
    print("  " + "-" * (len(head) - 2))
    for key, title in METRICS:
        rows = [(m, stats[m].get(key)) for m in modes if stats.get(m, {}).get(key)]
        if not rows:
            continue
        print(title)
        for m, s in rows:
            print(f"  {labels[m]:24} {s['n']:>5} {s['median']:>10.2f} {s['p99']:>10.2f} "
                  f"{s['min']:>10.2f} {s['max']:>10.2f}")
    print()


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def run_vm(vm, args, workdir):
    """Boots VM, runs the pings and the cycles; returns the results dict."""
    load = benchlib.loadavg()
    others = benchlib.other_guests(os.getpid())
    if others:
        log(f"{vm.name}: warning: other VMMs are running: {', '.join(others)}")
    log(f"{vm.name}: {' '.join(quote(a) for a in vm.argv)}")
    log(f"{vm.name}: booting (timeout {args.timeout:g} s)")
    try:
        vm.boot()
        log(f"{vm.name}: 'Run /init' after {vm.boot_s:.1f} s; {args.pings} pings")
        samples = vm.pings(args.pings)
        cycles = []
        total = args.warmup + args.cycles
        for i in range(1, total + 1):
            mib = DISK_BASE_MIB + i
            path = os.path.join(workdir, f"{vm.name}-disk{i}.img")
            with open(path, "wb") as f:
                f.truncate(mib * MIB)
            r = vm.cycle(i, path, mib * 2048)
            os.unlink(path)
            warm = i <= args.warmup
            r["warmup"] = warm
            cycles.append(r)
            pci = f"{r['pci_ms']:.0f}" if r["pci_ms"] is not None else "-"
            log(f"{vm.name}: cycle {i}/{total}{' (warm-up)' if warm else ''}: add request "
                f"{r['add_req_ms']:.1f} ms, pci {pci} ms, disk {r['disk_ms']:.0f} ms, "
                f"removal {r['remove_ms']:.0f} ms")
    finally:
        vm.stop()
        if args.logs:
            try:
                vm.write_logs(args.logs)
            except OSError as e:
                log(f"{vm.name}: cannot write logs to {args.logs}: {e}")
    measured = [c for c in cycles if not c["warmup"]]
    for key in ("add_req_ms", "device_add_ms", "pci_ms", "disk_ms", "remove_ms", "remove_req_ms"):
        if any(key in c for c in measured):
            samples[key] = [c.get(key) for c in measured]
    stats = {k: benchlib.describe(v) for k, v in samples.items()}
    missing_pci = sum(1 for c in measured if c["pci_ms"] is None)
    placements = sorted({(c["port"], c["hotplug"]) for c in cycles if "port" in c}, key=str)
    if missing_pci:
        log(f"{vm.name}: note: no 'pci ...: [1af4:1042]' line before the disk line in "
            f"{missing_pci} cycle(s)")
    return {
        "stats": {k: v for k, v in stats.items() if v},
        "per_cycle": cycles,
        "boot_s": round(vm.boot_s, 3),
        "loadavg_at_start": load,
        "other_vmms_at_start": others,
        "command": vm.argv,
        "placements": placements,
    }


def main(argv):
    args = parse_args(argv)
    kit = benchlib.guest_kit(args.guest_dir, args.kernel)
    benchlib.check_kvm()
    plan = []  # (mode, factory)
    if args.only in (None, "arbor"):
        arbor = benchlib.find_arbor(args.arbor, packages=("vmm", "api"),
                                    rebuild_stale=not args.no_build, attempts=10)
        for port in args.port or [None]:
            mode = "arbor" if len(args.port) <= 1 else f"arbor-{port}"
            plan.append((mode, lambda wd, mode=mode, port=port:
                         ArborVM(mode, arbor, kit, wd, port, args)))
    if args.only in (None, "qemu"):
        qemu = benchlib.find_qemu(args.qemu)
        for mode in args.qemu_modes:
            plan.append((f"qemu-{mode}", lambda wd, mode=mode: QemuVM(qemu, kit, wd, mode, args)))

    results = {}
    workdir = tempfile.mkdtemp(prefix="hotplug-bench.")
    try:
        for mode, factory in plan:
            results[mode] = run_vm(factory(workdir), args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    modes = [m for m, _ in plan]
    stats = {m: results[m]["stats"] for m in modes}
    labels = {"qemu-acpi": "QEMU rp1 (acpi)", "qemu-native": "QEMU rp1 (native)"}
    for m in modes:
        if m.startswith("arbor"):
            labels[m] = "arbor " + "; ".join(
                f"{port or '?'} ({HOTPLUG_NAMES.get(hp, hp or '?')})"
                for port, hp in results[m]["placements"])
    print_table(stats, modes, args, labels)
    kernel, initramfs, cmdline = kit
    out = {
        "kernel": kernel,
        "kernel_sha256": benchlib.sha256(kernel),
        "initramfs": initramfs,
        "cmdline": cmdline,
        "cpus": args.cpus,
        "memory_mib": args.memory // MIB,
        "cycles": args.cycles,
        "warmup": args.warmup,
        "pings": args.pings,
        "settle_s": args.settle,
        "timeout_s": args.timeout,
        "op_timeout_s": args.op_timeout,
        "arbor_ports": args.port,
        "placement": {m: [{"port": p, "hotplug": h} for p, h in results[m]["placements"]]
                      for m in modes if m.startswith("arbor")},
        "arbor_extra_args": args.arbor_extra,
        "unit": "ms",
        "stats": stats,
        "boot_s": {m: results[m]["boot_s"] for m in modes},
        "commands": {m: results[m]["command"] for m in modes},
        "per_cycle": {m: [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in c.items()}
                          for c in results[m]["per_cycle"]] for m in modes},
        "loadavg_at_start": {m: results[m]["loadavg_at_start"] for m in modes},
        "other_vmms_at_start": {m: results[m]["other_vmms_at_start"] for m in modes},
    }
    print(json.dumps(out, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    benchlib.run_main(main)
