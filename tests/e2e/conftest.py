"""End-to-end fixtures: a real JupyterHub, the real configurable-http-proxy and
the SSH test bed (``scripts/testbed``).

Every test gets its own hub (own tmp dir, sqlite db, ports, API token) and its
own ``state_dir`` on the hosts (``~/.jupyterhub-ssh-e2e-TAG``). The state dir
is part of the argv of every server wrapper (next to the
``ssh-spawner-run:RUN_ID`` marker), so "processes this test started" can be
told apart from servers of anybody else sharing the test users, and leftovers
are killed without touching those.

The hosts are network namespaces of this machine: they share its PID namespace
and file system, so a test reads ``/proc/PID`` and the per-server directories
directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlparse

import pytest
import requests

TESTBED_JSON = os.environ.get("TESTBED_JSON", "/var/lib/ssh-spawner-testbed/testbed.json")
REPO = Path(__file__).resolve().parents[2]
SESSION_TAG = secrets.token_hex(3)
MARKER = b"ssh-spawner-run:"

# Spawn-to-ready times (test, user/name, seconds), printed in the terminal summary.
TIMINGS: list[tuple[str, str, float]] = []
# Processes a test left behind after its hub stopped cleanly (a spawner bug).
LEAKS: list[str] = []
# Every hub of the session (its token, log and directory are scanned at the end).
HUBS: list[Hub] = []
# Secrets found where they must not be, by the session-wide secret watch.
SECRET_HITS: list[str] = []


# Tests marked any_hub run under JupyterHub 6 only in scripts/test (not again
# under JupyterHub 5): they are slow, and what they check lives in the core,
# the hosts and the test bed (scale, tunnels, host faults, pending stops,
# state checks, the start's retries, systemd limits, the metrics and the
# culler service), not in what differs between the hub versions (spawn errors
# and the spawn page, progress, the options form, internal_ssl certificates,
# routing of odd names, the plain lifecycle), which run under both.
ANY_HUB = (
    "any_hub: slow and independent of the JupyterHub version; scripts/test runs it"
    " under JupyterHub 6 only"
)


def pytest_configure(config):
    config.addinivalue_line("markers", ANY_HUB)


# --------------------------------------------------------------------------
# the test bed


@pytest.fixture(scope="session")
def testbed() -> dict:
    if os.geteuid() != 0:
        pytest.skip(
            "!!! END-TO-END TESTS SKIPPED: they must run as ROOT (they read /proc/PID/environ "
            "of the test users' servers and cut hosts off with scripts/testbed) !!!"
        )
    path = Path(TESTBED_JSON)
    if not path.is_file():
        pytest.fail(
            f"test bed description {path} is missing: bring the bed up with "
            f"`{REPO}/scripts/testbed up` (or set TESTBED_JSON)",
            pytrace=False,
        )
    tb = json.loads(path.read_text())
    # The fault handles of this checkout (the bed may have been brought up by another).
    own = REPO / "scripts" / "testbed"
    tb["script"] = str(own) if own.is_file() else tb.get("testbed_script")
    tb["uids"] = {u["name"]: u["uid"] for u in tb["users"]}
    tb["homes"] = {u["name"]: u["home"] for u in tb["users"]}
    wait_bed_up(tb)
    return tb


def wait_bed_up(tb: dict, timeout: float = 60) -> None:
    """The bed is shared with other test runs that cut hosts and restart sshd:
    wait until every host is up again."""
    deadline = time.monotonic() + timeout
    while True:
        status = subprocess.run(
            [tb["script"], "status"], capture_output=True, text=True, timeout=60, check=False
        )
        if status.returncode == 0:
            return
        if time.monotonic() > deadline:
            pytest.fail(
                f"test bed not fully up for {timeout:.0f} s:\n{status.stdout}{status.stderr}",
                pytrace=False,
            )
        time.sleep(1)


def bed_fault(tb: dict, action: str, host: str) -> None:
    subprocess.run([tb["script"], action, host], check=True, timeout=60, capture_output=True)


@contextlib.contextmanager
def standin_gpus(tb: dict, **sets: str):
    """While the block runs, each named host has the bed's stand-in
    nvidia-smi printing the fixture set given (`fixtures/gpus/SET`); every
    one is put back to none after, however the block ends."""
    try:
        for host, fixture_set in sets.items():
            subprocess.run([tb["script"], "gpus", host, fixture_set], check=True, timeout=60)
        yield
    finally:
        for host in sets:
            subprocess.run([tb["script"], "gpus", host, "none"], check=True, timeout=60)


@contextlib.contextmanager
def host_cut(tb: dict, host: str):
    """The host's link dropped (every packet, both ways) while the block
    runs, healed after it whatever happens."""
    bed_fault(tb, "cut", host)
    try:
        yield
    finally:
        bed_fault(tb, "heal", host)


# --------------------------------------------------------------------------
# /proc


@dataclass
class Proc:
    pid: int
    uid: int
    pgrp: int
    ppid: int
    start: int
    cmdline: bytes

    @property
    def argv(self) -> list[str]:
        return [a.decode(errors="replace") for a in self.cmdline.split(b"\0") if a]


def read_proc(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    uid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("Uid:"))
    return Proc(
        pid=pid,
        uid=uid,
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        start=int(fields[19]),
        cmdline=cmdline,
    )


def all_procs() -> list[Proc]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            p = read_proc(int(name))
            if p is not None:
                out.append(p)
    return out


def proc_environ(pid: int) -> dict[str, str]:
    data = Path(f"/proc/{pid}/environ").read_bytes()
    env = {}
    for item in data.split(b"\0"):
        if b"=" in item:
            k, v = item.split(b"=", 1)
            env[k.decode()] = v.decode(errors="replace")
    return env


def group_members(pgid: int) -> list[Proc]:
    return [p for p in all_procs() if p.pgrp == pgid]


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def all_at_once(fn, items: list[tuple], join: float) -> tuple[dict, list[str]]:
    """fn(*item) for every item, each in a thread of its own, released
    together by a barrier; waits up to `join` s for each. Returns (results
    by item, errors as "item: error" lines)."""
    results: dict = {}
    errors: list[str] = []
    go = threading.Barrier(len(items))

    def run(item):
        try:
            go.wait(10)
            results[item] = fn(*item)
        except BaseException as e:  # noqa: BLE001 -- reported by the caller
            errors.append(f"{'/'.join(map(str, item))}: {e}")

    threads = [threading.Thread(target=run, args=(w,)) for w in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join)
    return results, errors


def wait_polls(hub: Hub, who: str, n: int, since: int, timeout: float = 30) -> None:
    """Wait until the spawner of ``who`` (JupyterHub's name for it: ``user``
    or ``user:name``) has answered ``n`` polls after log offset ``since``:
    "a poll interval later" as an event, not a guess of the clock."""
    needle = f" {who}: poll answered "
    wait_until(
        lambda: hub.log_text()[since:].count(needle) >= n,
        timeout,
        what=f"{n} polls of {who}",
    )


def wait_scans(watch, n: int = 2, timeout: float = 10) -> None:
    """Wait until a /proc watch (ArgvWatch) has made ``n`` more full passes."""
    start = watch.passes
    wait_until(lambda: watch.passes >= start + n, timeout, interval=0.01, what="/proc scans")


# --------------------------------------------------------------------------
# the hub


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


class SpawnFailed(AssertionError):
    pass


# What the tests' own hub service may do; a test that needs more adds to it.
E2E_SCOPES = ("admin:users", "admin:servers", "access:servers", "read:users", "list:users")


class Hub:
    """One JupyterHub (and its proxy) in its own directory."""

    def __init__(self, tb: dict, workdir: Path, tag: str, config: dict):
        self.tb = tb
        self.dir = workdir
        self.dir.mkdir(parents=True)
        self.tag = tag
        self.state_dir = f"~/.jupyterhub-ssh-e2e-{tag}"
        self.token = secrets.token_hex(32)
        self.hub_ip = tb["hub_address"]
        self.hub_port = free_port(self.hub_ip)
        self.proxy_port = free_port("127.0.0.1")
        self.proxy_api_port = free_port("127.0.0.1")
        self.config = dict(config)
        self.log_path = self.dir / "hub.log"
        self.proc: subprocess.Popen | None = None
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"token {self.token}"
        HUBS.append(self)

    # ---- config and process ---------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def base_config(self) -> dict:
        tb = self.tb
        internal_ssl = bool(self.config.get("JupyterHub.internal_ssl"))
        return {
            "JupyterHub.spawner_class": "ssh",
            "JupyterHub.hub_ip": self.hub_ip,
            "JupyterHub.hub_port": self.hub_port,
            "JupyterHub.ip": "127.0.0.1",
            "JupyterHub.port": self.proxy_port,
            "ConfigurableHTTPProxy.api_url": (
                f"{'https' if internal_ssl else 'http'}://127.0.0.1:{self.proxy_api_port}"
            ),
            "ConfigurableHTTPProxy.should_start": True,
            "JupyterHub.authenticator_class": "dummy",
            "Authenticator.allowed_users": {u["name"] for u in tb["users"]},
            "JupyterHub.services": [{"name": "e2e", "api_token": self.token}],
            "JupyterHub.load_roles": [
                {
                    "name": "e2e",
                    "scopes": list(E2E_SCOPES),
                    "services": ["e2e"],
                }
            ],
            "JupyterHub.log_level": "DEBUG",
            "JupyterHub.allow_named_servers": True,
            "SSHSpawner.hosts": [{"address": h["address"], "name": h["name"]} for h in tb["hosts"]],
            "SSHSpawner.key_path": tb["hub_key"],
            "SSHSpawner.known_hosts": tb["known_hosts"],
            "SSHSpawner.state_dir": self.state_dir,
            "Spawner.cmd": [tb["venv"] + "/bin/jupyterhub-singleuser"],
            "Spawner.start_timeout": 60,
            "Spawner.http_timeout": 30,
        }

    def write_config(self) -> Path:
        cfg = {**self.base_config(), **self.config}
        lines = ["c = get_config()  # noqa"]
        for key, value in cfg.items():
            lines.append(f"c.{key} = {value!r}")
        path = self.dir / "jupyterhub_config.py"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 45, **overrides) -> Hub:
        assert self.proc is None or self.proc.poll() is not None, "hub already running"
        self.config.update(overrides)
        path = self.write_config()
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== e2e: starting hub at {time.strftime('%T')} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jupyterhub", "-f", str(path)],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"hub exited with status {self.proc.returncode} while starting:\n"
                    + self.log_tail()
                )
            with contextlib.suppress(requests.RequestException):
                r = requests.get(f"{self.url}/hub/api/", timeout=2)
                if r.status_code == 200:
                    return self
            if time.monotonic() > deadline:
                raise AssertionError(f"hub did not answer within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM the hub and wait (it stops its proxy itself)."""
        if self.proc is None or self.proc.poll() is not None:
            self._kill_proxy()
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise AssertionError(f"hub did not exit within {timeout} s of SIGTERM") from None
        finally:
            self._kill_proxy()

    def kill(self) -> None:
        """SIGKILL the hub process alone (its proxy lives on, as after a crash)."""
        assert self.proc is not None and self.proc.poll() is None, "hub not running"
        self.proc.kill()
        self.proc.wait(10)
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== e2e: hub SIGKILLed at {time.strftime('%T')} =====\n".encode())

    def _kill_proxy(self) -> None:
        pid_file = self.dir / "jupyterhub-proxy.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int(pid_file.read_text().strip())
            p = read_proc(pid)
            if p and b"configurable-http-proxy" in p.cmdline:
                os.kill(pid, signal.SIGKILL)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 60000) -> str:
        text = self.log_text()
        return text[-chars:]

    # ---- REST API -----------------------------------------------------------

    def api(self, method: str, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 30)
        return self.session.request(method, f"{self.url}/hub/api{path}", **kw)

    def proxy_get(self, path: str, **kw) -> requests.Response:
        """GET through the proxy with the token; redirects (to a login page) not followed."""
        kw.setdefault("timeout", 10)
        kw.setdefault("allow_redirects", False)
        return self.session.get(f"{self.url}{path}", **kw)

    @staticmethod
    def server_path(user: str, name: str = "") -> str:
        u = quote(user, safe="")
        return f"/users/{u}/servers/{quote(name, safe='')}" if name else f"/users/{u}/server"

    def create_user(self, user: str) -> requests.Response:
        r = self.api("POST", f"/users/{quote(user, safe='')}")
        assert r.status_code in (201, 409), (r.status_code, r.text)
        return r

    def request_spawn(self, user: str, name: str = "", **kw) -> requests.Response:
        self.create_user(user)
        return self.api("POST", self.server_path(user, name), timeout=90, **kw)

    def user_model(self, user: str) -> dict:
        r = self.api("GET", f"/users/{quote(user, safe='')}")
        r.raise_for_status()
        return r.json()

    def server_model(self, user: str, name: str = "") -> dict | None:
        return self.user_model(user).get("servers", {}).get(name)

    def wait_ready(self, user: str, name: str = "", timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        seen_pending = False
        while True:
            model = self.server_model(user, name)
            if model is not None and model.get("ready"):
                return model
            if model is not None and model.get("pending"):
                seen_pending = True
            if model is None and seen_pending:
                raise SpawnFailed(
                    f"spawn of {user}/{name} failed:\n{self.progress_failure(user, name)}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{user}/{name} not ready within {timeout} s: {model}")
            time.sleep(0.1)

    def spawn(self, user: str, name: str = "", timeout: float = 60) -> tuple[dict, float]:
        """POST the spawn, wait until ready; returns (server model, seconds)."""
        t0 = time.monotonic()
        r = self.request_spawn(user, name)
        if r.status_code not in (201, 202):
            raise SpawnFailed(f"POST spawn {user}/{name}: {r.status_code} {r.text}")
        model = self.wait_ready(user, name, timeout)
        elapsed = time.monotonic() - t0
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0].split("::")[-1]
        TIMINGS.append((test, f"{user}/{name}", elapsed))
        print(f"SPAWN_TO_READY user={user} name={name!r} seconds={elapsed:.2f}")
        return model, elapsed

    def progress_failure(self, user: str, name: str = "") -> str:
        """The failure message of the progress stream (after a failed spawn)."""
        events = self.progress_events(user, name, timeout=10)
        return "\n".join(e.get("message", "") for e in events)

    def progress_events(self, user: str, name: str = "", timeout: float = 60) -> list[dict]:
        path = self.server_path(user, name) + "/progress"
        if not name:
            path = f"/users/{quote(user, safe='')}/server/progress"
        events = []
        with self.api("GET", path, stream=True, timeout=timeout) as r:
            if r.status_code != 200:
                return [{"message": f"progress: HTTP {r.status_code} {r.text}"}]
            for line in r.iter_lines(decode_unicode=True):
                if line and line.startswith("data:"):
                    ev = json.loads(line[5:])
                    events.append(ev)
                    if ev.get("ready") or ev.get("failed"):
                        break
        return events

    def stop_server(self, user: str, name: str = "", timeout: float = 60) -> float:
        t0 = time.monotonic()
        r = self.api("DELETE", self.server_path(user, name), timeout=timeout)
        assert r.status_code in (202, 204), (r.status_code, r.text)
        wait_until(
            lambda: self.server_model(user, name) is None,
            timeout,
            what=f"{user}/{name} to stop",
        )
        return time.monotonic() - t0

    def ssh_state(self, user: str, name: str = "") -> dict:
        """The spawner's state: from the REST model (admin), else from the db."""
        model = self.server_model(user, name)
        if model and model.get("state") and "ssh" in model["state"]:
            return model["state"]["ssh"]
        db = sqlite3.connect(self.dir / "jupyterhub.sqlite")
        try:
            row = db.execute(
                "SELECT spawners.state FROM spawners JOIN users ON spawners.user_id = users.id"
                " WHERE users.name = ? AND spawners.name = ?",
                (user, name),
            ).fetchone()
        finally:
            db.close()
        assert row and row[0], f"no spawner state for {user}/{name}"
        return json.loads(row[0])["ssh"]

    def stop_all_servers(self) -> None:
        r = self.api("GET", "/users")
        if r.status_code != 200:
            return
        for u in r.json():
            for name, srv in u.get("servers", {}).items():
                if srv is None:
                    continue
                with contextlib.suppress(Exception):
                    self.stop_server(u["name"], name, timeout=60)

    # ---- this hub's processes on the hosts --------------------------------

    def host_dirs(self) -> list[Path]:
        base = self.state_dir.removeprefix("~/")
        return [Path(home) / base for home in self.tb["homes"].values()]

    def my_procs(self) -> list[Proc]:
        """Processes started by this hub's spawner: the wrapper (marker and state
        dir in its argv) and everything in its process group."""
        needle = ("/" + self.state_dir.removeprefix("~/") + "/").encode()
        wrappers = [p for p in all_procs() if MARKER in p.cmdline and needle in p.cmdline]
        groups = {p.pgrp for p in wrappers} | {p.pid for p in wrappers}
        return [p for p in all_procs() if p.pgrp in groups or p.pid in groups]


# --------------------------------------------------------------------------
# fixtures


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for hub in getattr(item, "_e2e_hubs", []):
            rep.sections.append((f"hub log {hub.log_path}", hub.log_tail()))


@pytest.fixture
def hub_factory(testbed, tmp_path, request):
    """make(config) -> a started Hub; config maps "Class.attr" to a value (it
    overrides the defaults of Hub.base_config). start=False only creates it.
    Everything is stopped and cleaned up after the test."""
    wait_bed_up(testbed)
    hubs: list[Hub] = []
    request.node._e2e_hubs = hubs
    counter = iter(range(100))

    def make(config: dict | None = None, start: bool = True) -> Hub:
        cfg = dict(config or {})
        tag = f"{SESSION_TAG}-{os.getpid()}-{len(hubs)}-{next(counter)}-{secrets.token_hex(2)}"
        hub = Hub(testbed, tmp_path / f"hub{len(hubs)}", tag, cfg)
        hubs.append(hub)
        if start:
            hub.start()
        return hub

    yield make

    for hub in hubs:
        clean = True
        try:
            if hub.running:
                hub.stop_all_servers()
                hub.stop()
        except Exception as e:  # noqa: BLE001 -- keep cleaning up
            clean = False
            print(f"e2e teardown: stopping {hub.dir}: {e}")
        leftovers = hub.my_procs()
        if leftovers:
            desc = "; ".join(f"{p.pid} uid={p.uid} {' '.join(p.argv)[-120:]}" for p in leftovers)
            if clean and not getattr(hub, "expect_leftovers", False):
                LEAKS.append(f"{request.node.nodeid}: {desc}")
            for p in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
        for d in hub.host_dirs():
            if SECRET_WATCH is not None:
                SECRET_WATCH.scan_tree(d, f"{request.node.nodeid}: host file")
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def hub(hub_factory) -> Hub:
    return hub_factory()


class ArgvWatch:
    """Reads every /proc/*/cmdline in a loop in a background thread."""

    def __init__(self):
        self.seen: set[bytes] = set()
        self.passes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="argv-watch", daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for name in os.listdir("/proc"):
                if not name.isdigit():
                    continue
                try:
                    with open(f"/proc/{name}/cmdline", "rb") as f:
                        data = f.read()
                except OSError:
                    continue
                if data:
                    self.seen.add(data)
            self.passes += 1
            time.sleep(0.001)

    def start(self) -> ArgvWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def offending(self, secrets_by_name: dict[str, str]) -> list[str]:
        bad = []
        for label, value in secrets_by_name.items():
            assert value and len(value) >= 16, f"{label}: implausible secret {value!r}"
            needle = value.encode()
            for cmd in self.seen:
                if needle in cmd:
                    bad.append(f"{label} in argv: {cmd[:200]!r}")
        return bad


@pytest.fixture
def argv_watch():
    w = ArgvWatch().start()
    yield w
    w.stop()


class SecretWatch:
    """The whole e2e session long: every ~100 ms read every /proc/*/cmdline
    (kept, deduplicated) and learn the secrets of the moment from the
    environment of the servers (JUPYTERHUB_API_TOKEN) and proxies
    (CONFIGPROXY_AUTH_TOKEN). At the end, every argv seen, every hub log,
    every file in the hubs' and servers' directories and the hosts' sshd logs
    are searched for every secret learnt, the hubs' service tokens and the
    test bed's private keys. It starts no process (so puts nothing in argv)."""

    SCAN_ENV = (b"jupyterhub-singleuser", b"configurable-http-proxy")
    ENV_SECRETS = (b"JUPYTERHUB_API_TOKEN=", b"CONFIGPROXY_AUTH_TOKEN=")

    def __init__(self, tb: dict):
        self.tb = tb
        self.cmdlines: set[bytes] = set()
        self.secrets: dict[bytes, str] = {}
        self.env_read: set[tuple[str, bytes]] = set()
        self.passes = 0
        self.files_scanned = 0
        self.sshd_logs = {h["log"]: _size(h["log"]) for h in tb["hosts"]}
        keys = [("hub key", tb["hub_key"]), ("stranger key", tb["stranger_key"])]
        keys.append(("user CA key", tb.get("user_ca_private") or ""))
        for u in tb["users"]:
            for kind, path in (u.get("keys") or {}).items():
                if path and not str(path).endswith(".pub"):
                    keys.append((f"{u['name']} {kind} key", path))
        for label, path in keys:
            self._learn_key(label, path)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="secret-watch", daemon=True)

    def _learn_key(self, label: str, path: str) -> None:
        """Lines of the base64 body of a private key (its second half: the
        first holds the common header and the public key, which may be
        anywhere)."""
        try:
            lines = Path(path).read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            return
        try:
            public = Path(path + ".pub").read_text()
        except OSError:
            public = ""
        body = [ln for ln in lines if ln and not ln.startswith("-----")]
        for ln in body[len(body) // 2 :]:
            if len(ln) >= 60 and ln[:60] not in public:
                self.secrets[ln[:60].encode()] = f"private key material ({label})"

    def learn(self, value: str, label: str) -> None:
        if value and len(value) >= 16:
            with self._lock:
                self.secrets.setdefault(value.encode(), label)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name in os.listdir("/proc"):
                if not name.isdigit():
                    continue
                try:
                    with open(f"/proc/{name}/cmdline", "rb") as f:
                        data = f.read()
                except OSError:
                    continue
                if not data:
                    continue
                self.cmdlines.add(data)
                if any(n in data for n in self.SCAN_ENV) and (name, data) not in self.env_read:
                    self.env_read.add((name, data))
                    self._learn_env(name)
            self.passes += 1
            self._stop.wait(0.1)

    def _learn_env(self, pid: str) -> None:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return
        for item in env.split(b"\0"):
            for prefix in self.ENV_SECRETS:
                if item.startswith(prefix):
                    self.learn(item[len(prefix) :].decode(errors="replace"), prefix[:-1].decode())

    def start(self) -> SecretWatch:
        self._thread.start()
        return self

    def _hits(self, data: bytes, where: str) -> None:
        with self._lock:
            secrets = list(self.secrets.items())
        for needle, label in secrets:
            if needle in data:
                SECRET_HITS.append(f"{label} in {where}")

    def scan_file(self, path: Path, where: str) -> None:
        try:
            data = path.read_bytes()
        except OSError:
            return
        self.files_scanned += 1
        self._hits(data, f"{where} {path}")

    def scan_tree(self, root: Path, where: str, skip: tuple[str, ...] = ()) -> None:
        for dirpath, _dirs, names in os.walk(root):
            for n in names:
                if n not in skip:
                    self.scan_file(Path(dirpath) / n, where)

    def finish(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for hub in HUBS:
            self.learn(hub.token, f"service token of {hub.dir}")
        for cmd in self.cmdlines:
            self._hits(cmd, f"argv {cmd[:160]!r}")
        for hub in HUBS:
            # jupyterhub_config.py is the test's own (it sets the service token).
            self.scan_tree(hub.dir, "hub file", skip=("jupyterhub_config.py",))
        for path, size in self.sshd_logs.items():
            try:
                with open(path, "rb") as f:
                    f.seek(size)
                    data = f.read()
            except OSError:
                continue
            self.files_scanned += 1
            self._hits(data, f"sshd log {path}")


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


SECRET_WATCH: SecretWatch | None = None


@pytest.fixture(scope="session", autouse=True)
def secret_watch(request):
    """Fails the session (an error in the last test's teardown, and a red
    exit status) if any secret shows up in an argv, a log or a file."""
    global SECRET_WATCH
    if os.geteuid() != 0 or not Path(TESTBED_JSON).is_file():
        yield None  # the testbed fixture skips every test loudly
        return
    tb = json.loads(Path(TESTBED_JSON).read_text())
    SECRET_WATCH = SecretWatch(tb).start()
    yield SECRET_WATCH
    w, SECRET_WATCH = SECRET_WATCH, None
    w.finish()
    print(
        f"\nSECRET_WATCH passes={w.passes} argvs={len(w.cmdlines)} secrets={len(w.secrets)}"
        f" files={w.files_scanned} hits={len(SECRET_HITS)}"
    )
    if TIMINGS:  # a server ran: its token must have been learnt
        assert w.passes > 10, "the secret watch hardly ran"
        assert any(label == "JUPYTERHUB_API_TOKEN" for label in w.secrets.values()), (
            "the secret watch never saw a server's API token: it watches nothing"
        )
    assert not SECRET_HITS, "secrets leaked:\n" + "\n".join(SECRET_HITS[:50])


# --------------------------------------------------------------------------
# summary


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    if TIMINGS:
        tr.section("spawn-to-ready times (POST to ready, seconds)")
        by_test: dict[str, list[tuple[str, float]]] = {}
        for test, server, secs in TIMINGS:
            by_test.setdefault(test, []).append((server, secs))
        for test, rows in by_test.items():
            vals = sorted(secs for _, secs in rows)
            tr.write_line(
                f"{test}: n={len(vals)} min={vals[0]:.2f} "
                f"median={statistics.median(vals):.2f} max={vals[-1]:.2f}  "
                + " ".join(f"{srv}={secs:.2f}" for srv, secs in rows)
            )
    if LEAKS:
        tr.section("processes left behind after a clean stop (spawner bug?)")
        for line in LEAKS:
            tr.write_line(line)


# --------------------------------------------------------------------------
# checks shared by tests


def proc_start_time(pid: int) -> int | None:
    p = read_proc(pid)
    return p.start if p else None


def assert_server_process(
    tb: dict, state: dict, user: str, program: str = "jupyterhub-singleuser"
) -> tuple[Proc, dict[str, str]]:
    """The pid in the state is the user's `program` (jupyterhub-singleuser
    unless said), started by the wrapper in its recorded process group;
    returns it and its environment."""
    p = read_proc(state["pid"])
    assert p is not None, f"server pid {state['pid']} is not running"
    assert p.uid == tb["uids"][user], f"pid {p.pid} runs as uid {p.uid}, not {user}"
    assert state["uid"] == tb["uids"][user]
    assert any(a.endswith(program) for a in p.argv), p.argv
    assert p.start == state["start_time"], "pid was reused: start time differs"
    assert p.pgrp == state["pgid"], (p.pgrp, state["pgid"])
    # The wrapper is the server's parent, in its group (which it leads, or
    # which the launch's login led), and carries the run's marker.
    wrapper = read_proc(p.ppid)
    assert wrapper is not None and wrapper.uid == p.uid
    assert wrapper.pgrp == state["pgid"], (wrapper.pgrp, state["pgid"])
    assert f"ssh-spawner-run:{state['run_id']}".encode() in wrapper.cmdline
    return p, proc_environ(p.pid)


def url_port(url: str) -> int:
    return urlparse(url).port
