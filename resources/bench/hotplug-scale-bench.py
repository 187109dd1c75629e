#!/usr/bin/python3
"""Hotplug scale benchmark: does each hot-plugged disk cost the same as the
first, up to hundreds of devices in one guest?

Boots the guest kit once under arbor with a topology made of many slots of
one hotplug mechanism, then hot-plugs --devices disks one after another
(each its own 1 MiB image, none removed) into those slots in order, and
times each one: the add request's round trip, the request to the guest's
`pci ...: [1af4:1042]` line (the guest found the device) and to its
`virtio_blk ... logical blocks` line (the driver bound and started it).

Mechanisms (--mechanism, one per boot; repeat the option for several):

  acpi    PCI bridges with 32 ACPI hotplug slots each, on the root bus
          (bridge 0 is filled first, then bridge 1, ...);
  native  PCIe switches with 32 downstream ports (native hotplug) each,
          behind root ports. One PCI segment has 256 bus numbers and every
          native slot takes one (plus two per switch), so at most 7
          switches (224 slots) fit; --devices above that is refused;
  root    the ACPI slots of the root bus (30: slots 02-1f).

The guest runs out of interrupt vectors before the slots run out: the
kit's kernel is built for one CPU, which has about 200 vectors for
devices; a one-queue virtio-blk takes two (configuration and queue
MSI-X vectors) and a native port one. The defaults fit (96 ACPI disks,
64 native ones); a larger --devices is refused with one vCPU.

Prints, per mechanism, the medians per block of --window devices, and the
median of the last --window over the first --window for each time (the
flatness ratio), the load average, then one line of JSON. Exit status 1 on a
failed request, a guest that died or a timeout; 2 on a usage error.

Python 3 standard library only. See README.md beside this file.
"""

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import MIB, log, positive_int, quote  # noqa: E402

benchlib.PROG = "hotplug-scale-bench"

SLOTS_PER_NODE = 32
MAX_SWITCHES = 7  # 7 x (32 downstream + upstream + root port) = 238 buses
PCI_LINE = re.compile(r"pci [0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.\d: \[1af4:1042\]")


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="hotplug-scale-bench.py",
        description="Hot-plug many disks one after another into one guest under arbor and "
        "compare the cost of the last ones with the first ones.")
    p.add_argument("--mechanism", action="append", choices=("acpi", "native", "root"),
                   help="slot kind to fill, one boot each; repeatable (default: acpi, native)")
    p.add_argument("--devices", type=positive_int, default=None, metavar="N",
                   help="disks to hot-plug per mechanism (default 96 for acpi, 64 for native, "
                   "30 for root; at most 256, 224 and 30 slots, and as many as the guest has "
                   "interrupt vectors for)")
    p.add_argument("--window", type=positive_int, default=None, metavar="K",
                   help="devices per block; the ratio compares the last K with the first K "
                   "(default 32, or half the disks when fewer than 64)")
    args = benchlib.parse_arbor_vm_args(p, argv, cpus=1, op_timeout=120.0)
    args.mechanism = args.mechanism or ["acpi", "native"]
    for m in args.mechanism:
        n = devices_for(args, m)
        cap = capacity(m)
        if n > cap:
            p.error(f"--devices {n}: the {m} topology has {cap} slots")
        if args.window is not None and n < 2 * args.window:
            p.error(f"--devices {n} is fewer than two windows of {args.window}")
        if n < 2:
            p.error("--devices: at least 2 (a first and a last window)")
        if args.cpus == 1 and vectors_needed(m, n) > GUEST_VECTORS:
            p.error(f"--devices {n}: the guest kit's one-CPU kernel has about "
                    f"{GUEST_VECTORS} interrupt vectors, and {n} {m} disks need "
                    f"{vectors_needed(m, n)}")
    return args


# Interrupt vectors a one-CPU x86 Linux guest (the kit's kernel is built
# without SMP) has for devices: measured, the 102nd disk on ACPI bridges
# found none left.
GUEST_VECTORS = 200


def vectors_needed(mechanism, n):
    """Vectors N disks take: a one-queue virtio-blk has two MSI-X vectors
    (configuration and queue); every native port (all of a switch's, from
    boot) one for its port services."""
    ports = -(-n // SLOTS_PER_NODE) * (SLOTS_PER_NODE + 1) if mechanism == "native" else 0
    return 2 * n + ports


def window_for(args, n):
    return args.window if args.window is not None else min(32, n // 2)


def capacity(mechanism):
    # The root bus: slots 02-1f (00 is the host bridge, 01 the root port).
    return {"acpi": 8 * SLOTS_PER_NODE, "native": MAX_SWITCHES * SLOTS_PER_NODE,
            "root": 30}[mechanism]


# Disks by default: as many as the guest has interrupt vectors for, in
# whole bridges or switches (see GUEST_VECTORS).
DEFAULT_DEVICES = {"acpi": 96, "native": 64, "root": 30}


def devices_for(args, mechanism):
    return args.devices if args.devices is not None else DEFAULT_DEVICES[mechanism]


def topology(mechanism, n):
    """(--pci-port specs, the port to plug device I into)."""
    nodes = -(-n // SLOTS_PER_NODE)
    if mechanism == "acpi":
        specs = [f"id=br{i},type=pci-bridge,hotplug=acpi" for i in range(nodes)]
        return specs, lambda i: {"port": f"br{i // SLOTS_PER_NODE}"}
    if mechanism == "native":
        specs = []
        for i in range(nodes):
            specs.append(f"id=rp{i},type=root-port,hotplug=none")
            # 1 MiB of 32-bit window per downstream port: 224 of the
            # default 8 MiB would not fit below 4 GiB.
            specs.append(f"id=sw{i},type=switch,parent=rp{i},downstream={SLOTS_PER_NODE},"
                         "mem-reserve=1M")
        return specs, lambda i: {"port": f"sw{i // SLOTS_PER_NODE}.{i % SLOTS_PER_NODE}"}
    # The root bus: one root port without hotplug, so that the root bus's
    # remaining slots are its ACPI slots.
    return (["id=rp0,type=root-port,hotplug=none"],
            lambda i: {"port": "root"})


def fill(vm, args, workdir, place, n):
    recs = []
    for i in range(n):
        mark, t0, add_ms, pci_path = vm.add_blank_disk(workdir, f"d{i}", **place(i))
        deadline = t0 + args.op_timeout
        try:
            _, t_pci, _, _ = vm.console.wait_for(lambda line: PCI_LINE.search(line), mark,
                                                 deadline)
            _, t_blk, _, _ = vm.console.wait_for(
                lambda line: "virtio_blk" in line and "logical blocks" in line, mark, deadline)
        except benchlib.StreamTimeout:
            raise vm.fail(f"disk {i} ({pci_path}): not bound within {args.op_timeout:g} s")
        except (benchlib.StreamEof, benchlib.StreamFatal):
            raise vm.fail(f"the guest died after adding disk {i} ({pci_path})")
        rec = {"i": i, "pci_path": pci_path, "add_ms": round(add_ms, 3),
               "enumerated_ms": round((t_pci - t0) * 1e3, 1),
               "bound_ms": round((t_blk - t0) * 1e3, 1)}
        recs.append(rec)
        log(f"disk {i} {pci_path}: add {add_ms:.2f} ms, pci line {rec['enumerated_ms']:.0f} ms, "
            f"virtio_blk line {rec['bound_ms']:.0f} ms")
        # Let the guest finish with this disk (its partition scan and the
        # rest of the driver's work) before the next one, so each is timed
        # alone, as hotplug-bench.py does.
        vm.console.wait_quiet(args.settle, time.monotonic() + args.op_timeout)
    return recs


def median(xs):
    d = benchlib.describe(xs)
    return d["median"] if d else None


def run_one(args, kit, binary, mechanism):
    n = devices_for(args, mechanism)
    specs, place = topology(mechanism, n)
    opts = argparse.Namespace(**vars(args))
    opts.arbor_extra = list(args.arbor_extra)
    for s in specs:
        opts.arbor_extra += ["--pci-port", s]
    if mechanism == "root":
        # Every free root slot, not only the default's highest 2.
        opts.arbor_extra += ["--acpi-root-slots", "all"]
    workdir = tempfile.mkdtemp(prefix="hotplug-scale-bench.")
    vm = benchlib.ArborVm(binary, kit, workdir, opts)
    log(" ".join(quote(a) for a in vm.argv))
    try:
        log(f"{mechanism}: booting (timeout {args.timeout:g} s)")
        boot_s = vm.boot()
        log(f"{mechanism}: 'Run /init' after {boot_s:.1f} s; {n} disks")
        load_start = benchlib.loadavg()
        recs = fill(vm, args, workdir, place, n)
        load_end = benchlib.loadavg()
        if vm.proc.poll() is not None:
            raise vm.fail("arbor exited during the benchmark")
    finally:
        vm.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    k = window_for(args, n)
    blocks = []
    for b in range(0, n, k):
        rs = recs[b:b + k]
        blocks.append({"first": b, "n": len(rs),
                       **{key: median([r[key] for r in rs])
                          for key in ("add_ms", "enumerated_ms", "bound_ms")}})
    ratios = {}
    for key in ("add_ms", "enumerated_ms", "bound_ms"):
        first = median([r[key] for r in recs[:k]])
        last = median([r[key] for r in recs[-k:]])
        ratios[key] = round(last / first, 3) if first else None
    return {"mechanism": mechanism, "devices": n, "cpus": args.cpus, "window": k,
            "boot_s": round(boot_s, 3),
            "blocks": blocks, "ratio_last_over_first": ratios,
            "loadavg_at_start": load_start, "loadavg_at_end": load_end,
            "per_device": recs, "command": vm.argv}


def main(argv):
    args = parse_args(argv)
    kit, binary, others = benchlib.prepare_arbor(args)
    results = [run_one(args, kit, binary, m) for m in args.mechanism]
    print()
    print(f"Hotplug scale: {args.kernel}, {args.memory // MIB} MiB; "
          "disks hot-plugged one after another, medians per block (ms)")
    for r in results:
        print(f"  {r['mechanism']}: {r['devices']} disks, {r['cpus']} vCPU(s), blocks of "
              f"{r['window']}; load average "
              f"{r['loadavg_at_start']} "
              f"at start, {r['loadavg_at_end']} at end")
        print(f"    {'disks':>9} {'add request':>12} {'to pci line':>12} {'to virtio_blk':>14}")
        for b in r["blocks"]:
            span = f"{b['first']}-{b['first'] + b['n'] - 1}"
            print(f"    {span:>9} {b['add_ms']:>12.2f} {b['enumerated_ms']:>12.0f} "
                  f"{b['bound_ms']:>14.0f}")
        q = r["ratio_last_over_first"]
        print(f"    {'last/first':>9} {q['add_ms']:>12} {q['enumerated_ms']:>12} "
              f"{q['bound_ms']:>14}")
    print()
    print(json.dumps({"memory_mib": args.memory // MIB,
                      "other_vmms_at_start": others,
                      "results": results}, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    benchlib.run_main(main)
