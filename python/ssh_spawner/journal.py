"""The hub-side journal of starts in flight.

JupyterHub saves a spawner's state to its database only after ``start()``
returns. A hub killed between the launch on the host and that save has a
server running that its database does not know: after a restart nobody would
ever stop it. So before anything is launched, the spawner writes one small
file per run here (0600, in a 0700 directory) and removes it once the state is
safely in the database (the first poll after the start, a stop, or the
restarted hub loading that state). After a restart, the first spawner call
sweeps the journal: every run written by a hub process that is gone and not
claimed by a state the database holds is stopped on its host.

A second journal, ``stops/`` inside it, holds the pending stops: a server
the hub has forgotten (a stop that could not reach its host, or a server
reported stopped after ``unreachable_grace``) while it may still run. Each
entry is retried until its host answers and the stop is done, by this hub
process and, after a restart, by the next one.

The parts that decide (entry text, what to sweep, what to retry) are plain
functions; the rest reads and writes files. The spawner runs the file I/O in a
thread (``fsync`` must not block the hub's event loop).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

SUFFIX = ".json"


@dataclass(frozen=True)
class Writer:
    """A hub process: its pid and its start time (clock ticks since boot)."""

    pid: int
    start: int


@dataclass(frozen=True)
class Entry:
    run_id: str
    state: str  # the core's server state, JSON text
    writer: Writer


def encode(state_json: str, writer: Writer) -> str:
    """One journal entry. The state holds nothing secret (no token, no key)."""
    state = json.loads(state_json)
    run_id = state.get("run_id")
    if not isinstance(run_id, str) or not run_id:
        raise ValueError("server state without a run_id")
    return json.dumps(
        {
            "version": 1,
            "run_id": run_id,
            "state": state,
            "writer": {"pid": writer.pid, "start": writer.start},
        },
        sort_keys=True,
    )


def decode(text: str) -> Entry:
    """Parse an entry; a malformed one is a ValueError naming what is wrong."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("version") != 1:
        raise ValueError("not a version 1 journal entry")
    run_id, state, writer = doc.get("run_id"), doc.get("state"), doc.get("writer")
    if not isinstance(run_id, str) or not run_id or not _safe_name(run_id):
        raise ValueError(f"bad run_id {run_id!r}")
    if not isinstance(state, dict) or state.get("run_id") != run_id:
        raise ValueError("state missing or for another run")
    if not isinstance(writer, dict):
        raise ValueError("writer missing")
    pid, start = writer.get("pid"), writer.get("start")
    if not (isinstance(pid, int) and isinstance(start, int)) or pid <= 0 or start < 0:
        raise ValueError(f"bad writer {writer!r}")
    return Entry(run_id, json.dumps(state), Writer(pid, start))


def _safe_name(run_id: str) -> bool:
    return len(run_id) <= 64 and all(c.isascii() and (c.isalnum() or c in "-_") for c in run_id)


def file_name(run_id: str) -> str:
    if not _safe_name(run_id):
        raise ValueError(f"bad run_id {run_id!r}")
    return run_id + SUFFIX


def to_sweep(entries: list[Entry], claimed: set[str], me: Writer, alive: set[Writer]) -> tuple:
    """Decide what a sweep does with each entry.

    Returns (stop, forget): ``stop`` are runs nobody owns any more (written by
    a hub process that is gone, and no state in the database names them): their
    servers must be stopped. ``forget`` are entries whose run the database
    knows (``claimed``): the entry is no longer needed. Entries of this process
    or of another live hub process are left alone.
    """
    stop, forget = [], []
    for e in entries:
        if e.run_id in claimed:
            forget.append(e)
        elif e.writer == me or e.writer in alive:
            continue
        else:
            stop.append(e)
    return stop, forget


def stops_to_retry(entries: list[Entry], me: Writer, alive: set[Writer]) -> list[Entry]:
    """The pending stops this process retries: its own, and those of hub
    processes that are gone. A pending stop of another live hub process (two
    hubs sharing a journal) is that process's to finish."""
    return [e for e in entries if e.writer == me or e.writer not in alive]


# ---- I/O -------------------------------------------------------------------


def proc_start(pid: int) -> int | None:
    """Start time of a process (clock ticks since boot), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def this_process() -> Writer:
    pid = os.getpid()
    return Writer(pid, proc_start(pid) or 0)


def is_alive(w: Writer) -> bool:
    return proc_start(w.pid) == w.start


class Journal:
    """The journal directory (created 0700; entries 0600)."""

    def __init__(self, directory: str):
        self.dir = Path(directory).expanduser().absolute()

    def _ensure_dir(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.dir.stat()
        if st.st_mode & 0o077:
            os.chmod(self.dir, 0o700)

    def write(self, state_json: str) -> str:
        """Record a run before it is launched; returns its run id. Durable
        (fsync) before it returns."""
        self._ensure_dir()
        text = encode(state_json, this_process())
        run_id = json.loads(text)["run_id"]
        path = self.dir / file_name(run_id)
        tmp = self.dir / ("." + file_name(run_id) + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return run_id

    def remove(self, run_id: str) -> None:
        try:
            (self.dir / file_name(run_id)).unlink()
        except (FileNotFoundError, ValueError):
            pass

    def read_all(self) -> tuple[list[Entry], list[tuple[Path, str]]]:
        """Every entry, and the files that are not valid entries (with why)."""
        entries, bad = [], []
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return entries, bad
        for name in names:
            if not name.endswith(SUFFIX) or name.startswith("."):
                continue
            path = self.dir / name
            try:
                e = decode(path.read_text())
                if file_name(e.run_id) != name:
                    raise ValueError("file name does not match its run_id")
                entries.append(e)
            except (OSError, ValueError, UnicodeDecodeError) as err:
                bad.append((path, str(err)))
        return entries, bad
