#!/usr/bin/env python3
"""virtio-net benchmark: arbor beside QEMU (virtio-net-pci), same guest, same tap setup.

Everything runs inside a network namespace this script creates (`ip netns add
arbor-netbench-PID`, deleted at the end): one tap per VMM (owned by root, addresses
10.77.31.1/24 for arbor and 10.77.32.1/24 for QEMU), both VMMs started with `ip netns exec`.
Both boot the guest kit's vmlinux with the user-space initramfs; the guest configures
its address through its serial shell. For each round, arbor and QEMU alternate (A,B,A,B):

  ping       busybox ping from the host, --pings requests 50 ms apart: RTT median, p99
  h2g        TCP host -> guest: the host sends --mib MiB to busybox `nc -l` in the
             guest and times connect to the guest's close (all data received)
  g2h        TCP guest -> host: the guest pipes `dd` into busybox `nc`, the host
             times accept to EOF

and prints median/min/max per VMM with the arbor/QEMU ratio, and the load average.
Then, arbor only (--hotplug-rounds, default 1), a NIC is hot-plugged into each kind
of place (native root port rp0, ACPI bridge br0, root bus) over the API socket:

  bound      request to `arbor-guest wait-device PCI_PATH` returning in the guest
             (enumerated, driver bound; includes one guest shell round trip)
  link-up    request to the host's first ping answered by the new interface
             (the guest's shell adds 10.77.33.2/24 and sets the link up)
  remove     `vm.remove-device` round trip (answered once the guest let go)
Needs root (namespaces, taps), /dev/kvm, the guest kit (resources/guest-kit/build.sh),
busybox on the host, and qemu-system-x86_64 unless --only arbor.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import BenchError, log  # noqa: E402

benchlib.PROG = "net-bench"

SHELL_READY = "arbor-guest: shell on ttyS0"

# Runs inside the namespace: "send HOST PORT BYTES" or "recv PORT"; prints JSON.
HOST_HELPER = r"""
import json, socket, sys, time
mode = sys.argv[1]
if mode == "send":
    host, port, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    buf = b"\0" * 65536
    for _ in range(200):
        try:
            s = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            time.sleep(0.1)
    else:
        sys.exit("cannot connect")
    s.settimeout(600)
    t0 = time.monotonic()
    left = n
    while left:
        left -= s.send(buf[:min(left, len(buf))])
    s.shutdown(socket.SHUT_WR)
    while s.recv(65536):
        pass
    print(json.dumps({"bytes": n, "s": time.monotonic() - t0}), flush=True)
else:
    port = int(sys.argv[2])
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("0.0.0.0", port))
    l.listen(1)
    print("ready", flush=True)
    c, _ = l.accept()
    c.settimeout(600)
    t0 = time.monotonic()
    n = 0
    while True:
        d = c.recv(65536)
        if not d:
            break
        n += len(d)
    print(json.dumps({"bytes": n, "s": time.monotonic() - t0}), flush=True)
"""


def sh(cmd, check=True):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode:
        raise BenchError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


class Netns:
    def __init__(self):
        self.name = f"arbor-netbench-{os.getpid()}"
        sh(["ip", "netns", "add", self.name])
        self.exec(["ip", "link", "set", "lo", "up"])

    def exec(self, cmd, check=True):
        return sh(["ip", "netns", "exec", self.name] + cmd, check)

    def prefix(self):
        return ["ip", "netns", "exec", self.name]

    def tap(self, name, addr):
        self.exec(["ip", "tuntap", "add", "dev", name, "mode", "tap", "user", "0"])
        self.exec(["ip", "addr", "add", addr, "dev", name])
        self.exec(["ip", "link", "set", name, "up"])

    def delete(self):
        out = self.exec(["ip", "-o", "link", "show", "type", "tun"], check=False).stdout
        for line in out.splitlines():
            dev = line.split(":")[1].strip().split("@")[0]
            self.exec(["ip", "link", "del", dev], check=False)
        sh(["ip", "netns", "delete", self.name], check=False)


class Vm:
    """A VMM inside the namespace with a shell on its serial console."""

    def __init__(self, name, argv, subnet):
        self.name = name
        self.subnet = subnet
        self.text = ""
        self.lock = threading.Condition()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, bufsize=0, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        self.n = 0

    def _read(self):
        while True:
            d = self.proc.stdout.read(4096)
            if not d:
                break
            with self.lock:
                self.text += d.decode("utf-8", "replace").replace("\r", "")
                self.lock.notify_all()

    def wait(self, needle, start, timeout):
        deadline = time.monotonic() + timeout
        with self.lock:
            while needle not in self.text[start:]:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    tail = "\n".join(self.text.splitlines()[-15:])
                    err = self.proc.stderr.read().decode() if self.proc.poll() is not None else ""
                    raise BenchError(f"{self.name}: no '{needle}' within {timeout} s\n{tail}\n{err}")
                self.lock.wait(left)
            return start + self.text[start:].index(needle) + len(needle)

    def run(self, cmd, timeout=600, capture=False):
        """Runs CMD in the guest's shell; its output if CAPTURE (else discarded)."""
        self.n += 1
        mark = len(self.text)
        tag = f"NB{self.n}-{os.getpid()}"
        sink = "" if capture else " >/dev/null"
        line = f"echo N''B-B-{tag}; {{ {cmd}\n}}{sink} 2>&1; echo N''B-{tag}-$?\n"
        self.proc.stdin.write(line.encode())
        self.proc.stdin.flush()
        begin = self.wait(f"NB-B-{tag}\n", mark, timeout)
        end = self.wait(f"NB-{tag}-", begin, timeout)
        with self.lock:
            rest = self.text[end:]
            out = self.text[begin:end - len(f"NB-{tag}-")]
        while "\n" not in rest:
            time.sleep(0.05)
            with self.lock:
                rest = self.text[end:]
        status = int(rest.split("\n", 1)[0].strip() or "1")
        if status:
            raise BenchError(f"{self.name}: guest command failed ({status}): {cmd}\n{out}")
        return out

    def stop(self):
        benchlib.stop(self.proc, 5)


def boot(name, argv, subnet, timeout):
    t0 = time.monotonic()
    vm = Vm(name, argv, subnet)
    vm.wait(SHELL_READY, 0, timeout)
    time.sleep(2)
    vm.run(f"ip addr add 10.77.{subnet}.2/24 dev eth0 && ip link set eth0 up")
    log(f"{name}: shell and network up after {time.monotonic() - t0:.1f} s")
    return vm


def ping(ns, vm, count):
    out = ns.exec(["busybox", "ping", "-c", str(count), "-i", "0.05", "-W", "10",
                   f"10.77.{vm.subnet}.2"], check=False).stdout
    times = [float(t) for t in re.findall(r"time=([\d.]+) ms", out)]
    if len(times) < count:
        raise BenchError(f"{vm.name}: {count - len(times)} of {count} pings lost:\n{out}")
    return times


def h2g(ns, vm, nbytes):
    vm.proc.stdin.write(b"nc -l -p 5001 </dev/null >/dev/null &\n")
    vm.proc.stdin.flush()
    time.sleep(1)
    out = ns.exec(["python3", "-c", HOST_HELPER, "send", f"10.77.{vm.subnet}.2", "5001",
                   str(nbytes)]).stdout
    r = json.loads(out)
    return r["bytes"] / r["s"] / 1e6


def g2h(ns, vm, nbytes):
    helper = subprocess.Popen(ns.prefix() + ["python3", "-c", HOST_HELPER, "recv", "5002"],
                              stdout=subprocess.PIPE, text=True)
    try:
        if helper.stdout.readline().strip() != "ready":
            raise BenchError("host listener did not start")
        count = nbytes // 65536
        vm.run(f"dd if=/dev/zero bs=65536 count={count} | nc 10.77.{vm.subnet}.1 5002")
        r = json.loads(helper.stdout.readline())
        if r["bytes"] != count * 65536:
            raise BenchError(f"{vm.name}: guest sent {count * 65536} bytes, host got {r['bytes']}")
        return r["bytes"] / r["s"] / 1e6
    finally:
        helper.kill()
        helper.wait()


def api(sock, method, path, body=None):
    conn = benchlib.UnixHTTPConnection(sock, 600)
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status >= 300:
            raise BenchError(f"{method} {path}: {r.status} {data.decode(errors='replace')}")
        return json.loads(data) if data else None
    finally:
        conn.close()


def hotplug(ns, vm, sock, place):
    """One hot-plugged NIC at PLACE: (bound, link-up, remove) in ms."""
    body = {"tap": "taph", "id": "nh", "port": place}
    t0 = time.monotonic()
    added = api(sock, "PUT", "/api/v1/vm.add-net", body)
    out = vm.run(f"arbor-guest wait-device {added['pci_path']} 120", capture=True)
    bound = time.monotonic() - t0
    bdf = re.search(r"^bdf=(\S+)", out, re.M)
    if not bdf:
        raise BenchError(f"{vm.name}: no bdf from wait-device:\n{out}")
    vm.run(f"i=$(ls /sys/bus/pci/devices/{bdf.group(1)}/virtio*/net/) && "
           f"ip addr add 10.77.33.2/24 dev $i && ip link set $i up")
    while True:
        r = ns.exec(["busybox", "ping", "-c", "1", "-W", "1", "10.77.33.2"], check=False)
        if r.returncode == 0:
            break
        if time.monotonic() - t0 > 120:
            raise BenchError(f"{vm.name}: the NIC at {place} never answered ping")
    up = time.monotonic() - t0
    t1 = time.monotonic()
    api(sock, "PUT", "/api/v1/vm.remove-device", {"id": "nh"})
    gone = time.monotonic() - t1
    log(f"hotplug {place}: {added['pci_path']} bound {bound * 1e3:.0f} ms, "
        f"link up {up * 1e3:.0f} ms, removed {gone * 1e3:.0f} ms")
    return bound * 1e3, up * 1e3, gone * 1e3


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=benchlib.positive_int, default=3)
    p.add_argument("--mib", type=benchlib.positive_int, default=4, help="MiB per TCP transfer")
    p.add_argument("--pings", type=benchlib.positive_int, default=50)
    p.add_argument("--hotplug-rounds", type=benchlib.nonnegative_int, default=1,
                   help="NIC hotplug cycles per place (arbor only)")
    p.add_argument("--only", choices=("arbor", "qemu"))
    p.add_argument("--arbor", help="arbor binary (default target/release or debug)")
    p.add_argument("--qemu", default="qemu-system-x86_64")
    p.add_argument("--guest-dir", default=benchlib.default_guest_dir())
    p.add_argument("--timeout", type=float, default=600, help="boot timeout, s")
    a = p.parse_args(argv)
    benchlib.check_kvm()
    kernel = os.path.join(a.guest_dir, "vmlinux")
    initrd = os.path.join(a.guest_dir, "initramfs-user.cpio")
    with open(os.path.join(a.guest_dir, "cmdline")) as f:
        cmdline = " ".join(f.read().split())
    for f in (kernel, initrd):
        if not os.path.isfile(f):
            raise BenchError(f"{f} missing: run resources/guest-kit/build.sh")
    ns = Netns()
    vms = {}
    running = {}
    try:
        ns.tap("tapa", "10.77.31.1/24")
        ns.tap("tapq", "10.77.32.1/24")
        ns.tap("taph", "10.77.33.1/24")
        sock = os.path.join("/tmp", f"arbor-netbench-{os.getpid()}.sock")
        if a.only != "qemu":
            arbor = benchlib.find_arbor(a.arbor)
            vms["arbor"] = (ns.prefix() + [arbor, "--kernel", kernel, "--initramfs", initrd,
                                           "--cmdline", cmdline, "--memory", "512M",
                                           "--api-socket", sock,
                                           "--net", "tap=tapa,mac=52:54:00:00:31:02"]
                             + benchlib.ARBOR_WITH_ACPI_BRIDGE, 31)
        if a.only != "arbor":
            qemu = benchlib.find_qemu(a.qemu)
            vms["qemu"] = (ns.prefix() + [qemu, "-accel", "kvm", "-machine", "q35", "-cpu", "host",
                                          "-m", "512M", "-nographic", "-nodefaults", "-no-reboot",
                                          "-serial", "stdio", "-kernel", kernel, "-initrd", initrd,
                                          "-append", cmdline,
                                          "-netdev", "tap,id=n0,ifname=tapq,script=no,downscript=no",
                                          "-device", "virtio-net-pci,netdev=n0,disable-legacy=on,"
                                          "mac=52:54:00:00:32:02"], 32)
        for name, (argv_, sub) in vms.items():
            running[name] = boot(name, argv_, sub, a.timeout)
        vms = running
        res = {name: {"ping_ms": [], "h2g_MBps": [], "g2h_MBps": []} for name in vms}
        nbytes = a.mib << 20
        loads = []
        for r in range(a.rounds):
            for name, vm in vms.items():
                loads.append(benchlib.loadavg())
                res[name]["ping_ms"] += ping(ns, vm, a.pings)
                res[name]["h2g_MBps"].append(h2g(ns, vm, nbytes))
                res[name]["g2h_MBps"].append(g2h(ns, vm, nbytes))
                log(f"round {r + 1} {name}: h2g {res[name]['h2g_MBps'][-1]:.3f} MB/s, "
                    f"g2h {res[name]['g2h_MBps'][-1]:.3f} MB/s")
        print(f"net-bench: {a.rounds} rounds, {a.mib} MiB per transfer, {a.pings} pings per round; "
              f"load average {min(x for x in loads if x is not None):.2f}-"
              f"{max(x for x in loads if x is not None):.2f}")
        for key in ("ping_ms", "h2g_MBps", "g2h_MBps"):
            line = [key]
            for name in vms:
                line.append(f"{name} {json.dumps(benchlib.describe(res[name][key]))}")
            if len(vms) == 2:
                ma = benchlib.describe(res["arbor"][key])["median"]
                mq = benchlib.describe(res["qemu"][key])["median"]
                line.append(f"arbor/qemu median ratio {ma / mq:.2f}" if mq else "")
            print("  " + "; ".join(line))
        if "arbor" in vms and a.hotplug_rounds:
            hp = {}
            for _ in range(a.hotplug_rounds):
                for place in ("rp0", "br0", "root"):
                    for k, v in zip(("bound_ms", "link_up_ms", "remove_ms"),
                                    hotplug(ns, vms["arbor"], sock, place)):
                        hp.setdefault(place, {}).setdefault(k, []).append(v)
            print(f"net-bench hotplug (arbor, {a.hotplug_rounds} per place; load average "
                  f"{benchlib.loadavg():.2f})")
            for place, ks in hp.items():
                print(f"  {place}: " + "; ".join(
                    f"{k} {json.dumps(benchlib.describe(v))}" for k, v in ks.items()))
        return 0
    finally:
        for vm in running.values():
            vm.stop()
        ns.delete()


if __name__ == "__main__":
    benchlib.run_main(main)
