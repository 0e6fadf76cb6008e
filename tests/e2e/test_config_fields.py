"""The options are listed once: the traitlets tagged ``rust=True`` are the
core's configuration fields, name for name, and ``_config_json`` sends each
of them. No testbed needed; here because scripts/test runs pytest on this
directory (under both JupyterHub versions)."""

from __future__ import annotations

import json

from ssh_spawner import _core
from ssh_spawner.spawner import SSHSpawner


def core_fields() -> tuple[set[str], dict[str, str]]:
    fields, not_from_hub = _core.config_fields()
    return set(fields), dict(not_from_hub)


def test_tagged_traitlets_are_the_cores_fields():
    fields, not_from_hub = core_fields()
    assert "hosts" in fields and "keepalive_count" in fields, fields
    assert set(not_from_hub) <= fields, not_from_hub
    tagged = set(SSHSpawner.class_trait_names(rust=True))
    expected = fields - set(not_from_hub)
    assert tagged == expected, (
        f"tagged rust=True but no core field: {sorted(tagged - expected)}; "
        f"core fields no traitlet sends: {sorted(expected - tagged)}"
    )
    traits = SSHSpawner.class_traits(rust=True)
    assert all(t.metadata.get("config") for t in traits.values()), "a sent option is configurable"


def test_config_json_sends_every_tagged_option_and_the_core_takes_it():
    sp = SSHSpawner(
        hosts=["node1.lab", {"address": "10.0.0.12", "name": "gpu1", "max_servers": 8}],
        key_path="/etc/jupyterhub/ssh/{username}_ed25519",
        agent_socket="/run/agent.sock",
        port_range=(21000, 21999),
        prologue=["module load python"],
        keepalive_count=5,
    )
    sent = json.loads(sp._config_json())
    assert set(sent) == set(SSHSpawner.class_trait_names(rust=True))
    assert sent["hosts"] == [
        {"address": "node1.lab"},
        {"address": "10.0.0.12", "name": "gpu1", "max_servers": 8},
    ]
    assert sent["port_range"] == {"start": 21000, "end": 21999}
    assert sent["prologue"] == ["module load python"]
    assert sent["keepalive_count"] == 5
    # The core refuses unknown names (serde deny_unknown_fields): it takes all.
    _core.Core(sp._config_json())
    # Unset options are left to the core's defaults, not sent as null.
    unset = json.loads(SSHSpawner(hosts=["node1.lab"])._config_json())
    assert "key_path" not in unset and "agent_socket" not in unset, unset
    try:
        _core.Core(json.dumps({**unset, "no_such_option": 1}))
    except _core.SpawnerError as e:
        assert "no_such_option" in str(e), e
    else:
        raise AssertionError("the core took an option it does not know")


def test_pending_stop_retry_is_bounded():
    """The hub-only retry interval of pending stops refuses what would spin
    (0, negative) or never retry (inf), naming the option."""
    import math

    import pytest
    from traitlets import TraitError

    s = SSHSpawner()
    assert s.pending_stop_retry == 15.0
    for bad in (0.0, -1.0, 0.1, 3601.0, math.inf, math.nan):
        with pytest.raises(TraitError, match="pending_stop_retry"):
            s.pending_stop_retry = bad
    s.pending_stop_retry = 2.0
    assert s.pending_stop_retry == 2.0
