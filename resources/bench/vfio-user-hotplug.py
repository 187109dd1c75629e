#!/usr/bin/env python3
"""vfio-user hot-plug benchmark: one guest, the vfio_user crate's example
gpio server (resources/vfio-user/build-gpio.sh), hot-plugged in turn into a
native root port (rp0), an ACPI bridge (br0) and the root bus, ROUNDS times
(places interleaved). Per place: median/min/max seconds from the
`vm.add-user-device` request to the guest's `pci-idio-16 ...: enabling
device` line, and of the removal request. Also the VMM's RssAnon (its own
memory; guest RAM is shared memory, counted apart) before and after one
device is added. Prints the load average at start and end.

Usage: vfio-user-hotplug.py [--rounds N] [--arbor PATH] [--guest-dir DIR]
Standard library only; progress on stderr.
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=300)
        self.path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(300)
        s.connect(self.path)
        self.sock = s


def api(sock, endpoint, body=None):
    c = UnixHTTP(sock)
    data = json.dumps(body).encode() if body is not None else b""
    c.request("PUT", "/api/v1/" + endpoint, body=data, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    text = r.read().decode()
    c.close()
    if r.status >= 300:
        raise RuntimeError(f"{endpoint}: {r.status} {text}")
    return json.loads(text) if text else None


def log(msg):
    print(f"vfio-user-hotplug: {msg}", file=sys.stderr, flush=True)


def rss_anon_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def wait_file(path, needle, start, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, errors="replace") as f:
            f.seek(start)
            if needle(f.read()):
                return time.monotonic()
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting in {path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--arbor", default=None)
    ap.add_argument("--guest-dir", default=os.environ.get("ARBOR_GUEST_DIR", os.path.join(REPO, "target/guest")))
    ap.add_argument("--timeout", type=float, default=400)
    a = ap.parse_args()
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
    arbor = a.arbor or os.path.join(target, "release/arbor")
    if not os.path.exists(arbor):
        subprocess.run(["cargo", "build", "-j1", "--release", "-p", "vmm"], cwd=REPO, check=True)
    gpio = subprocess.run([os.path.join(REPO, "resources/vfio-user/build-gpio.sh"), target],
                          check=True, capture_output=True, text=True).stdout.strip()
    g = a.guest_dir
    with open(os.path.join(g, "cmdline")) as f:
        cmdline = f.read().strip()
    d = tempfile.mkdtemp(prefix="vfio-user-bench-")
    sock = os.path.join(d, "api.sock")
    serial = os.path.join(d, "serial.log")
    load0 = open("/proc/loadavg").read().split()[:3]
    vmm = subprocess.Popen([arbor, "--allow-path", d, "--kernel", os.path.join(g, "vmlinux"),
                            "--initramfs", os.path.join(g, "initramfs.cpio"), "--cmdline", cmdline,
                            "--memory", "512M", "--api-socket", sock, "--serial", f"file={serial}",
                            "--remove-timeout", "120",
                            "--pci-port", "id=rp0,type=root-port,io-reserve=4K",
                            "--pci-port", "id=br0,type=pci-bridge,io-reserve=4K"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers = []
    try:
        while not os.path.exists(serial):
            time.sleep(0.05)
        wait_file(serial, lambda t: "Run /init as init process" in t, 0, a.timeout)
        log("guest up")
        places = [("native", "rp0"), ("acpi", "br0"), ("root", "root")]
        add = {p: [] for p, _ in places}
        rem = {p: [] for p, _ in places}
        rss = None
        n = 0
        for r in range(a.rounds):
            for name, port in places:
                n += 1
                s = os.path.join(d, f"gpio{n}.sock")
                srv = subprocess.Popen([gpio, "--socket-path", s], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
                servers.append(srv)
                while not os.path.exists(s):
                    time.sleep(0.01)
                before = rss_anon_kib(vmm.pid)
                mark = os.path.getsize(serial)
                t0 = time.monotonic()
                api(sock, "vm.add-user-device", {"socket": s, "id": "dev", "port": port})
                t1 = wait_file(serial, lambda t: "enabling device (0000 -> 0001)" in t, mark, a.timeout)
                add[name].append(t1 - t0)
                if rss is None:
                    rss = (before, rss_anon_kib(vmm.pid))
                t0 = time.monotonic()
                api(sock, "vm.remove-device", {"id": "dev"})
                rem[name].append(time.monotonic() - t0)
                srv.wait(timeout=30)
                log(f"round {r + 1} {name}: add {add[name][-1]:.2f} s, remove {rem[name][-1]:.2f} s")
        load1 = open("/proc/loadavg").read().split()[:3]
        print(f"load average at start {' '.join(load0)}, at end {' '.join(load1)}")
        print(f"{'place':8} {'add->enabling median':>21} {'min':>6} {'max':>6} {'remove median':>14} {'min':>6} {'max':>6}  (s, {a.rounds} rounds)")
        for name, _ in places:
            x, y = add[name], rem[name]
            print(f"{name:8} {statistics.median(x):21.2f} {min(x):6.2f} {max(x):6.2f} "
                  f"{statistics.median(y):14.2f} {min(y):6.2f} {max(y):6.2f}")
        print(f"VMM RssAnon: {rss[0]} KiB before the first device, {rss[1]} KiB with it "
              f"(+{rss[1] - rss[0]} KiB)")
        print(json.dumps({"add_s": add, "remove_s": rem, "rss_anon_kib": rss,
                          "load_start": load0, "load_end": load1}))
    finally:
        vmm.terminate()
        try:
            vmm.wait(timeout=15)
        except subprocess.TimeoutExpired:
            vmm.kill()
        for s in servers:
            if s.poll() is None:
                s.kill()


if __name__ == "__main__":
    main()
