"""SSHSpawner: the JupyterHub glue around the Rust core.

Everything that touches a host lives in Rust (``ssh_spawner._core``); this
class holds the options as traitlets and awaits the core. Nothing here blocks
the hub's event loop: every call to a host is an awaitable.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import inspect
import json
import logging
import time
from urllib.parse import urlsplit

from jupyterhub.spawner import Spawner
from jupyterhub.traitlets import ByteSpecification
from tornado import web
from traitlets import (
    Bool,
    Dict,
    Float,
    Integer,
    List,
    TraitError,
    Tuple,
    Unicode,
    Union,
    default,
    observe,
    validate,
)

from . import _core, metrics

try:  # JupyterHub >= 6: a policy failure, logged without a traceback
    from jupyterhub.spawner import SpawnException
except ImportError:  # JupyterHub 5
    SpawnException = None

# One core (and so one SSH connection pool) per distinct configuration: all
# spawners of a hub share it.
_CORES: dict[str, _core.Core] = {}
_LOG_PUMP: asyncio.Task | None = None
_HUB_SEEN = False  # see _hub_starting
# The hub's /hub/metrics shows the spawner's metrics from the moment the hub
# loads this class (docs/metrics.md).
metrics.register(lambda: list(_CORES.values()))
# user_options keys set by a spawner wrapping this one (wrapspawner's
# ProfilesSpawner): left to it, not refused as unknown options.
_WRAPPER_OPTIONS = frozenset({"profile"})


def _drain_logs(log: logging.Logger) -> None:
    """Move the core's log records into the hub's logger."""
    for level, target, message in _core.drain_logs():
        log.log(level, "[%s] %s", target, message)


async def _pump_logs(log: logging.Logger) -> None:
    while True:
        _drain_logs(log)
        await asyncio.sleep(0.25)


class SSHSpawner(Spawner):
    """Start each single-user server on one of the lab's hosts over SSH.

    Host keys are verified against ``known_hosts``; connections are pooled;
    the API token travels on stdin, never in a command line.
    """

    hosts = List(
        Union([Unicode(), Dict()]),
        help="""The compute hosts. Each is a host name or address, or a dict with
        ``address`` and optionally ``port`` (SSH, default 22), ``name`` (shown to
        users), ``max_servers``, ``prologue`` (shell lines for that host only)
        and ``drain`` (``True``: no new server goes there; the servers already
        there are polled and stopped as usual).
        Example: ``["node1.lab", {"address": "10.0.0.12", "name": "gpu1", "max_servers": 8}]``.""",
    ).tag(config=True, rust=True)

    remote_user = Unicode(
        "{username}",
        help="Remote user the server runs as. ``{username}`` is the hub user name.",
    ).tag(config=True, rust=True)

    key_path = Unicode(
        None,
        allow_none=True,
        help="""Private key the hub logs in with. Either one hub key that every
        user's ``authorized_keys`` trusts, or a key per user with ``{username}``
        in the path. An OpenSSH certificate next to it (``KEY-cert.pub``) is
        used when present. Unset: use the ssh-agent (``agent_socket``).""",
    ).tag(config=True, rust=True)

    agent_socket = Unicode(
        None,
        allow_none=True,
        help="ssh-agent socket used when ``key_path`` is unset (default: ``$SSH_AUTH_SOCK``).",
    ).tag(config=True, rust=True)

    known_hosts = Unicode(
        "/etc/ssh/ssh_known_hosts",
        help="""known_hosts file every host key is checked against. Unknown and
        changed keys are refused unless ``host_key_policy`` says otherwise.""",
    ).tag(config=True, rust=True)

    host_key_policy = Unicode(
        "strict",
        help="""``strict`` (only keys in ``known_hosts``) or ``accept-new``
        (record a host seen for the first time; a changed key is still refused).""",
    ).tag(config=True, rust=True)

    port_range = Tuple(
        Integer(),
        Integer(),
        default_value=(20000, 29999),
        help="Ports servers may listen on (inclusive), e.g. to match a firewall rule.",
    ).tag(config=True, rust=True)

    host_selection = Unicode(
        "random",
        help="""How a host is chosen among those that fit:
        ``random``, ``round-robin`` or ``least-loaded``.""",
    ).tag(config=True, rust=True)

    state_dir = Unicode(
        "~/.jupyterhub-ssh",
        help="""Directory on the host for per-server files (log, pid, exit status,
        certificates), one 0700 subdirectory per server.""",
    ).tag(config=True, rust=True)

    prologue = List(
        Unicode(),
        help="""Shell lines run before the server starts, in the shell that then
        starts it, e.g. ``["module load python/3.11", "source
        /opt/conda/bin/activate lab"]``. Their output goes to the server's log
        (``server.log`` in its directory); a job they start in the background
        (``Xvfb :99 &``) does not hold the start up.""",
    ).tag(config=True, rust=True)

    enforcement = Unicode(
        "auto",
        help="""How ``mem_limit`` / ``cpu_limit`` are enforced: ``auto`` (a systemd
        user scope when the host has a user manager, else an address-space limit
        with prlimit), ``systemd``, ``prlimit`` or ``none``. The limits are always
        exported as MEM_LIMIT / CPU_LIMIT.""",
    ).tag(config=True, rust=True)

    stop_grace = Float(10.0, help="Seconds between SIGTERM and SIGKILL when a server stops.").tag(
        config=True, rust=True
    )

    keep_log = Bool(
        True, help="Keep the server's log in its directory on the host after it stops."
    ).tag(config=True, rust=True)

    connect_timeout = Float(10.0, help="Seconds to connect to a host (TCP and key exchange).").tag(
        config=True, rust=True
    )
    auth_timeout = Float(10.0, help="Seconds to authenticate.").tag(config=True, rust=True)
    command_timeout = Float(30.0, help="Seconds any one remote command may take.").tag(
        config=True, rust=True
    )
    facts_cache = Float(
        5.0, help="Seconds host facts (free memory, load, servers) are cached for host choice."
    ).tag(config=True, rust=True)
    launch_settle = Float(
        None,
        allow_none=True,
        help="""Deprecated and ignored. A start now waits, once the server's pid is
        known, until the server listens on its port (so the hub's first check
        succeeds) or exits (the start fails with its status and log), bounded
        by ``start_timeout``; there is no fixed wait to tune.""",
    ).tag(config=True)

    @observe("launch_settle")
    def _launch_settle_deprecated(self, change):
        if change["new"] is not None:
            self.log.warning(
                "SSHSpawner.launch_settle is deprecated and ignored: a start now waits"
                " until the server listens on its port or exits (bounded by start_timeout)"
            )

    max_sessions_per_connection = Integer(
        10,
        help="Sessions at once on one SSH connection (sshd's MaxSessions): commands, and the "
        "SFTP session a connection keeps for making run directories.",
    ).tag(config=True, rust=True)
    max_connections_per_host = Integer(4, help="SSH connections per host and remote user.").tag(
        config=True, rust=True
    )
    idle_timeout = Float(300.0, help="Seconds before an unused SSH connection is closed.").tag(
        config=True, rust=True
    )
    port_retries = Integer(5, help="Other ports tried when the chosen one is taken at launch.").tag(
        config=True, rust=True
    )
    keepalive_interval = Float(
        15.0,
        help="""Seconds of silence from a host before the hub sends an SSH
        keepalive on its connection.""",
    ).tag(config=True, rust=True)
    keepalive_count = Integer(
        3,
        help="""Unanswered keepalives after which a connection counts as dead.
        A link that fails silently (a firewall or NAT dropping packets) is
        noticed after about ``keepalive_interval * (keepalive_count + 1)``
        seconds; only then do tunnels (``tunnel``, ``hub_tunnel``) move to a
        new connection. Lower values bring tunnels back sooner; they also
        drop connections over links that merely stall that long, and cost a
        small packet per idle connection per interval.""",
    ).tag(config=True, rust=True)

    unreachable_grace = Float(
        300.0,
        help="""Seconds a host may fail to answer before its servers are reported
        stopped. Within the grace, poll reports the server running and the log
        says the host is unreachable; right after a hub restart, the first poll
        waits for the host up to this long, so servers survive a switch reboot.""",
    ).tag(config=True)

    pending_stop_retry = Float(
        15.0,
        help="""Seconds between two tries of the pending stops: servers the hub
        had to forget while their host did not answer (a stop during an
        outage, a start abandoned on a host that stopped answering). They are
        kept in `journal_dir/stops/` across hub restarts, and a host that
        answers again has them stopped within this plus `connect_timeout`.
        Shorter cleans up sooner and tries a dead host more often (one
        connection attempt per pending stop per try). 0.5 to 3600.""",
    ).tag(config=True)

    @validate("pending_stop_retry")
    def _pending_stop_retry_in_range(self, proposal):
        value = proposal["value"]
        if not 0.5 <= value <= 3600:
            raise TraitError(f"SSHSpawner.pending_stop_retry = {value!r}: seconds from 0.5 to 3600")
        return value

    tunnel = Bool(
        False,
        help="""Reach each server through an SSH tunnel instead of the network:
        the server listens on the host's loopback only (127.0.0.1) and the hub
        reaches it at a port on its own loopback that is carried over the pooled
        SSH connection. For hosts whose firewall lets in nothing but SSH. All
        traffic to the servers then passes through the hub process and one SSH
        connection per host and user (more latency, less throughput); the local
        ports survive a hub restart (they are in the server state).""",
    ).tag(config=True, rust=True)

    hub_tunnel = Bool(
        False,
        help="""Let each server reach the hub API through the SSH connection
        (a remote forward: sshd listens on a port of the host's loopback and the
        hub carries its connections to the API), for hosts that cannot route to
        the hub. JUPYTERHUB_API_URL and JUPYTERHUB_ACTIVITY_URL point at that port.""",
    ).tag(config=True, rust=True)

    journal_dir = Unicode(
        "ssh-spawner-journal",
        help="""Directory on the hub (relative to its working directory, like
        ``jupyterhub.sqlite``) for the journal of starts in flight: a hub killed
        in the middle of a start stops, once restarted, what it had launched but
        not yet saved in its database; the pending stops (``stops/``); and the
        ``remote_user`` templates and ``state_dir`` values the hub ran with
        (``config-history``), so servers started under earlier ones are still
        polled and stopped. Created 0700, files 0600. Keep it across hub
        upgrades and moves, like the database.""",
    ).tag(config=True)

    options_form_enabled = Bool(
        False,
        help="""Show users a spawn form: a host to run on (each with its free
        memory, load and number of servers, read live), and memory and CPU
        within ``user_mem_limit_max`` / ``user_cpu_limit_max``. "Let the
        spawner choose" is the default. Values are checked on the hub, both
        when the form is submitted and again at start (``user_options`` can
        also come through the REST API); a refused value comes back to the
        form with a message naming the field and what is allowed. A host the
        user chose is kept: if it cannot take the server, the spawn fails
        with that reason instead of moving elsewhere.""",
    ).tag(config=True)

    user_hosts = List(
        Unicode(),
        help="""Hosts (by name as shown, i.e. ``name`` or ``address`` in
        ``hosts``) a user may choose in the form or with the REST API option
        ``host``. Empty: every host in ``hosts``.""",
    ).tag(config=True)

    user_mem_limit_max = ByteSpecification(
        None,
        allow_none=True,
        help="""Most memory a user may ask for (e.g. ``"8G"``); it becomes the
        server's ``mem_limit``. Unset: memory is not a choice (``mem_limit``
        applies).""",
    ).tag(config=True)

    user_cpu_limit_max = Float(
        None,
        allow_none=True,
        help="""Most CPU cores a user may ask for; it becomes the server's
        ``cpu_limit``. Unset: CPU is not a choice (``cpu_limit`` applies).""",
    ).tag(config=True)

    gpus = Integer(
        0,
        min=0,
        help="""GPUs each server gets. Only a host with this many free GPUs is
        chosen (then by ``host_selection``); the server is given exactly those,
        by UUID, in ``CUDA_VISIBLE_DEVICES`` and ``NVIDIA_VISIBLE_DEVICES``
        (on a host with GPUs, a server that asked for none gets
        ``CUDA_VISIBLE_DEVICES=""`` and ``NVIDIA_VISIBLE_DEVICES=void``).
        A GPU is free when no server of this hub holds it and no other process
        uses more than ``gpu_busy_memory_mib`` of its memory. The GPUs are
        recorded in the server's state and in ``gpus`` in its run directory,
        and held until it stops or is found gone. Set it per profile with
        ProfilesSpawner; a user may ask for up to ``user_gpus_max`` with the
        option ``gpus``. The variables are advisory: a program that resets
        them sees every GPU of the host.""",
    ).tag(config=True)

    user_gpus_max = Integer(
        0,
        min=0,
        help="""Most GPUs a user may ask for with the option ``gpus`` (the REST
        API's ``{"gpus": 2}``, the options form's GPU field, which starts at
        ``gpus``), instead of ``gpus``. 0: GPUs are not a choice; a larger
        count is refused with a message naming the limit. A form asking for
        more GPUs than any host had free in the figures it showed is refused
        above the form, naming each host's free GPUs.""",
    ).tag(config=True)

    gpu_busy_memory_mib = Integer(
        100,
        help="""MiB of a GPU's memory a process not started by this hub may
        use while the GPU still counts as free (a monitoring agent's CUDA
        context). A process using more (an ssh user's training job) makes the
        GPU taken: it is not given to a server.""",
    ).tag(config=True, rust=True)

    options_form_cache = Float(
        10.0,
        help="""Seconds the form's host figures are shared between page views,
        so many users opening the page at once cost one command per host.""",
    ).tag(config=True)

    options_form_wait = Float(
        3.0,
        help="""Seconds the form waits for a host's figures; a host that has
        not answered by then is shown as not answering and cannot be chosen.""",
    ).tag(config=True)

    @default("options_form")
    def _default_options_form(self):
        if not self.options_form_enabled:
            return ""
        return lambda spawner: spawner._render_options_form()

    @default("options_from_form")
    def _default_options_from_form(self):
        if self.options_form_enabled:
            return self._options_from_form_fields
        return getattr(Spawner, "_passthrough_options_from_form", lambda form_data: form_data)

    @default("cmd")
    def _default_cmd(self):
        return ["jupyterhub-singleuser"]

    # ---- plumbing -------------------------------------------------------

    # How a traitlet's value reaches the core where the shapes differ.
    _TO_CORE = {
        "hosts": lambda hosts: [{"address": h} if isinstance(h, str) else dict(h) for h in hosts],
        "port_range": lambda r: {"start": r[0], "end": r[1]},
    }

    def _config_json(self) -> str:
        """The core's configuration: every traitlet tagged ``rust=True``
        under its own name (unset ones left to the core's default). The core
        refuses unknown names, and a test compares the tagged traitlets with
        the core's fields (``_core.config_fields``)."""
        cfg = {}
        for name in sorted(self.trait_names(rust=True)):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, (list, tuple)) and name not in self._TO_CORE:
                value = list(value)
            cfg[name] = self._TO_CORE.get(name, lambda v: v)(value)
        return json.dumps(cfg, sort_keys=True)

    @property
    def core(self) -> _core.Core:
        global _LOG_PUMP
        key = self._config_json()
        core = _CORES.get(key)
        if core is None:
            try:
                core = _CORES[key] = _core.Core(key)
            except _core.SpawnerError as e:
                raise ValueError(f"SSHSpawner configuration: {e}") from None
        if _LOG_PUMP is None or _LOG_PUMP.done():
            with contextlib.suppress(RuntimeError):  # no running loop: no pump yet
                _LOG_PUMP = asyncio.get_running_loop().create_task(_pump_logs(self.log))
        return core

    _state_json = None  # the core's server state, JSON text
    _prepared = None  # host and port chosen for the spawn in progress
    _progress = None
    _launching = False
    _journaled = ()  # run ids this spawner wrote to the journal, not yet in the db
    _watcher = None  # the core's poll state (unreachable grace, restart, pending stop)

    @property
    def _watch(self) -> _core.Watch:
        if self._watcher is None:
            self._watcher = _core.Watch(
                self._log_name, self.unreachable_grace, self.journal_dir, self.pending_stop_retry
            )
        return self._watcher

    # ---- journal of starts in flight and pending stops (the core's) -------

    async def _journal_write(self, state_json: str) -> None:
        try:
            run_id = await self.core.journal_write(self.journal_dir, state_json)
        except _core.SpawnerError as e:
            # Launching without the entry could orphan the server: refuse.
            raise self._spawn_error(e) from None
        if run_id not in self._journaled:
            self._journaled = (*self._journaled, run_id)

    def _journal_forget(self) -> None:
        run_ids, self._journaled = self._journaled, ()
        if run_ids:
            self.core.journal_forget(self.journal_dir, list(run_ids))

    def _background(self, sweep: bool = False) -> None:
        """The core's retrier of pending stops, and with ``sweep`` (the hub
        has loaded every saved state: its first start or poll) the sweep of
        the journal after a restart; each once per hub process."""
        self.core.background(self.journal_dir, self.pending_stop_retry, sweep)

    async def _stop_later(self, state_json: str, why: str) -> bool:
        """The hub forgets a server that may still run on a host that does
        not answer: the core records a pending stop and retries it."""
        return await self.core.stop_later(
            self.journal_dir, state_json, why, self.pending_stop_retry
        )

    # ---- user options (the form and the REST API) -------------------------

    def _bounds_json(self) -> str:
        try:
            return self.core.form_bounds(
                list(self.user_hosts),
                self.user_mem_limit_max,
                self.user_cpu_limit_max,
                self.mem_limit or None,
                self.cpu_limit or None,
                (self.user_gpus_max, self.gpus),
            )
        except _core.SpawnerError as e:  # a misnamed user_hosts
            raise ValueError(str(e)) from None

    def _options_from_form_fields(self, form_data):
        """Check the submitted form on the hub; a refused value raises with a
        message the spawn page shows above the form: a value out of bounds, or
        more GPUs than any host had free in the form this user was shown."""
        for key, values in form_data.items():
            if not all(isinstance(v, str) for v in values):
                raise ValueError(f"invalid option {key!r}: files are not accepted")
        try:
            fields = json.dumps(form_data)
            return json.loads(self.core.validate_form(self.user.name, fields, self._bounds_json()))
        except _core.SpawnerError as e:
            raise ValueError(str(e)) from None

    def _user_choice(self) -> dict:
        """The user's options, validated again: they may come from the REST
        API (or a stored earlier spawn) without passing the form."""
        # wrapspawner's ProfilesSpawner keeps its own choice in
        # user_options["profile"] and shares user_options with the SSHSpawner
        # it wraps: that key is the wrapper's, not an option of ours.
        mine = {k: v for k, v in (self.user_options or {}).items() if k not in _WRAPPER_OPTIONS}
        try:
            options = json.dumps(mine)
        except (TypeError, ValueError):
            raise self._spawn_error(
                ValueError("invalid server options: not JSON (files are not accepted)")
            ) from None
        try:
            bounds = self._bounds_json()
        except ValueError as e:  # a misnamed user_hosts: the admin's to fix
            self.log.error("%s: %s", self._log_name, e)
            raise self._spawn_error(RuntimeError(f"the hub is misconfigured: {e}")) from None
        try:
            return json.loads(_core.validate_options(options, bounds))
        except _core.SpawnerError as e:
            raise self._spawn_error(e) from None

    async def _render_options_form(self) -> str:
        try:
            current = json.dumps(self.user_options or {})
        except (TypeError, ValueError):
            current = "{}"
        try:
            bounds = self._bounds_json()
        except ValueError as e:  # a misnamed user_hosts: the admin's to fix
            self.log.error("%s: cannot build the options form: %s", self._log_name, e)
            return (
                "<p>Servers cannot be started right now: the hub is misconfigured"
                f" ({html.escape(str(e))}). Please tell the hub's administrator.</p>"
            )
        try:
            return await self.core.options_form(
                self.user.name,
                bounds,
                current,
                self.options_form_cache,
                self.options_form_wait,
            )
        except _core.SpawnerError as e:
            self.log.warning("%s: cannot build the options form: %s", self._log_name, e)
            return (
                "<p>The hosts cannot be listed right now "
                f"({html.escape(str(e))}); the spawner will choose one.</p>"
            )

    _choice: dict = {}

    def get_env(self):
        env = super().get_env()
        if self._choice.get("mem_limit"):
            env["MEM_LIMIT"] = str(self._choice["mem_limit"])
        if self._choice.get("cpu_limit"):
            env["CPU_LIMIT"] = str(self._choice["cpu_limit"])
        return env

    def _request(self, exclude=()) -> str:
        self._choice = choice = self._user_choice()
        return json.dumps(
            {
                "username": self.user.name,
                "server_name": self.name or "",
                "mem_guarantee": self.mem_guarantee or None,
                "cpu_guarantee": self.cpu_guarantee or None,
                "gpus": choice.get("gpus", self.gpus),
                "mem_limit": choice.get("mem_limit") or self.mem_limit or None,
                "cpu_limit": choice.get("cpu_limit") or self.cpu_limit or None,
                "host": choice.get("host"),
                "exclude": list(exclude),
            }
        )

    def _redact(self, text: str) -> str:
        token = getattr(self, "api_token", None)
        return text.replace(token, "[secret]") if token else text

    def _spawn_error(self, e: Exception) -> Exception:
        """An error the spawn page and the REST API show as it is."""
        message = self._redact(str(e))
        kind = getattr(e, "kind", "error")
        if SpawnException is not None:
            status = 400 if kind == "invalid" else 503
            err = SpawnException(message, reason=kind, status_code=status)
        else:
            # JupyterHub 5 turns any other exception from a form spawn that
            # fails at once into "Unhandled error starting server": an
            # HTTPError passes through with its status, and the form shows
            # jupyterhub_message.
            err = web.HTTPError(400 if kind == "invalid" else 503, log_message=message)
        # What the progress page shows after "Spawn failed: " (without it,
        # JupyterHub 6 shows "503 SpawnException(reason=…): " first).
        err.jupyterhub_message = message
        return err

    def _progress_stream(self) -> _core.Progress:
        if self._progress is None:
            self._progress = _core.Progress()
        return self._progress

    async def _prepare(self, exclude=()) -> None:
        try:
            request = self._request(exclude)
            self._prepared = await self.core.prepare(request, self._progress_stream())
        except Exception as e:
            self._finish_progress()
            if not isinstance(e, _core.SpawnerError):
                raise
            raise self._spawn_error(e) from None
        # Recorded before anything is launched: a cancelled start leaves a
        # state that stop can act on, and a killed hub a journal entry.
        self._state_json = self._prepared.state
        try:
            await self._journal_write(self._prepared.state)
        except Exception:
            self._finish_progress()
            raise
        # Behind a tunnel the server listens on the host's loopback only.
        self.ip = "127.0.0.1" if self.tunnel else "0.0.0.0"
        self.port = self._prepared.port

    def _finish_progress(self) -> None:
        if self._progress is not None:
            self._progress.finish()

    # ---- certificates (internal_ssl) -----------------------------------

    async def create_certs(self):
        """Choose the host first, so the certificate names it."""
        if self._prepared is None:
            await self._prepare()
        names = self.ssl_alt_names
        if callable(names):
            names = names(self)
            if inspect.isawaitable(names):
                names = await names
        names = list(names)
        self.ssl_alt_names = names + [n for n in self._prepared.alt_names if n not in names]
        return await super().create_certs()

    async def move_certs(self, paths):
        """Copy key, certificate and CA into the server's directory (0600)."""
        try:
            keyfile, certfile, cafile = await self.core.upload_certs(
                self._prepared,
                paths["keyfile"],
                paths["certfile"],
                paths["cafile"],
                self._progress_stream(),
            )
        except _core.SpawnerError as e:
            self._finish_progress()
            raise self._spawn_error(e) from None
        return {"keyfile": keyfile, "certfile": certfile, "cafile": cafile}

    # ---- lifecycle ------------------------------------------------------

    async def start(self):
        """One await of the core's start loop (another port when the chosen
        one was taken, another host when one does not answer: the rules are
        in ``plan::retry``), with the hub's parts around it: progress, the
        journal of each state before its launch, pending stops for attempts
        abandoned on a host that did not answer."""
        began = time.monotonic()
        self._background(sweep=True)
        self._launching = True
        progress = self._progress_stream()
        try:
            if self._prepared is None:
                await self._prepare()
            cmd = list(self.cmd) + list(self.get_args())
            env = self.get_env()
            hub_api = None
            if self.hub_tunnel:
                hub_api = self.core.tell_hub_api(env["JUPYTERHUB_API_URL"], True)
            # The launch returns once the server listens (the hub's first
            # check then succeeds) or fails if it exits first; it waits at
            # most what is left of start_timeout, less a margin so the hub
            # never cancels a start that is fine.
            left = self.start_timeout - (time.monotonic() - began) - 2.0
            steps = _core.StartSteps()
            failed = []  # what the hub could not record
            # Not cancelled with start(): steps already taken are still acted on.
            recorder = asyncio.ensure_future(self._record_steps(steps, failed))
            try:
                self._state_json = await self.core.start(
                    self._prepared,
                    self._request(),
                    sorted(env.items()),
                    cmd,
                    progress,
                    steps,
                    max(0.0, left),
                    not self.internal_ssl,
                    hub_api,
                )
            except _core.SpawnerError as e:
                await recorder
                if failed:
                    raise failed[0] from None
                raise self._spawn_error(e) from None
            await recorder
            state = json.loads(self._state_json)
            self.port = state["port"]
            if state.get("tunnel_port"):
                return ("127.0.0.1", state["tunnel_port"])
            return (state["address"], self.port)
        finally:
            self._launching = False
            self._finish_progress()

    async def _record_steps(self, steps, failed: list) -> None:
        """The hub's side of each step of a start (until the start is over):
        a state about to be launched is journaled first (a killed hub stops it
        after a restart) and becomes the state stop() acts on; an attempt
        abandoned on a host that did not answer becomes a pending stop."""
        while (step := await steps.next()) is not None:
            if step.kind == "abandoned":
                self.log.warning("%s: %s; it is stopped once it answers", self._log_name, step.why)
                await self._stop_later(step.state, step.why)
                continue
            self._state_json = step.state
            try:
                await self._journal_write(step.state)
            except Exception as e:  # noqa: BLE001 -- handed to start()
                failed.append(e)
                step.done(str(e))
            else:
                step.done()

    def _hub_api_url(self) -> str:
        """The hub API URL the server is given, as Spawner.get_env builds it:
        ``Spawner.environment`` overrides it last, so start and every poll
        agree on where a hub tunnel carries."""
        url = self.environment.get("JUPYTERHUB_API_URL")
        if url is not None:
            return str(url(self) if callable(url) else url)
        if self.hub_connect_url is not None:
            path = urlsplit(self.hub.api_url).path
            return self.hub_connect_url.rstrip("/") + "/" + path.lstrip("/")
        return self.hub.api_url

    def _tell_hub_api(self) -> None:
        """A saved state's hub tunnel carries to this hub's API, nowhere else
        (also for a server started before hub_tunnel was turned off)."""
        if self.hub is not None:
            self.core.tell_hub_api(self._hub_api_url(), self.hub_tunnel)

    async def poll(self):
        """The core's answer (``spawner::watch``): a host that does not answer
        keeps the server for ``unreachable_grace``, the first poll after a
        restart waits for it, past the grace the server is reported stopped
        and left to a pending stop."""
        self._background(sweep=True)
        if self._state_json is None:
            return 0
        if self._launching:
            return None
        if self._journaled:
            # start() returned and the hub committed the state right after it.
            self._journal_forget()
        self._tell_hub_api()
        before = self._state_json
        status, after = await self.core.watch_poll(self._watch, before)
        _drain_logs(self.log)  # what the poll found is logged before the hub acts on it
        if self._state_json == before:
            # A tunnel that moved to another local port: see get_url().
            self._state_json = after
        return status

    async def get_url(self):
        """The server's URL as it is now. JupyterHub asks after a restart's
        first poll and, if it differs from its database, moves the server
        there (and its proxy route): a tunnel may listen on another port, a
        host may have a new address."""
        url = self.server.url
        now = self._watch.url(self._state_json, url) if self._state_json else url
        orm = getattr(self, "orm_spawner", None)
        if now != url and orm is not None:
            # Saved with the new address by the hub's commit that follows.
            orm.state = self.get_state()
        return now

    async def stop(self, now=False):
        self._background()
        if self._state_json is None:
            return
        try:
            result = await self.core.stop(self._state_json)
            self.log.info("%s: stopped (%s)", self._log_name, result)
        except _core.SpawnerError as e:
            if e.unreachable or e.kind == "refused":
                # The hub forgets the server now; keep trying to stop it,
                # also after a hub restart (a refused state: once the
                # configuration accepts it).
                await self._stop_later(self._state_json, f"stop of {self._log_name} unanswered")
            raise RuntimeError(self._redact(str(e))) from None

    async def progress(self):
        stream = self._progress_stream()
        cursor = 0
        while True:
            events = await stream.next(cursor)
            if not events:
                return
            cursor += len(events)
            for pct, message in events:
                yield {"progress": pct, "message": message}

    # ---- state (no I/O) -------------------------------------------------

    def get_state(self):
        state = super().get_state()
        if self._state_json:
            state["ssh"] = json.loads(self._state_json)
        return state

    def load_state(self, state):
        super().load_state(state)
        ssh = state.get("ssh")
        if ssh and ssh.get("username") != self.user.name:
            # The state of another hub user in this user's row: never act on it.
            self.log.error(
                "%s: ignoring a saved state that belongs to user %r",
                self._log_name,
                ssh.get("username"),
            )
            ssh = None
        if ssh:
            self._state_json = json.dumps(ssh)
            self._watch.loaded()
            run_id = ssh.get("run_id")
            if isinstance(run_id, str):
                # The database knows this run: the journal need not.
                _core.claim_run(run_id)

    def clear_state(self):
        super().clear_state()
        self._journal_forget()
        self._state_json = None
        self._prepared = None
        self._progress = None
        self._watcher = None


def _hub_starting() -> None:
    """A restarted hub with no running server calls no spawner at all, so the
    retrier of pending stops starts with the hub: JupyterHub looks the class
    up again (``ssh_spawner.SSHSpawner``, see ``__init__``) when it loads
    its configuration, inside ``JupyterHub.initialize()`` with its event
    loop running (JupyterHub 5 and 6). Its first import happens earlier,
    while the hub constructs itself, before both."""
    global _HUB_SEEN
    try:
        loop = asyncio.get_running_loop()
        from jupyterhub.app import JupyterHub
    except (RuntimeError, ImportError):
        return
    if _HUB_SEEN or not JupyterHub.initialized():
        return
    _HUB_SEEN = True
    # Run once the configuration is loaded: the rest of initialize() runs
    # before the loop takes its next callback.
    loop.call_soon(_retry_pending_stops_at_hub_start, JupyterHub.instance())


def _retry_pending_stops_at_hub_start(app) -> None:
    try:
        SSHSpawner(config=app.config, log=app.log)._background()
    except Exception:  # noqa: BLE001 -- never break the hub
        app.log.exception("SSHSpawner: cannot start retrying the pending stops")
