"""Helpers shared by the benchmarks in this directory (boot-bench.py,
hotplug-bench.py, pause-bench.py): argument types, the guest kit, finding (and if asked,
building) arbor and QEMU, stopping a VMM, facts about the machine's load.

Python 3 standard library only. The scripts import it from their own
directory with bytecode writing off, so no __pycache__ appears in the tree.
"""

import argparse
import hashlib
import http.client
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

MIB = 1 << 20

# The minimal arbor topology: one root port and no hotplug slot at all (no
# hotplug port, no ACPI slot on the root bus): what a CI boot that hot-plugs
# nothing needs.
ARBOR_MINIMAL = ["--pci-port", "id=rp0,type=root-port,hotplug=none", "--acpi-root-slots", "0"]

# The default topology's eight native root ports plus br0, a PCI bridge
# with 32 ACPI slots and an I/O window at root slot 09, and ACPI hotplug
# on every free root slot (the default until 1 Dec 2026): for the scripts
# that compare hotplug into a root port, an ACPI bridge and the root bus.
ARBOR_WITH_ACPI_BRIDGE = [a for i in range(8)
                          for a in ("--pci-port", f"id=rp{i},type=root-port")] + [
    "--pci-port", "id=br0,type=pci-bridge,io-reserve=4K", "--acpi-root-slots", "all"]

# Set by each script to its own name; prefixes progress and error messages.
PROG = "bench"


class BenchError(Exception):
    """A failure that ends the benchmark with a message."""


def log(msg):
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Argument types
# ---------------------------------------------------------------------------


def parse_size(s):
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", s, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size '{s}': expected e.g. 512M or 2G")
    n = int(m.group(1))
    shift = {"": 20, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]
    size = n << shift
    if size == 0 or size % MIB:
        raise argparse.ArgumentTypeError(f"invalid size '{s}': must be a positive multiple of 1 MiB")
    return size


def positive_int(s):
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not an integer")
    if n < 1:
        raise argparse.ArgumentTypeError(f"'{s}' must be at least 1")
    return n


def nonnegative_int(s):
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not an integer")
    if n < 0:
        raise argparse.ArgumentTypeError(f"'{s}' must not be negative")
    return n


def positive_float(s):
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not a number")
    if x <= 0:
        raise argparse.ArgumentTypeError(f"'{s}' must be positive")
    return x


def nonnegative_float(s):
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not a number")
    if x < 0:
        raise argparse.ArgumentTypeError(f"'{s}' must not be negative")
    return x


# ---------------------------------------------------------------------------
# Inputs: guest kit, arbor, QEMU
# ---------------------------------------------------------------------------


def load_script(filename, name):
    """Imports the script FILENAME beside this file (a name with a hyphen,
    which `import` cannot take) as the module NAME."""
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(os.path.dirname(os.path.abspath(__file__)), filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def default_guest_dir():
    """$ARBOR_GUEST_DIR, else <repo>/target/guest, else /tmp/guest if only
    that one exists."""
    env = os.environ.get("ARBOR_GUEST_DIR")
    if env:
        return env
    d = os.path.join(REPO, "target", "guest")
    if not os.path.isdir(d) and os.path.isdir("/tmp/guest"):
        return "/tmp/guest"
    return d


def guest_kit(guest_dir, kernel_name):
    """(kernel, initramfs, cmdline) of the guest kit in GUEST_DIR."""
    files = {name: os.path.join(guest_dir, name) for name in (kernel_name, "initramfs.cpio", "cmdline")}
    missing = [f for f in files.values() if not os.path.isfile(f)]
    if missing:
        raise BenchError(
            f"guest kit incomplete in {guest_dir}: missing {', '.join(missing)} "
            f"(build it with resources/guest-kit/build.sh)")
    with open(files["cmdline"]) as f:
        cmdline = " ".join(f.read().split())
    if not cmdline:
        raise BenchError(f"{files['cmdline']} is empty")
    return files[kernel_name], files["initramfs.cpio"], cmdline


# Where arbor's sources live, for the staleness check.
_SOURCE_DIRS = ("vmm", "api", "devices", "pci")
_SOURCE_FILES = ("Cargo.toml", "Cargo.lock")


def newest_source(repo=REPO):
    """(mtime, path) of the newest Rust source or manifest of the VMM's crates."""
    best = (0.0, None)
    for name in _SOURCE_FILES:
        p = os.path.join(repo, name)
        if os.path.isfile(p):
            best = max(best, (os.stat(p).st_mtime, p))
    for d in _SOURCE_DIRS:
        for root, dirs, files in os.walk(os.path.join(repo, d)):
            dirs[:] = [x for x in dirs if x not in ("target", ".git")]
            for f in files:
                if f.endswith((".rs", ".toml")):
                    p = os.path.join(root, f)
                    try:
                        best = max(best, (os.stat(p).st_mtime, p))
                    except OSError:
                        pass
    return best


def cargo_build(packages, attempts=1, wait=60.0):
    """`cargo build --release -p ...`, or resources/build-release.sh (the
    static arbor and arbor-remote) when PACKAGES include vmm; on failure (the
    tree may be mid-edit by others) waits WAIT seconds and tries again,
    ATTEMPTS times in all."""
    if "vmm" in packages:
        # It builds arbor and arbor-remote (vmm and api), nothing else.
        cmd = [os.path.join(REPO, "resources", "build-release.sh")]
    else:
        cmd = ["cargo", "build", "--release"]
        for p in packages:
            cmd += ["-p", p]
    for attempt in range(1, attempts + 1):
        log(f"running '{' '.join(cmd)}' (attempt {attempt}/{attempts}; may wait on cargo's lock)")
        r = subprocess.run(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=sys.stderr)
        if r.returncode == 0:
            return
        if attempt < attempts:
            log(f"build failed (status {r.returncode}); retrying in {wait:g} s")
            time.sleep(wait)
    raise BenchError(f"'{' '.join(cmd)}' failed {attempts} time(s)")


def target_dir():
    """Cargo's target directory: $CARGO_TARGET_DIR (relative to the
    repository, where cargo_build runs cargo), else <repo>/target."""
    return os.path.join(REPO, os.environ.get("CARGO_TARGET_DIR") or "target")


def find_arbor(explicit, packages=("vmm",), rebuild_stale=False, attempts=1):
    """The arbor binary to run.

    EXPLICIT (--arbor) is used as given. Otherwise target/release/arbor
    (under $CARGO_TARGET_DIR when set);
    with REBUILD_STALE it is (re)built when missing or older than the newest
    source, else built only when missing (and target/debug/arbor is taken,
    with a warning, when only that exists)."""
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise BenchError(f"--arbor {explicit}: not an executable file")
        return os.path.abspath(explicit)
    release = os.path.join(target_dir(), "release", "arbor")
    debug = os.path.join(target_dir(), "debug", "arbor")
    if rebuild_stale:
        have = os.path.isfile(release) and os.access(release, os.X_OK)
        if have:
            src_mtime, src = newest_source()
            if src_mtime <= os.stat(release).st_mtime:
                return release
            log(f"{release} is older than {os.path.relpath(src, REPO)}: rebuilding")
        else:
            log(f"no {release}: building it")
        cargo_build(packages, attempts=attempts)
        if not os.path.isfile(release):
            raise BenchError(f"the build finished but {release} does not exist")
        return release
    for path in (release, debug):
        if os.path.isfile(path) and os.access(path, os.X_OK):
            if path == debug:
                log(f"warning: no release build; using the debug build {debug}")
            return path
    log("no arbor binary: building it")
    cargo_build(packages)
    if not os.path.isfile(release):
        raise BenchError(f"the build finished but {release} does not exist")
    return release


def _which(q):
    for d in os.environ.get("PATH", "").split(os.pathsep):
        cand = os.path.join(d, q)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def find_qemu(q):
    """The QEMU binary Q (a name looked up in PATH, or a path). Debian's
    qemu-system-x86_64 is installed when it is missing and this runs as
    root (resources/guest-kit/install-deps.sh --qemu, which waits for
    another installation's lock); otherwise the error says what to run."""
    if os.sep not in q:
        found = _which(q)
        if found:
            return found
        install = [os.path.join(REPO, "resources", "guest-kit", "install-deps.sh"), "--qemu"]
        how = "apt-get install -y qemu-system-x86 (or: " + " ".join(install) + ")"
        if q != "qemu-system-x86_64":
            raise BenchError(f"{q} not found in PATH")
        if os.geteuid() != 0:
            raise BenchError(f"{q} not found in PATH; install it as root: {how}")
        log(f"{q} not found: installing Debian's qemu-system-x86 ({' '.join(install)})")
        r = subprocess.run(install, stdout=sys.stderr)
        found = _which(q)
        if r.returncode != 0 or not found:
            raise BenchError(f"installing QEMU failed (exit status {r.returncode}); run: {how}")
        return found
    if not (os.path.isfile(q) and os.access(q, os.X_OK)):
        raise BenchError(f"--qemu {q}: not an executable file")
    return q


def find_executable(path, option):
    """PATH given with OPTION: a name looked up in PATH, or a path to an
    executable file."""
    found = _which(path) if os.sep not in path else path
    if not found or not (os.path.isfile(found) and os.access(found, os.X_OK)):
        raise BenchError(f"{option} {path}: not an executable file")
    return found


def check_kvm():
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise BenchError("/dev/kvm is missing or not accessible")


# ---------------------------------------------------------------------------
# Processes and the machine
# ---------------------------------------------------------------------------


def other_guests(own_pid):
    """PIDs and names of other VMM processes running now (they skew timings)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == own_pid:
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        # comm is cut to 15 characters: "cloud-hyperviso".
        if comm.startswith(("qemu-system", "cloud-hypervis")) or comm == "arbor":
            found.append(f"{entry}:{comm}")
    return found


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def stop(proc, grace):
    """SIGTERM, then SIGKILL after GRACE seconds; reaps the process."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        proc.wait()


def tail_lines(data, n=25):
    if isinstance(data, (bytes, bytearray)):
        data = data.decode("utf-8", "replace")
    text = data.replace("\r", "")
    lines = [l for l in text.split("\n") if l.strip()]
    return "\n".join("    | " + l for l in lines[-n:]) or "    | (nothing)"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def quote(a):
    return a if re.fullmatch(r"[\w@%+=:,./-]+", a) else "'" + a.replace("'", "'\\''") + "'"


def on_sigterm(signum, frame):
    raise KeyboardInterrupt


def run_main(main):
    """Runs MAIN(argv) and exits: its status, 1 on BenchError, 130 when
    interrupted (SIGINT, SIGTERM, SIGHUP)."""
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGHUP, on_sigterm)
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


# ---------------------------------------------------------------------------
# Reading a VMM's output, talking to its API
# ---------------------------------------------------------------------------


class Stream:
    """Reads a pipe in a thread and keeps its complete lines, each with the
    time.monotonic() at which the chunk completing it arrived."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.lines = []  # (t, text)
        self.raw = bytearray()
        self.eof = False
        self.cond = threading.Condition()
        self._partial = b""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        fd = self.pipe.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            t = time.monotonic()
            with self.cond:
                if not chunk:
                    if self._partial:
                        self.lines.append((t, self._partial.decode("utf-8", "replace")))
                    self.eof = True
                    self.cond.notify_all()
                    return
                self.raw += chunk
                parts = (self._partial + chunk).split(b"\n")
                self._partial = parts.pop()
                for part in parts:
                    self.lines.append((t, part.rstrip(b"\r").decode("utf-8", "replace")))
                self.cond.notify_all()

    def mark(self):
        with self.cond:
            return len(self.lines)

    def text(self):
        with self.cond:
            return bytes(self.raw)

    def wait_for(self, match, start, deadline, fatal=("Kernel panic",)):
        """Waits for the first line from index START on for which MATCH(line)
        is true. Returns (index, time, line, MATCH's value), or raises
        StreamTimeout, StreamEof or StreamFatal(line)."""
        i = start
        with self.cond:
            while True:
                while i < len(self.lines):
                    t, line = self.lines[i]
                    m = match(line)
                    if m:
                        return i, t, line, m
                    for f in fatal:
                        if f in line:
                            raise StreamFatal(line)
                    i += 1
                if self.eof:
                    raise StreamEof()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StreamTimeout()
                self.cond.wait(min(remaining, 1.0))

    def wait_quiet(self, quiet, deadline):
        """Waits until no line has arrived for QUIET seconds (or DEADLINE)."""
        with self.cond:
            while True:
                last = self.lines[-1][0] if self.lines else 0.0
                now = time.monotonic()
                if now - last >= quiet or now >= deadline or self.eof:
                    return
                self.cond.wait(min(quiet - (now - last), deadline - now))


class StreamTimeout(Exception):
    """No matching line before the deadline."""


class StreamEof(Exception):
    """The stream closed first."""


class StreamFatal(Exception):
    """A fatal line (a guest panic) arrived first; args[0] is the line."""


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a UNIX socket."""

    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.unix_path)
        except OSError:
            s.close()
            raise
        self.sock = s


# ---------------------------------------------------------------------------
# arbor with the guest kit
# ---------------------------------------------------------------------------


def parse_arbor_vm_args(p, argv, cpus, op_timeout, settle=True, timeout_what="reach 'Run /init'"):
    """Adds the options of a benchmark that boots the guest kit under arbor
    (what ArborVm reads) to the parser P, parses ARGV and returns the
    arguments, with arbor_extra split from --arbor-args. Without SETTLE there
    is no --settle option and settle is 0. TIMEOUT_WHAT says in --timeout's
    help what the guest must do within it."""
    p.add_argument("--cpus", type=positive_int, default=cpus, help=f"vCPUs (default {cpus})")
    p.add_argument("--memory", type=parse_size, default=512 * MIB, metavar="SIZE",
                   help="guest memory, e.g. 512M (default 512M; a plain number is MiB)")
    p.add_argument("--kernel", choices=("vmlinux", "bzImage"), default="vmlinux",
                   help="which kernel image of the guest kit to boot (default vmlinux, PVH entry)")
    p.add_argument("--timeout", type=positive_float, default=180.0, metavar="SECONDS",
                   help=f"seconds the guest may take to {timeout_what} (default 180)")
    p.add_argument("--op-timeout", type=positive_float, default=op_timeout, metavar="SECONDS",
                   help="seconds a request (or a wait the benchmark makes on the guest) may take, "
                   f"and the wait for the API socket (default {op_timeout:g})")
    if settle:
        p.add_argument("--settle", type=nonnegative_float, default=1.0, metavar="SECONDS",
                       help="after 'Run /init', wait until the console has been quiet this long "
                       "(capped at --op-timeout; default 1)")
    p.add_argument("--guest-dir", default=default_guest_dir(),
                   help="guest kit directory (default $ARBOR_GUEST_DIR, else <repo>/target/guest, "
                   "else /tmp/guest if only that exists)")
    p.add_argument("--arbor", metavar="PATH",
                   help="arbor binary (default target/release/arbor, built with "
                   "resources/build-release.sh when missing or older than the sources)")
    p.add_argument("--no-build", action="store_true",
                   help="use target/release/arbor even if it is older than the sources")
    p.add_argument("--arbor-args", default="", metavar="STRING",
                   help="extra arbor options, split like a shell would")
    p.add_argument("--stop-grace", type=positive_float, default=5.0, metavar="SECONDS",
                   help="seconds arbor gets to exit after being asked to (default 5)")
    args = p.parse_args(argv)
    try:
        args.arbor_extra = shlex.split(args.arbor_args)
    except ValueError as e:
        p.error(f"--arbor-args: {e}")
    if not settle:
        args.settle = 0.0
    return args


def prepare_arbor(args):
    """What a benchmark that boots the guest kit under arbor needs first:
    (the kit, the arbor binary, other VMMs running now). Checks /dev/kvm,
    builds arbor when stale (unless --no-build) and warns about other VMMs,
    whose load would show in the numbers."""
    kit = guest_kit(args.guest_dir, args.kernel)
    check_kvm()
    binary = find_arbor(args.arbor, packages=("vmm", "api"),
                        rebuild_stale=not args.no_build, attempts=10)
    others = other_guests(os.getpid())
    if others:
        log(f"warning: other VMMs are running: {', '.join(others)}")
    return kit, binary, others


def vmm_failure(name, vm, what):
    """A BenchError for VM (an object with proc, console and stderr, the
    latter two Streams or None): WHAT, the VMM's exit status, and the last
    console and standard error lines."""
    status = vm.proc.poll() if vm.proc else None
    msg = f"{name}: {what}"
    if status is not None:
        msg += f" ({name} exited with status {status})"
    msg += f"\n  last console lines:\n{tail_lines(vm.console.text() if vm.console else b'')}"
    err = vm.stderr.text() if vm.stderr else b""
    if err.strip():
        msg += f"\n  stderr:\n{tail_lines(err, 15)}"
    return BenchError(msg)


class ArborVm:
    """arbor booting the guest kit with an API socket. OPTS carries cpus, memory,
    arbor_extra (extra arguments), timeout (to 'Run /init'), op_timeout
    (requests, the socket's appearance), settle and stop_grace. With
    CONSOLE_INPUT, the guest's serial input is a pipe (self.proc.stdin)
    instead of /dev/null. t_start is the time.monotonic() just before the
    process was started."""

    MARK_INIT = "Run /init as init process"
    MARK_FATAL = ("Kernel panic",)

    def __init__(self, binary, kit, workdir, opts, console_input=False):
        kernel, initramfs, cmdline = kit
        self.opts = opts
        self.sock = os.path.join(workdir, "arbor-api.sock")
        self.argv = [binary, "--kernel", kernel, "--initramfs", initramfs, "--cmdline", cmdline,
                     "--cpus", str(opts.cpus), "--memory", f"{opts.memory // MIB}M",
                     "--api-socket", self.sock,
                     # Files the benchmark hot-plugs live in WORKDIR.
                     "--allow-path", workdir] + opts.arbor_extra
        self.console_input = console_input
        self.proc = None
        self.console = None
        self.stderr = None
        self.t_start = None

    def fail(self, what):
        return vmm_failure("arbor", self, what)

    def boot(self):
        """Starts arbor and waits for 'Run /init'; returns seconds to it."""
        stdin = subprocess.PIPE if self.console_input else subprocess.DEVNULL
        t_start = self.t_start = time.monotonic()
        try:
            self.proc = subprocess.Popen(self.argv, stdin=stdin, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, bufsize=0, start_new_session=True)
        except OSError as e:
            raise BenchError(f"cannot start {self.argv[0]}: {e}")
        self.console = Stream(self.proc.stdout)
        self.stderr = Stream(self.proc.stderr)
        deadline = t_start + self.opts.op_timeout
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None:
                time.sleep(0.2)
                raise self.fail("exited before creating its API socket")
            if time.monotonic() > deadline:
                raise self.fail(f"no API socket {self.sock} after {self.opts.op_timeout:g} s")
            time.sleep(0.01)
        try:
            _, t, _, _ = self.console.wait_for(lambda line: self.MARK_INIT in line, 0,
                                               t_start + self.opts.timeout, self.MARK_FATAL)
        except StreamTimeout:
            raise self.fail(f"timeout: no '{self.MARK_INIT}' within {self.opts.timeout:g} s")
        except StreamEof:
            raise self.fail(f"the console closed before '{self.MARK_INIT}'")
        except StreamFatal as e:
            time.sleep(1.0)  # let the rest of the oops arrive
            raise self.fail(f"the guest failed ('{e.args[0]}') before '{self.MARK_INIT}'")
        if self.opts.settle > 0:
            self.console.wait_quiet(self.opts.settle, time.monotonic() + self.opts.op_timeout)
        return t - t_start

    def connect(self):
        """A keep-alive connection to the API socket."""
        conn = UnixHTTPConnection(self.sock, self.opts.op_timeout)
        try:
            conn.connect()
        except OSError as e:
            raise self.fail(f"cannot connect to the API socket {self.sock}: {e}")
        return conn

    def request(self, conn, method, path, body=None, expect=(204,)):
        """One request on CONN; returns (milliseconds from sending to the
        whole answer, the answer's body). The status must be in EXPECT."""
        headers = {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers = {"Content-Type": "application/json"}
        t0 = time.monotonic()
        try:
            conn.request(method, path, body=data, headers=headers)
            r = conn.getresponse()
            payload = r.read()
        except (OSError, http.client.HTTPException) as e:
            raise self.fail(f"{method} {path}: {type(e).__name__}: {e}")
        t1 = time.monotonic()
        if r.status not in expect:
            raise self.fail(f"{method} {path} answered HTTP {r.status} (expected "
                            f"{' or '.join(map(str, expect))}): "
                            f"{payload.decode('utf-8', 'replace').strip()}")
        return (t1 - t0) * 1e3, payload

    def add_blank_disk(self, workdir, dev_id, size=MIB, **fields):
        """Hot-adds a new sparse image of SIZE bytes, WORKDIR/DEV_ID.img, as
        disk DEV_ID (FIELDS go into the request too, e.g. port). Returns
        (the console mark before the request, time.monotonic() just before
        it, its round trip in ms, the pci_path answered). A new connection
        each time: waiting for the guest between adds outlasts the server's
        idle keep-alive limit."""
        disk = os.path.join(workdir, f"{dev_id}.img")
        with open(disk, "wb") as f:
            f.truncate(size)
        mark = self.console.mark()
        t0 = time.monotonic()
        conn = self.connect()
        try:
            ms, payload = self.request(conn, "PUT", "/api/v1/vm.add-disk",
                                       dict(fields, id=dev_id, path=disk), expect=(200,))
        finally:
            conn.close()
        return mark, t0, ms, json.loads(payload).get("pci_path")

    def stop(self):
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                conn = UnixHTTPConnection(self.sock, self.opts.stop_grace)
                try:
                    conn.request("PUT", "/api/v1/vmm.shutdown")
                    conn.getresponse().read()
                    self.proc.wait(timeout=self.opts.stop_grace)
                except Exception:
                    pass
                finally:
                    conn.close()
            stop(self.proc, self.opts.stop_grace)
        finally:
            for s in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                if s is None:
                    continue
                try:
                    s.close()
                except OSError:
                    pass


# ---------------------------------------------------------------------------
# A VMM's memory
# ---------------------------------------------------------------------------


SMAPS_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) [0-9a-f]+ \S+ (\d+)\s*(.*)$")


def read_smaps(pid):
    """The mappings of PID: dicts with start, end, perms, inode, path, and the
    smaps fields in KiB (Size, Rss, Anonymous, ...)."""
    maps = []
    cur = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = SMAPS_HEADER.match(line)
            if m:
                cur = {
                    "start": int(m.group(1), 16),
                    "end": int(m.group(2), 16),
                    "perms": m.group(3),
                    "inode": int(m.group(4)),
                    "path": m.group(5).strip(),
                }
                maps.append(cur)
                continue
            key, _, rest = line.partition(":")
            parts = rest.split()
            if cur is not None and len(parts) == 2 and parts[1] == "kB":
                cur[key] = int(parts[0])
    return maps


def is_anonymous(m):
    return m["inode"] == 0 and (m["path"] == "" or m["path"].startswith("[anon:"))


def guest_ram_mappings(maps, mem_bytes):
    """Finds the guest RAM in a VMM's mappings.

    Guest RAM is anonymous, private, read-write memory, mapped by both VMMs
    with one mmap() per RAM region: QEMU maps its whole RAM block ("pc.ram" on
    q35, "microvm.ram" on microvm) as one anonymous mapping of exactly the RAM
    size (the PROT_NONE guard page after it is a separate VMA); arbor
    (vm-memory's GuestMemoryMmap) maps one anonymous region below the 3 GiB
    PCI hole, and a second one above 4 GiB for more than 3 GiB of RAM.

    In order:
      0. arbor's guest RAM is a memfd mapped shared: the mappings of
         "/memfd:arbor-guest-ram" (one per RAM region), whose sizes add up
         to the guest memory;
      1. one anonymous rw-p mapping whose size is exactly the guest memory;
      2. up to three large (>= 16 MiB) anonymous rw-p mappings whose sizes
         add up exactly to the guest memory (split RAM);
      3. the smallest anonymous rw-p mapping less than 64 MiB larger than
         the guest memory: the kernel merged the RAM mapping with a
         neighbouring anonymous one; marked approximate.
    Returns (mappings, method) or raises BenchError listing the candidates.
    """
    mem_kib = mem_bytes // 1024
    memfd = [m for m in maps if m["path"].startswith("/memfd:arbor-guest-ram")]
    if memfd and sum(m.get("Size", 0) for m in memfd) == mem_kib:
        return memfd, "memfd"
    anon = [m for m in maps if is_anonymous(m) and m["perms"].startswith("rw") and m["perms"][3] == "p"]
    exact = [m for m in anon if m.get("Size") == mem_kib]
    if len(exact) == 1:
        return exact, "exact"
    if len(exact) > 1:
        raise BenchError(
            f"{len(exact)} anonymous mappings of exactly {mem_kib} KiB; cannot tell which is guest RAM")
    large = sorted((m for m in anon if m.get("Size", 0) >= 16 * 1024), key=lambda m: -m["Size"])[:12]
    for k in (2, 3):
        found = _subset_sum(large, mem_kib, k)
        if found:
            return found, f"split-{k}"
    over = [m for m in anon if mem_kib < m.get("Size", 0) < mem_kib + 64 * 1024]
    if over:
        return [min(over, key=lambda m: m["Size"])], "merged-approx"
    listing = ", ".join(f"{m['start']:x}-{m['end']:x} {m['Size']} KiB rss {m.get('Rss', 0)} KiB"
                        for m in large) or "none"
    raise BenchError(
        f"cannot find the guest RAM ({mem_kib} KiB) among the anonymous mappings; large ones: {listing}")


def _subset_sum(maps, target, k, start=0):
    if k == 0:
        return [] if target == 0 else None
    for i in range(start, len(maps)):
        rest = _subset_sum(maps, target - maps[i]["Size"], k - 1, i + 1)
        if rest is not None:
            return [maps[i]] + rest
    return None


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


def percentile(sorted_xs, q):
    """Linear interpolation between closest ranks (numpy's default)."""
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def describe(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    r = lambda v: round(v, 3)  # noqa: E731
    return {"n": len(xs), "median": r(percentile(xs, 0.5)), "p99": r(percentile(xs, 0.99)),
            "min": r(xs[0]), "max": r(xs[-1])}
