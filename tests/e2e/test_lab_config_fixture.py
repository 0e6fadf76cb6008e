"""A lab's ``jupyterhub_config.py`` (``fixtures/config``) loaded as JupyterHub
loads it, with traitlets' own file loader: the spawner class it names is
this package's, SSHSpawner takes every option, the core accepts what the
class sends, and what it sends is what the admin CLI's ``spawner.toml``
beside it says (``tests/fixtures_config.rs`` loads that file in Rust). No
hub and no testbed needed; here because scripts/test runs pytest on this
directory."""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path

import tomllib  # Python 3.11+, as in both of scripts/test's hub environments
from ssh_spawner import _core
from ssh_spawner.spawner import SSHSpawner
from traitlets.config.loader import PyFileConfigLoader

CONFIG = Path(__file__).resolve().parents[2] / "fixtures" / "config"


def lab_config():
    return PyFileConfigLoader("jupyterhub_config.py", path=str(CONFIG)).load_config()


def test_the_config_names_this_spawner_and_it_takes_every_option():
    c = lab_config()
    assert c.JupyterHub.spawner_class == "ssh"
    (ep,) = [e for e in entry_points(group="jupyterhub.spawners") if e.name == "ssh"]
    assert ep.load() is SSHSpawner
    sp = SSHSpawner(config=c)
    assert sp.hosts == [
        "node1.lab.example.org",
        "node2.lab.example.org",
        {"address": "node3.lab.example.org", "max_servers": 20, "drain": True},
        {
            "address": "10.0.0.13",
            "port": 2222,
            "name": "gpu1",
            "max_servers": 4,
            "prologue": ["module load cuda/12.2"],
        },
    ]
    assert sp.key_path == "/etc/jupyterhub/ssh/hub_ed25519"
    assert sp.known_hosts == "/etc/jupyterhub/ssh/known_hosts"
    assert sp.host_selection == "least-loaded"
    assert tuple(sp.port_range) == (21000, 21999)
    assert sp.stop_grace == 15.0
    assert sp.max_sessions_per_connection == 8
    # Spawner options reach the subclass.
    assert sp.cmd == ["/opt/conda/envs/jupyter/bin/jupyterhub-singleuser"]
    assert sp.default_url == "/lab"
    assert sp.mem_limit == 4 * 1024**3
    assert sp.mem_guarantee == 2 * 1024**3
    assert sp.start_timeout == 120
    # The core validates and takes what the class sends.
    _core.Core(sp._config_json())


def test_the_class_sends_what_the_clis_toml_says():
    sent = json.loads(SSHSpawner(config=lab_config())._config_json())
    toml = tomllib.loads((CONFIG / "spawner.toml").read_text())
    _, not_from_hub = _core.config_fields()
    not_from_hub = dict(not_from_hub)
    shared = set(toml) - set(not_from_hub)
    assert shared == {
        "known_hosts",
        "key_path",
        "host_selection",
        "port_range",
        "state_dir",
        "prologue",
        "enforcement",
        "stop_grace",
        "keep_log",
        "connect_timeout",
        "command_timeout",
        "max_sessions_per_connection",
        "hosts",
    }, shared
    for key in sorted(shared):
        assert sent[key] == toml[key], (key, sent[key], toml[key])
    # The CLI's own `command` is the hub's Spawner.cmd.
    assert set(toml) - shared == {"command"}
    assert toml["command"] == lab_config().Spawner.cmd
