"""The hub-side journal of starts in flight: its plain parts (entry text, what
a sweep does) and its files. No test bed needed; the e2e test
test_reliability.py::test_hub_sigkilled_mid_start_leaves_no_orphan runs it
for real."""

from __future__ import annotations

import json
import os
import stat

import pytest
from ssh_spawner.journal import Entry, Journal, Writer, decode, encode, stops_to_retry, to_sweep

STATE = json.dumps({"run_id": "0123456789abcdef", "host": "node1", "dir": "/h/x/0123456789abcdef"})
ME = Writer(100, 5000)
DEAD = Writer(200, 6000)
OTHER = Writer(300, 7000)


def entry(run_id: str, writer: Writer) -> Entry:
    return Entry(run_id, json.dumps({"run_id": run_id}), writer)


def test_entries_round_trip_and_hold_no_more_than_the_state():
    text = encode(STATE, ME)
    e = decode(text)
    assert e.run_id == "0123456789abcdef"
    assert json.loads(e.state) == json.loads(STATE)
    assert e.writer == ME
    assert set(json.loads(text)) == {"version", "run_id", "state", "writer"}


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "not JSON"),
        ("[]", "version 1"),
        ('{"version": 2}', "version 1"),
        ('{"version": 1, "run_id": "../x", "state": {}, "writer": {}}', "bad run_id"),
        ('{"version": 1, "run_id": "ab", "state": {"run_id": "cd"}, "writer": {}}', "another run"),
        (
            '{"version": 1, "run_id": "ab", "state": {"run_id": "ab"},'
            ' "writer": {"pid": -1, "start": 0}}',
            "bad writer",
        ),
        (
            '{"version": 1, "run_id": "ab", "state": {"run_id": "ab"},'
            ' "writer": {"pid": "1", "start": 0}}',
            "bad writer",
        ),
    ],
)
def test_malformed_entries_are_named_errors(text, why):
    with pytest.raises(ValueError, match=why):
        decode(text)


def test_state_without_run_id_is_refused():
    with pytest.raises(ValueError, match="run_id"):
        encode("{}", ME)


def test_sweep_stops_only_unclaimed_runs_of_dead_writers():
    entries = [
        entry("a", DEAD),  # a dead hub's start the database never saw: stop
        entry("b", DEAD),  # a dead hub's start the database knows: forget the entry
        entry("c", ME),  # a start in flight in this process: leave
        entry("d", OTHER),  # another live hub's start: leave
        entry("e", ME),  # this process's, and saved already: forget
    ]
    stop, forget = to_sweep(entries, {"b", "e"}, ME, {OTHER})
    assert [e.run_id for e in stop] == ["a"]
    assert [e.run_id for e in forget] == ["b", "e"]


def test_a_recycled_pid_is_not_the_same_writer():
    # Same pid, another start time: the writer died and its pid was reused.
    stop, _ = to_sweep([entry("a", Writer(ME.pid, ME.start - 1))], set(), ME, set())
    assert [e.run_id for e in stop] == ["a"]


def test_files_are_private_and_bad_ones_reported(tmp_path):
    j = Journal(str(tmp_path / "journal"))
    run_id = j.write(STATE)
    path = tmp_path / "journal" / f"{run_id}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "journal").stat().st_mode) == 0o700
    (tmp_path / "journal" / "garbage.json").write_text("{")
    (tmp_path / "journal" / "ffff.json").write_text(encode(STATE, ME))  # name != run id
    entries, bad = j.read_all()
    assert [e.run_id for e in entries] == [run_id]
    assert sorted(p.name for p, _ in bad) == ["ffff.json", "garbage.json"]
    j.remove(run_id)
    j.remove(run_id)  # twice is fine
    j.remove("../../etc/passwd")  # never outside the journal
    assert not path.exists()
    assert not [n for n in os.listdir(tmp_path / "journal") if n.startswith(".")]


def test_pending_stops_retried_are_this_processes_and_dead_hubs():
    entries = [entry("a", ME), entry("b", DEAD), entry("c", OTHER)]
    assert [e.run_id for e in stops_to_retry(entries, ME, {OTHER})] == ["a", "b"]
