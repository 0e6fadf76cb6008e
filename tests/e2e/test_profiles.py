"""wrapspawner's ProfilesSpawner (1.0.1, as published) wrapping
SSHSpawner: two profiles, "small on any host" and "large on node3", each
spawned through the REST API and through the form in a browser; where and with
which limits each runs; poll, stop and a hub restart through the wrapper (the
SSHSpawner state round-trips inside the wrapper's). With GPUs (node3 gets the
stand-in nvidia-smi with two GPUs): `gpus` per profile, and two profiles that
are cores of their own never give one GPU twice.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3

import pytest

from . import test_browser
from .conftest import (
    assert_server_process,
    group_members,
    proc_start_time,
    standin_gpus,
    wait_until,
)
from .test_browser import webdriver

if webdriver is not None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

# The browser test's headless Chromium, as a fixture of this module too.
browser = test_browser.browser
ALICE = "tb-alice"
BOB = "tb.bob-2"
SMALL_MEM = 512 * 1024**2
LARGE_MEM = 2 * 1024**3


def wrapped_state(hub, user: str, name: str = "") -> dict:
    """The wrapper's state in the hub's database (profile, child_state)."""
    db = sqlite3.connect(hub.dir / "jupyterhub.sqlite")
    try:
        row = db.execute(
            "SELECT spawners.state FROM spawners JOIN users ON spawners.user_id = users.id"
            " WHERE users.name = ? AND spawners.name = ?",
            (user, name),
        ).fetchone()
    finally:
        db.close()
    assert row and row[0], f"no spawner state for {user}/{name}"
    return json.loads(row[0])


def profiles_config(testbed, gpus: bool = False) -> dict:
    """Two profiles; with `gpus`, "large" asks for one GPU and a third
    profile, "gpu" (any host, so the same core as "small"), asks for one."""
    node3 = next(h for h in testbed["hosts"] if h["name"] == "node3")
    config = {
        "JupyterHub.spawner_class": "wrapspawner.ProfilesSpawner",
        "JupyterHub.cleanup_servers": False,
        "Spawner.poll_interval": 2,
        "ProfilesSpawner.profiles": [
            (
                "Small, on any host",
                "small",
                "ssh_spawner.SSHSpawner",
                {"mem_limit": "512M", "cpu_limit": 0.5},
            ),
            (
                "Large, on node3",
                "large",
                "ssh_spawner.SSHSpawner",
                {
                    "hosts": [{"address": node3["address"], "name": "node3"}],
                    "mem_limit": "2G",
                    "cpu_limit": 2.0,
                },
            ),
        ],
    }
    if gpus:
        profiles = config["ProfilesSpawner.profiles"]
        profiles[1][3]["gpus"] = 1
        profiles.append(("One GPU, any host", "gpu", "ssh_spawner.SSHSpawner", {"gpus": 1}))
    return config


def test_profiles_spawner_wraps_sshspawner_with_gpus_per_profile_never_given_twice(
    testbed, hub_factory
):
    pytest.importorskip("wrapspawner")
    with standin_gpus(testbed, node3="rtx4090x2-idle"):
        profiles_spawner_round(testbed, hub_factory)


def profiles_spawner_round(testbed, hub_factory):
    hub = hub_factory(profiles_config(testbed, gpus=True))

    r = hub.request_spawn(ALICE, json={"profile": "small"})
    assert r.status_code in (201, 202), (r.status_code, r.text)
    hub.wait_ready(ALICE)
    r = hub.request_spawn(BOB, json={"profile": "large"})
    assert r.status_code in (201, 202), (r.status_code, r.text)
    hub.wait_ready(BOB)

    small, large = wrapped_state(hub, ALICE), wrapped_state(hub, BOB)
    assert small["profile"] == "small" and large["profile"] == "large", (small, large)
    s_small, s_large = small["child_state"]["ssh"], large["child_state"]["ssh"]
    assert s_large["host"] == "node3", s_large
    _, env_small = assert_server_process(testbed, s_small, ALICE)
    _, env_large = assert_server_process(testbed, s_large, BOB)
    assert env_small["MEM_LIMIT"] == str(SMALL_MEM) and env_small["CPU_LIMIT"] == "0.5"
    assert env_large["MEM_LIMIT"] == str(LARGE_MEM) and env_large["CPU_LIMIT"] == "2.0"
    # "large" asked for a GPU (small for none); "gpu" is another core (its
    # hosts differ from large's) and still does not get large's GPU, then
    # finds none left.
    assert len(s_large["gpus"]) == 1 and env_large["CUDA_VISIBLE_DEVICES"] == s_large["gpus"][0]
    assert not s_small.get("gpus"), s_small
    r = hub.request_spawn(ALICE, "g", json={"profile": "gpu"})
    assert r.status_code in (201, 202), (r.status_code, r.text)
    hub.wait_ready(ALICE, "g")
    s_gpu = wrapped_state(hub, ALICE, "g")["child_state"]["ssh"]
    assert s_gpu["host"] == "node3" and len(s_gpu["gpus"]) == 1, s_gpu
    assert s_gpu["gpus"] != s_large["gpus"], (s_gpu, s_large)
    r = hub.request_spawn(BOB, "g", json={"profile": "gpu"})
    said = r.text + "\n" + hub.progress_failure(BOB, "g")
    assert "no host has 1 free GPU" in said and "node3: 0 of 2 GPUs free" in said, said
    hub.stop_server(ALICE, "g")
    for user in (ALICE, BOB):
        r = hub.proxy_get(f"/user/{user}/api/status")
        assert r.status_code == 200, (user, r.status_code, r.text[:300])

    # Hub restart: the wrapper's state brings back its profile and SSHSpawner's state.
    hub.stop()
    for s in (s_small, s_large):
        assert proc_start_time(s["pid"]) == s["start_time"], "hub exit killed a server"
    log_before = len(hub.log_text())
    hub.start()
    for user in (ALICE, BOB):
        wait_until(
            lambda user=user: hub.proxy_get(f"/user/{user}/api/status").status_code == 200,
            30,
            what=f"{user}'s server to be routed again",
        )
    assert wrapped_state(hub, ALICE)["child_state"]["ssh"] == s_small
    assert wrapped_state(hub, BOB)["child_state"]["ssh"] == s_large
    log = hub.log_text()[log_before:]
    assert f"{ALICE} still running" in log and f"{BOB} still running" in log

    # Poll through the wrapper: a server killed behind the hub's back is noticed.
    group = group_members(s_small["pgid"])
    for p in group:
        os.kill(p.pid, signal.SIGKILL)
    wait_until(lambda: hub.server_model(ALICE) is None, 30, what="poll to notice alice's exit")

    # Stop through the wrapper: nothing of bob's server is left.
    hub.stop_server(BOB)
    assert proc_start_time(s_large["pid"]) != s_large["start_time"]
    assert not group_members(s_large["pgid"])


def test_profiles_form_in_a_browser(testbed, hub_factory, request):
    """The wrapper's form (a select of the profiles) in headless Chromium:
    choosing "large" starts the server on node3 with its limits."""
    pytest.importorskip("wrapspawner")
    hub = hub_factory(profiles_config(testbed))
    b = request.getfixturevalue("browser")
    wait = WebDriverWait(
        b,
        60,
        poll_frequency=0.1,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    )
    b.get(f"{hub.url}/hub/login")
    b.find_element(By.ID, "username_input").send_keys(ALICE)
    b.find_element(By.ID, "password_input").send_keys("e2e")
    b.find_element(By.ID, "login_submit").click()
    wait.until(lambda d: "/hub/login" not in d.current_url)

    b.get(f"{hub.url}/hub/spawn")
    select = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, 'select[name="profile"]'))
    options = {
        o.get_attribute("value"): o.text for o in select.find_elements(By.TAG_NAME, "option")
    }
    assert options == {"small": "Small, on any host", "large": "Large, on node3"}, options
    Select(select).select_by_value("large")
    b.find_element(By.CSS_SELECTOR, '#spawn_form [type="submit"]').click()
    wait.until(lambda d: f"/user/{ALICE}/" in d.current_url)

    state = wrapped_state(hub, ALICE)
    assert state["profile"] == "large", state
    ssh = state["child_state"]["ssh"]
    assert ssh["host"] == "node3", ssh
    _, env = assert_server_process(testbed, ssh, ALICE)
    assert env["MEM_LIMIT"] == str(LARGE_MEM) and env["CPU_LIMIT"] == "2.0"
    hub.stop_server(ALICE)
    assert not group_members(ssh["pgid"])
