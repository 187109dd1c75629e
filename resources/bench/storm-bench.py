#!/usr/bin/python3
"""Storm benchmark: many hotplug/unplug cycles and many API clients against
one running guest, to see whether anything grows or slows down.

Boots the guest kit once under arbor, with a topology that has every
hotplug mechanism (two native root ports, a switch's downstream port, an
ACPI-hotplug PCI bridge, and the ACPI root bus). Once the guest has reached
/init:

  1. samples the VMM: open descriptors, threads, RSS outside guest RAM;
  2. client storm: --clients API clients at once, each sending --requests
     requests (GET vmm.ping and GET vm.info in turn), each on a new
     connection; latency percentiles, and how many were refused;
  3. --cycles hotplug cycles: each adds a device (disks and rngs in turn)
     to the next hotplug slot kind in rotation, waits for the guest to
     enumerate it (its `pci ...: [1af4:...]` line), then removes it (the
     request answers once the guest has released it). A few background
     clients poll vm.info meanwhile;
  4. a second client storm and a second sample.

Prints start-versus-end figures, then one line of JSON. Exits 1 if a
request failed (other than refusals at the connection cap, which are
counted), if the guest died, or on a timeout; 2 on a usage error.

Python 3 standard library only. See README.md beside this file.
"""

import argparse
import http.client
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import (  # noqa: E402
    MIB, BenchError, log, nonnegative_int, positive_int, quote,
)

benchlib.PROG = "storm-bench"

# The hotplug slots the cycles rotate through: (label, topology node id).
TOPOLOGY = [
    "id=rp0,type=root-port,hotplug=native",
    "id=rp1,type=root-port,hotplug=native",
    "id=rp2,type=root-port",
    "id=sw0,type=switch,parent=rp2,downstream=2",
    "id=rp3,type=root-port",
    "id=br0,type=pci-bridge,parent=rp3,hotplug=acpi",
]
# The slot kinds the cycles rotate through: (label, node id, or the node
# type to look up in vm.info: the switch's downstream port and the root
# bus are named by arbor).
PLACES = [("native root port", "rp0"), ("native root port", "rp1"),
          ("native switch port", "pcie_switch_downstream_port"), ("acpi bridge", "br0"),
          ("acpi root bus", "root_bus")]

PCI_LINE = re.compile(r"pci [0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.\d: \[1af4:(104[24])\]")
DEVICE_IDS = {"disk": "1042", "rng": "1044"}


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="storm-bench.py",
        description="Boot the guest kit under arbor, then hotplug and unplug devices many times "
        "and hammer the API with concurrent clients; print what grew and what slowed.",
        epilog="See resources/bench/README.md.",
    )
    p.add_argument("--cycles", type=nonnegative_int, default=1000,
                   help="hotplug/unplug cycles (default 1000)")
    p.add_argument("--clients", type=positive_int, default=200,
                   help="concurrent API clients in each storm (default 200)")
    p.add_argument("--requests", type=positive_int, default=10,
                   help="requests per client in each storm (default 10)")
    p.add_argument("--pollers", type=nonnegative_int, default=4,
                   help="background clients polling vm.info during the cycles (default 4)")
    p.add_argument("--memory-per-disk", type=positive_int, metavar="N",
                   help="instead of the storm: hot-plug N disks (each its own image) one after "
                   "another, each waited for in the guest, and print the VMM's memory outside "
                   "guest RAM before and after, per disk, and where it grew (smaps)")
    args = benchlib.parse_arbor_vm_args(p, argv, cpus=1, op_timeout=60.0)
    for spec in TOPOLOGY:
        args.arbor_extra += ["--pci-port", spec]
    # A busy emulated guest may take longer than the default 10 s to release.
    args.arbor_extra += ["--remove-timeout", f"{args.op_timeout:g}"]
    return args


# ---------------------------------------------------------------------------
# Sampling the VMM
# ---------------------------------------------------------------------------


def sample(pid, memory):
    """Descriptors, threads and RSS outside guest RAM (KiB) of PID."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    status = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            status[k] = v.split()
    ram, _ = benchlib.guest_ram_mappings(benchlib.read_smaps(pid), memory)
    ram_rss = sum(m.get("Rss", 0) for m in ram)
    return {
        "fds": fds,
        "threads": int(status["Threads"][0]),
        "rss_outside_ram_kib": int(status["VmRSS"][0]) - ram_rss,
    }


# ---------------------------------------------------------------------------
# API clients
# ---------------------------------------------------------------------------


def storm(sock, clients, requests, timeout):
    """CLIENTS threads at once, each sending REQUESTS requests, each on a new
    connection. Returns (latencies in ms, refused, failures)."""
    lat, refused, failures = [], [0], []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(k):
        try:
            start.wait(timeout)
        except threading.BrokenBarrierError:
            pass
        for i in range(requests):
            path = "/api/v1/vmm.ping" if (k + i) % 2 == 0 else "/api/v1/vm.info"
            conn = benchlib.UnixHTTPConnection(sock, timeout)
            t0 = time.monotonic()
            try:
                conn.request("GET", path)
                r = conn.getresponse()
                r.read()
                dt = (time.monotonic() - t0) * 1e3
                with lock:
                    if r.status == 200:
                        lat.append(dt)
                    elif r.status == 503:
                        refused[0] += 1
                    else:
                        failures.append(f"GET {path}: HTTP {r.status}")
            except (OSError, http.client.HTTPException) as e:
                # A connection evicted or refused at the cap is closed
                # without an answer; one beyond the backlog is refused.
                with lock:
                    # EAGAIN: the listen backlog is full (connect on a
                    # UNIX socket does not wait when a timeout is set).
                    if isinstance(e, (ConnectionResetError, http.client.RemoteDisconnected,
                                      BrokenPipeError, BlockingIOError)):
                        refused[0] += 1
                    else:
                        failures.append(f"GET {path}: {type(e).__name__}: {e}")
            finally:
                conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, refused[0], failures


class Pollers:
    """N background clients polling vm.info on keep-alive connections."""

    def __init__(self, sock, n, timeout):
        self.sock, self.timeout = sock, timeout
        self.stop_flag = threading.Event()
        self.lat, self.failures = [], []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def run(self):
        conn = None
        while not self.stop_flag.is_set():
            if conn is None:
                conn = benchlib.UnixHTTPConnection(self.sock, self.timeout)
            t0 = time.monotonic()
            try:
                conn.request("GET", "/api/v1/vm.info")
                r = conn.getresponse()
                r.read()
                if r.status != 200:
                    with self.lock:
                        self.failures.append(f"vm.info: HTTP {r.status}")
                else:
                    with self.lock:
                        self.lat.append((time.monotonic() - t0) * 1e3)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = None
            self.stop_flag.wait(0.05)
        if conn is not None:
            conn.close()

    def stop(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join()


# ---------------------------------------------------------------------------
# Hotplug cycles
# ---------------------------------------------------------------------------


def resolve_places(vm):
    """PLACES with node types replaced by the id of the first such node that
    can hot-plug, from vm.info."""
    conn = vm.connect()
    try:
        _, body = vm.request(conn, "GET", "/api/v1/vm.info", expect=(200,))
    finally:
        conn.close()
    nodes = json.loads(body).get("topology", [])
    places = []
    for label, want in PLACES:
        if any(n.get("id") == want for n in nodes):
            places.append((label, want))
            continue
        found = [n["id"] for n in nodes
                 if n.get("type") == want and n.get("hotplug") not in (None, "none")]
        if not found:
            raise BenchError(f"no hotplug-capable {want} in vm.info: {nodes}")
        places.append((label, found[0]))
    return places


def cycles(vm, args, workdir, places):
    """Runs the hotplug cycles; returns one record per cycle."""
    conn = vm.connect()
    disk = os.path.join(workdir, "storm.img")
    with open(disk, "wb") as f:
        f.truncate(4 * MIB)
    records = []
    try:
        for i in range(args.cycles):
            label, port = places[i % len(places)]
            kind = "disk" if (i // len(places)) % 2 == 0 else "rng"
            dev_id = f"storm{i}"
            body = {"id": dev_id, "port": port}
            if kind == "disk":
                body["path"] = disk
            mark = vm.console.mark()
            t0 = time.monotonic()
            add_ms, payload = vm.request(conn, "PUT", f"/api/v1/vm.add-{kind}", body,
                                         expect=(200,))
            pci_path = json.loads(payload).get("pci_path")
            want = DEVICE_IDS[kind]
            try:
                _, t, _, _ = vm.console.wait_for(
                    lambda line: (m := PCI_LINE.search(line)) and m.group(1) == want,
                    mark, t0 + args.op_timeout)
            except benchlib.StreamTimeout:
                raise vm.fail(f"cycle {i}: the guest did not enumerate {dev_id} ({kind} at "
                              f"{pci_path}, {label}) within {args.op_timeout:g} s")
            except (benchlib.StreamEof, benchlib.StreamFatal):
                raise vm.fail(f"cycle {i}: the guest died after adding {dev_id}")
            seen_ms = (t - t0) * 1e3
            remove_ms, _ = vm.request(conn, "PUT", "/api/v1/vm.remove-device", {"id": dev_id})
            records.append({"cycle": i, "kind": kind, "place": label, "pci_path": pci_path,
                            "add_ms": add_ms, "enumerated_ms": seen_ms, "remove_ms": remove_ms})
            if (i + 1) % 50 == 0:
                log(f"{i + 1}/{args.cycles} cycles")
    finally:
        conn.close()
    return records


# ---------------------------------------------------------------------------
# Memory per hot-plugged disk
# ---------------------------------------------------------------------------


def memory_sample(pid, memory):
    """RSS outside guest RAM (KiB) of PID, and its mappings outside guest RAM
    keyed by (start, end, path) with their Rss."""
    maps = benchlib.read_smaps(pid)
    ram, _ = benchlib.guest_ram_mappings(maps, memory)
    ram_starts = {m["start"] for m in ram}
    rest = {(m["start"], m["end"], m["path"] or "[anon]"): m.get("Rss", 0)
            for m in maps if m["start"] not in ram_starts}
    with open(f"/proc/{pid}/status") as f:
        status = {k: v.split() for k, _, v in (ln.partition(":") for ln in f)}
    rss = int(status["VmRSS"][0]) - sum(m.get("Rss", 0) for m in ram)
    hwm = int(status["VmHWM"][0]) - sum(m.get("Rss", 0) for m in ram)
    return {"rss_kib": rss, "peak_kib": hwm, "threads": int(status["Threads"][0]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}, rest


def mapping_kind(key):
    start, end, path = key
    if path == "[heap]":
        return "[heap]"
    if path.startswith("["):
        return path if path != "[anon]" else f"anon {((end - start) >> 10)} KiB"
    return "file " + os.path.basename(path)


def smaps_by_kind(maps):
    """Resident KiB outside guest RAM per kind of mapping, largest first."""
    kinds = {}
    for key, rss in maps.items():
        if rss:
            k = mapping_kind(key)
            kinds[k] = kinds.get(k, 0) + rss
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def smaps_growth(before, after):
    """Where RSS outside guest RAM grew: KiB per kind of mapping, counting
    new mappings and growth of existing ones (shrinkage counted too)."""
    kinds = {}
    for key in set(before) | set(after):
        d = after.get(key, 0) - before.get(key, 0)
        if d:
            k = mapping_kind(key)
            n_new = 1 if key not in before else 0
            kk = kinds.setdefault(k, [0, 0])
            kk[0] += d
            kk[1] += n_new
    return dict(sorted(kinds.items(), key=lambda kv: -abs(kv[1][0])))


def memory_per_disk(vm, args, workdir):
    n = args.memory_per_disk
    time.sleep(args.settle)
    s0, m0 = memory_sample(vm.proc.pid, args.memory)
    log(f"before: {s0}; adding {n} disks")
    sw = mw = None
    for i in range(n):
        if i == 1:
            # After the first disk: code paths used once (text pages, first
            # allocations) are in; what follows is the cost of each more disk.
            time.sleep(args.settle)
            sw, mw = memory_sample(vm.proc.pid, args.memory)
            log(f"after the first disk: {sw}")
        mark, t0, _, pci_path = vm.add_blank_disk(workdir, f"mem{i}")
        try:
            # The driver has bound (and activated the device) when the
            # guest reports the disk's size.
            vm.console.wait_for(lambda line: "virtio_blk" in line and "blocks" in line,
                                mark, t0 + args.op_timeout)
        except benchlib.StreamTimeout:
            raise vm.fail(f"disk {i} ({pci_path}): no virtio_blk line within "
                          f"{args.op_timeout:g} s")
        except (benchlib.StreamEof, benchlib.StreamFatal):
            raise vm.fail(f"the guest died after adding disk {i}")
    time.sleep(args.settle)
    s1, m1 = memory_sample(vm.proc.pid, args.memory)
    log(f"after: {s1}")
    return s0, sw, s1, smaps_growth(mw or m0, m1), smaps_by_kind(m0)


def memory_main(args, vm, workdir):
    load_start = benchlib.loadavg()
    s0, sw, s1, growth, at_boot = memory_per_disk(vm, args, workdir)
    load_end = benchlib.loadavg()
    if vm.proc.poll() is not None:
        raise vm.fail("arbor exited during the benchmark")
    n = args.memory_per_disk
    per_disk = (s1["rss_kib"] - s0["rss_kib"]) / n
    marginal = (s1["rss_kib"] - sw["rss_kib"]) / (n - 1) if sw else None
    print()
    print(f"Memory per hot-plugged disk: {n} disks, {args.kernel}, {args.cpus} vCPU(s), "
          f"{args.memory // MIB} MiB")
    sw_ = sw or {}
    print(f"  {'':34} {'before':>9} {'1 disk':>9} {'after':>9}")
    for key, title in (("rss_kib", "RSS outside guest RAM (KiB)"),
                       ("peak_kib", "peak RSS outside guest RAM (KiB)"),
                       ("threads", "threads"), ("fds", "open descriptors")):
        print(f"  {title:34} {s0[key]:>9} {sw_.get(key, '-'):>9} {s1[key]:>9}")
    print(f"  per disk, all {n}: {per_disk:.1f} KiB")
    if marginal is not None:
        print(f"  per disk after the first (disks 2-{n}): {marginal:.1f} KiB")
    print(f"  growth by mapping{' after the first disk' if sw else ''} (KiB, new mappings):")
    for k, (kib, new) in list(growth.items())[:12]:
        print(f"    {k:40} {kib:>7} {new:>5}")
    print("  resident outside guest RAM before the disks, by mapping (KiB):")
    for k, kib in list(at_boot.items())[:10]:
        print(f"    {k:40} {kib:>7}")
    print(f"  load average (1 min): {load_start} at start, {load_end} at end")
    print()
    print(json.dumps({"mode": "memory-per-disk", "before_by_mapping": at_boot, "disks": n, "before": s0, "after_first": sw,
                      "after": s1, "per_disk_kib": round(per_disk, 1),
                      "per_disk_after_first_kib": None if marginal is None else round(marginal, 1),
                      "growth": {k: v[0] for k, v in growth.items()},
                      "loadavg_at_start": load_start, "loadavg_at_end": load_end,
                      "command": vm.argv}, separators=(",", ":")), flush=True)
    return 0


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def row(title, s):
    if s is None:
        return f"  {title:34} {'-':>6}"
    return (f"  {title:34} {s['n']:>6} {s['median']:>9.2f} {s['p99']:>9.2f} {s['min']:>9.2f} "
            f"{s['max']:>9.2f}")


def main(argv):
    args = parse_args(argv)
    kit, binary, others = benchlib.prepare_arbor(args)
    workdir = tempfile.mkdtemp(prefix="storm-bench.")
    vm = benchlib.ArborVm(binary, kit, workdir, args)
    log(" ".join(quote(a) for a in vm.argv))
    try:
        log(f"booting (timeout {args.timeout:g} s)")
        boot_s = vm.boot()
        if args.memory_per_disk:
            log(f"'Run /init' after {boot_s:.1f} s")
            return memory_main(args, vm, workdir)
        places = resolve_places(vm)
        load_start = benchlib.loadavg()
        s0 = sample(vm.proc.pid, args.memory)
        log(f"'Run /init' after {boot_s:.1f} s; storm of {args.clients} clients")
        lat0, refused0, fail0 = storm(vm.sock, args.clients, args.requests, args.op_timeout)
        s1 = sample(vm.proc.pid, args.memory)
        log(f"{args.cycles} hotplug cycles")
        pollers = Pollers(vm.sock, args.pollers, args.op_timeout)
        try:
            recs = cycles(vm, args, workdir, places)
        finally:
            pollers.stop()
        s2 = sample(vm.proc.pid, args.memory)
        log(f"second storm of {args.clients} clients")
        lat1, refused1, fail1 = storm(vm.sock, args.clients, args.requests, args.op_timeout)
        s3 = sample(vm.proc.pid, args.memory)
        load_end = benchlib.loadavg()
        if vm.proc.poll() is not None:
            raise vm.fail("arbor exited during the benchmark")
    finally:
        vm.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    failures = fail0 + fail1 + pollers.failures
    tenth = max(1, len(recs) // 10)
    first, last = recs[:tenth], recs[-tenth:]
    d = benchlib.describe
    stats = {
        "storm_start_ms": d(lat0), "storm_end_ms": d(lat1),
        "refused_start": refused0, "refused_end": refused1,
        "pollers_ms": d(pollers.lat),
        "add_ms_first": d([r["add_ms"] for r in first]),
        "add_ms_last": d([r["add_ms"] for r in last]),
        "enumerated_ms_first": d([r["enumerated_ms"] for r in first]),
        "enumerated_ms_last": d([r["enumerated_ms"] for r in last]),
        "remove_ms_first": d([r["remove_ms"] for r in first]),
        "remove_ms_last": d([r["remove_ms"] for r in last]),
    }
    by_place = {}
    for label, _ in PLACES:
        rs = [r for r in recs if r["place"] == label]
        by_place[label] = {"add_ms": d([r["add_ms"] for r in rs]),
                           "remove_ms": d([r["remove_ms"] for r in rs])}

    print()
    print(f"Storm benchmark: {args.kernel}, {args.cpus} vCPU(s), {args.memory // MIB} MiB; "
          f"{len(recs)} hotplug cycles; storms of {args.clients} clients x {args.requests} "
          f"requests")
    print(f"  {'VMM':34} {'boot':>9} {'storm 1':>9} {'cycles':>9} {'storm 2':>9}")
    for key, title in (("fds", "open descriptors"), ("threads", "threads"),
                       ("rss_outside_ram_kib", "RSS outside guest RAM (KiB)")):
        print(f"  {title:34} {s0[key]:>9} {s1[key]:>9} {s2[key]:>9} {s3[key]:>9}")
    head = f"  {'latency (ms)':34} {'n':>6} {'median':>9} {'p99':>9} {'min':>9} {'max':>9}"
    print(head)
    print("  " + "-" * (len(head) - 2))
    print(row("storm 1 (new connection each)", stats["storm_start_ms"]))
    print(row("storm 2 (new connection each)", stats["storm_end_ms"]))
    print(row("vm.info pollers during cycles", stats["pollers_ms"]))
    for k in ("add", "enumerated", "remove"):
        print(row(f"{k}, first {tenth} cycles", stats[f"{k}_ms_first"]))
        print(row(f"{k}, last {tenth} cycles", stats[f"{k}_ms_last"]))
    for label, v in by_place.items():
        print(row(f"add, {label}", v["add_ms"]))
        print(row(f"remove, {label}", v["remove_ms"]))
    print(f"  refused (connection cap or full backlog): {refused0} (storm 1), "
          f"{refused1} (storm 2)")
    print(f"  load average (1 min): {load_start} at start, {load_end} at end")
    if failures:
        print(f"  FAILURES: {len(failures)}; first: {failures[:5]}")
    print()
    out = {
        "arbor": binary, "cpus": args.cpus, "memory_mib": args.memory // MIB,
        "cycles": len(recs), "clients": args.clients, "requests": args.requests,
        "boot_s": round(boot_s, 3), "samples": [s0, s1, s2, s3], "stats": stats,
        "by_place": by_place, "failures": failures[:20],
        "loadavg_at_start": load_start, "loadavg_at_end": load_end,
        "other_vmms_at_start": others, "command": vm.argv,
    }
    print(json.dumps(out, separators=(",", ":")), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    benchlib.run_main(main)
