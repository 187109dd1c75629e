#!/usr/bin/python3
"""Runs schemathesis against arbor's API: api/openapi.json and a running VM.

Boots the guest kit under arbor with an API socket, forwards a local TCP
port to that socket (schemathesis speaks HTTP over TCP only), and runs
`schemathesis run api/openapi.json` over every documented operation except
the two that end the VM (vm.shutdown, vmm.shutdown), which are then checked
last, once each, and the event stream (vm.events), which never ends. Checks: no 5xx answer, every status code, content type,
header and body as documented, and malformed input refused (4xx).

Exit status: schemathesis's (0 when every check passed), 1 when arbor died
or a final check failed, 2 on a usage error.

Needs `schemathesis` (PyPI) on PATH or --schemathesis. Python 3 standard
library otherwise. See README.md beside this file.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import MIB, BenchError, log, positive_float, positive_int, quote  # noqa: E402

benchlib.PROG = "api-schema-check"

CHECKS = ",".join([
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "unsupported_method",
])
ENDING = ("/api/v1/vm.shutdown", "/api/v1/vmm.shutdown")
# Never answered in full: a kept-open stream (tests/tests/lifecycle.rs
# covers it).
STREAMS = ("/api/v1/vm.events",)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="api-schema-check.py", description=__doc__.split("\n")[0])
    p.add_argument("--max-time", type=positive_int, default=60, metavar="SECONDS",
                   help="schemathesis's time budget (default 60)")
    p.add_argument("--schemathesis", default="schemathesis", metavar="PATH",
                   help="the schemathesis command (default: schemathesis on PATH)")
    p.add_argument("--timeout", type=positive_float, default=180.0, metavar="SECONDS",
                   help="seconds the guest may take to reach 'Run /init' (default 180)")
    p.add_argument("--guest-dir", default=benchlib.default_guest_dir(),
                   help="guest kit directory (default $ARBOR_GUEST_DIR, else <repo>/target/guest)")
    p.add_argument("--arbor", metavar="PATH",
                   help="arbor binary (default target/release/arbor, built when missing or stale)")
    p.add_argument("--no-build", action="store_true",
                   help="use target/release/arbor even if it is older than the sources")
    args = p.parse_args(argv)
    # What ArborVm reads.
    args.cpus, args.memory, args.settle, args.stop_grace = 1, 256 * MIB, 0.0, 5.0
    args.op_timeout = 30.0
    args.arbor_extra = ["--pci-port", "id=rp0,type=root-port,hotplug=native",
                        "--pci-port", "id=br0,type=pci-bridge,hotplug=acpi"]
    return args


class Forwarder:
    """Forwards connections to 127.0.0.1:PORT to a UNIX socket."""

    def __init__(self, unix_path):
        self.unix_path = unix_path
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                upstream.connect(self.unix_path)
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def pipe(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


def main(argv):
    args = parse_args(argv)
    st = shutil.which(args.schemathesis)
    if st is None:
        raise BenchError(f"no {args.schemathesis} on PATH (pip install schemathesis)")
    kit = benchlib.guest_kit(args.guest_dir, "vmlinux")
    benchlib.check_kvm()
    binary = benchlib.find_arbor(args.arbor, packages=("vmm", "api"),
                                 rebuild_stale=not args.no_build, attempts=10)
    workdir = tempfile.mkdtemp(prefix="api-schema-check.")
    vm = benchlib.ArborVm(binary, kit, workdir, args)
    log(" ".join(quote(a) for a in vm.argv))
    fwd = None
    try:
        boot_s = vm.boot()
        log(f"'Run /init' after {boot_s:.1f} s")
        fwd = Forwarder(vm.sock)
        exclude = []
        for path in ENDING + STREAMS:
            exclude += ["--exclude-path", path]
        cmd = [st, "run", os.path.join(benchlib.REPO, "api", "openapi.json"),
               "--url", f"http://127.0.0.1:{fwd.port}", "--checks", CHECKS,
               "--max-time", str(args.max_time), "--workers", "1",
               "--request-timeout", "30", "--suppress-health-check", "all"] + exclude
        log(" ".join(quote(a) for a in cmd))
        status = subprocess.run(cmd, cwd=workdir).returncode
        if vm.proc.poll() is not None:
            raise vm.fail("arbor exited while schemathesis ran")
        # The VM still answers, then the two ending operations answer as documented.
        conn = vm.connect()
        try:
            _, body = vm.request(conn, "GET", "/api/v1/vm.info", expect=(200,))
            json.loads(body)
            vm.request(conn, "PUT", "/api/v1/vm.resume", expect=(204, 409))
            vm.request(conn, "PUT", "/api/v1/vm.shutdown", expect=(204,))
        finally:
            conn.close()
        log(f"schemathesis exit status {status}; vm.info, vm.resume and vm.shutdown answered")
        return status
    finally:
        if fwd is not None:
            fwd.close()
        vm.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    benchlib.run_main(main)
