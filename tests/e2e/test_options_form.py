"""The spawn options form, without a browser: what the hub renders, and what
it refuses on the server side, whether the values come from the form or
straight through the REST API."""

from __future__ import annotations

import html
import re
import time
from urllib.parse import quote

import requests

from .conftest import assert_server_process, host_cut, wait_until

ALICE = "tb-alice"


def form_hub(hub_factory, testbed, **extra):
    names = [h["name"] for h in testbed["hosts"]]
    config = {
        "SSHSpawner.options_form_enabled": True,
        "SSHSpawner.user_hosts": names[:2],
        "SSHSpawner.user_mem_limit_max": "1G",
        "SSHSpawner.user_cpu_limit_max": 1.0,
        "SSHSpawner.enforcement": "none",
    }
    config.update(extra)
    return hub_factory(config), names


def login(hub, user: str) -> requests.Session:
    """Log in through the login page, as a browser would (DummyAuthenticator)."""
    s = requests.Session()
    page = s.get(f"{hub.url}/hub/login", timeout=10)
    page.raise_for_status()
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page.text).group(1)
    r = s.post(
        f"{hub.url}/hub/login",
        data={"username": user, "password": "e2e", "_xsrf": xsrf},
        timeout=10,
        allow_redirects=False,
    )
    assert r.status_code == 302, (r.status_code, r.text[:500])
    return s


def spawn_page(hub, s: requests.Session, user: str) -> tuple[str, str]:
    """The spawn page's HTML and its xsrf token."""
    r = s.get(f"{hub.url}/hub/spawn/{quote(user)}", timeout=30)
    assert r.status_code == 200, (r.status_code, r.text[:500])
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', r.text)
    token = xsrf.group(1) if xsrf else s.cookies.get("_xsrf", "")
    return r.text, token


def refused(hub, user: str, options: dict) -> str:
    """POST the options through the REST API; the spawn must be refused.
    Returns what the user is told (the response and the progress stream)."""
    r = hub.request_spawn(user, json=options)
    assert r.status_code >= 400, (options, r.status_code, r.text)
    said = r.text + "\n" + hub.progress_failure(user)
    print(f"REFUSED {options} -> HTTP {r.status_code}: {said.strip()[:300]!r}")
    assert not hub.user_model(user)["servers"], hub.user_model(user)
    return said


def test_form_refuses_values_outside_bounds(testbed, hub_factory):
    hub, names = form_hub(hub_factory, testbed)
    hub.create_user(ALICE)

    # REST API: a host the admin did not offer, too much memory, too many
    # cores, an option that does not exist, a value that is not a value.
    said = refused(hub, ALICE, {"host": names[2]})
    assert f'host "{names[2]}"' in said and f"{names[0]}, {names[1]}" in said, said
    said = refused(hub, ALICE, {"mem_limit": "64G"})
    assert "memory (mem_limit)" in said and "between 128M and 1G" in said, said
    said = refused(hub, ALICE, {"cpu_limit": 8})
    assert "cpu_limit" in said and "between 0.1 and 1" in said, said
    said = refused(hub, ALICE, {"image": "evil"})
    assert '"image"' in said and "host, mem_limit, cpu_limit" in said, said
    said = refused(hub, ALICE, {"mem_limit": {"$gt": 1}})
    assert "mem_limit" in said and "an object" in said, said
    assert not hub.my_procs(), "a refused spawn must start nothing"

    # The form: a refused value comes back to the form with the message.
    s = login(hub, ALICE)
    page, xsrf = spawn_page(hub, s, ALICE)
    assert 'name="mem_limit"' in page and 'name="cpu_limit"' in page, page
    assert f'value="{names[2]}"' not in page, "a host users may not choose is offered"
    r = s.post(
        f"{hub.url}/hub/spawn/{quote(ALICE)}",
        data={"host": "auto", "mem_limit": "64G", "cpu_limit": "", "_xsrf": xsrf},
        timeout=30,
        allow_redirects=False,
    )
    text = html.unescape(r.text)
    assert r.status_code == 200, (r.status_code, text[:1000])
    assert 'memory (mem_limit) "64G": must be between 128M and 1G' in text, text
    assert 'name="mem_limit"' in text, "the form is shown again"
    r = s.post(
        f"{hub.url}/hub/spawn/{quote(ALICE)}",
        data={"host": names[2], "_xsrf": xsrf},
        timeout=30,
        allow_redirects=False,
    )
    assert f'host "{names[2]}": not one you may choose' in html.unescape(r.text), r.text
    assert not hub.user_model(ALICE)["servers"]
    assert not hub.my_procs()

    # Within bounds: the server runs where asked, with the limit asked for.
    r = hub.request_spawn(ALICE, json={"host": names[1], "mem_limit": "512M", "cpu_limit": "0.5"})
    assert r.status_code in (201, 202), (r.status_code, r.text)
    hub.wait_ready(ALICE)
    state = hub.ssh_state(ALICE)
    assert state["host"] == names[1], state
    _, env = assert_server_process(testbed, state, ALICE)
    assert env["MEM_LIMIT"] == str(512 << 20), env.get("MEM_LIMIT")
    assert env["CPU_LIMIT"] == "0.5", env.get("CPU_LIMIT")


def test_form_shows_live_figures_and_a_down_host_cannot_be_chosen(testbed, hub_factory):
    hub, names = form_hub(
        hub_factory,
        testbed,
        **{
            "SSHSpawner.user_hosts": names_of(testbed),
            "SSHSpawner.connect_timeout": 2.0,
            "SSHSpawner.options_form_wait": 2.0,
        },
    )
    down = names[2]
    s = login(hub, ALICE)
    with host_cut(testbed, down):
        t0 = time.monotonic()
        page, _ = spawn_page(hub, s, ALICE)
        took = time.monotonic() - t0
        text = html.unescape(page)
        print(f"FORM_RENDER_SECONDS down_host={took:.2f}")
        assert took < 6, f"the form waited {took:.1f} s for a host that does not answer"
        for name in names[:2]:
            row = re.search(rf"<strong>{re.escape(name)}</strong>: ([^<]*)<", text)
            assert row, text
            assert re.fullmatch(
                r"\d+(\.\d)?[KMGT]? free, load \d+\.\d on \d+ cores, \d+ servers?", row.group(1)
            ), row.group(1)
        assert re.search(rf'value="{re.escape(down)}" disabled', page), page
        assert f"<strong>{down}</strong>: not answering" in text, text
        # Opened again at once: the figures are shared, not read again.
        t0 = time.monotonic()
        spawn_page(hub, s, ALICE)
        assert time.monotonic() - t0 < 1.5

        # A user who pins the down host (REST API) is told, and nothing moves.
        said = refused(hub, ALICE, {"host": down})
        assert f"{down}, the host you chose, cannot take the server now" in said, said
        assert "choose another host or let the spawner choose" in said, said
        assert f"Spawn failed: {down}, the host you chose" in said, "plain words on the page"
    wait_until(lambda: not hub.my_procs(), 5, what="no processes")


def names_of(testbed) -> list[str]:
    return [h["name"] for h in testbed["hosts"]]


def test_misnamed_user_hosts_is_a_clear_error_not_a_crash(testbed, hub_factory):
    """An admin's typo in user_hosts: the spawn page says the hub is
    misconfigured and a spawn fails naming the bad host, nothing runs."""
    hub, names = form_hub(hub_factory, testbed, **{"SSHSpawner.user_hosts": ["gpu9"]})
    hub.create_user(ALICE)
    s = login(hub, ALICE)
    page, _ = spawn_page(hub, s, ALICE)
    assert "the hub is misconfigured" in page and "gpu9" in page, page[-2000:]
    said = refused(hub, ALICE, {})
    assert "misconfigured" in said and "gpu9 not in SSHSpawner.hosts" in said, said
    assert not hub.my_procs()
