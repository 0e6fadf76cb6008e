"""GPUs through a real hub: hosts get the testbed's stand-in nvidia-smi
printing a fixture set (node2 two idle RTX 4090s; for the options form in
Chromium also node1 four A100s, one busy), put back to none when the test
ends however it ends."""

from __future__ import annotations

from . import test_browser
from .conftest import all_at_once, proc_environ, standin_gpus, wait_polls

ALICE = "tb-alice"
BOB = "tb.bob-2"

browser = test_browser.browser  # headless Chromium, as the spawn page test drives it


def test_twenty_gpu_spawns_share_no_gpu_servers_see_theirs_over_max_refused_restart_keeps_claims(
    testbed, hub_factory
):
    with standin_gpus(testbed, node2="rtx4090x2-idle"):
        hub = hub_factory(
            {
                "SSHSpawner.gpus": 1,
                "SSHSpawner.user_gpus_max": 1,
                "JupyterHub.cleanup_servers": False,
                "Spawner.poll_interval": 1,
            }
        )
        # Twenty one-GPU spawns at once through the hub (ten named servers
        # each of alice and bob): exactly two start, on node2's two GPUs, one
        # each; eighteen are refused by name; their stops free both GPUs.
        rush = [(u, f"rush-{i}") for u in (ALICE, BOB) for i in range(10)]
        started, refused = all_at_once(lambda u, n: hub.spawn(u, n, timeout=120), rush, 180)
        assert len(started) == 2 and len(refused) == 18, (sorted(started), refused)
        held = [hub.ssh_state(u, n)["gpus"] for u, n in started]
        assert all(len(g) == 1 for g in held) and held[0] != held[1], held
        for said in refused:
            assert "no host has 1 free GPU" in said and "node2: 0 of 2 GPUs free" in said, said
        _, errors = all_at_once(hub.stop_server, list(started), 120)
        assert not errors, errors

        # c.SSHSpawner.gpus = 1: the only host with GPUs, one of them, and
        # the server's environment names it alone.
        hub.spawn(ALICE)
        alice = hub.ssh_state(ALICE)
        assert alice["host"] == "node2", alice
        assert len(alice["gpus"]) == 1, alice
        env = proc_environ(alice["pid"])
        assert env["CUDA_VISIBLE_DEVICES"] == alice["gpus"][0], env
        assert env["NVIDIA_VISIBLE_DEVICES"] == alice["gpus"][0], env

        # More than user_gpus_max through the REST API: a clear 400.
        r = hub.request_spawn(BOB, json={"gpus": 9})
        assert r.status_code == 400, (r.status_code, r.text)
        said = r.json()["message"]
        assert 'GPUs (gpus) "9": must be a whole number from 0 to 1' in said, said
        assert not hub.user_model(BOB)["servers"]

        # A restarted hub claims alice's GPU again on its first poll: bob,
        # asking for one, gets the other (the same one, least used by index,
        # if the claim were lost), and then none is left.
        hub.stop()
        since = len(hub.log_text())
        hub.start()
        wait_polls(hub, ALICE, 1, since)
        # (Bob's refused options are stored: he asks again, within bounds.)
        r = hub.request_spawn(BOB, json={"gpus": 1})
        assert r.status_code in (201, 202), (r.status_code, r.text)
        hub.wait_ready(BOB)
        bob = hub.ssh_state(BOB)
        assert bob["host"] == "node2" and len(bob["gpus"]) == 1, bob
        assert bob["gpus"] != alice["gpus"], (bob, alice)
        assert proc_environ(bob["pid"])["CUDA_VISIBLE_DEVICES"] == bob["gpus"][0]
        r = hub.request_spawn(ALICE, "more")
        said = r.text + "\n" + hub.progress_failure(ALICE, "more")
        assert "no host has 1 free GPU" in said and "node2: 0 of 2 GPUs free" in said, said

        # A stop releases: alice's second server gets her first one's GPU.
        hub.stop_server(ALICE)
        hub.spawn(ALICE, "again")
        assert hub.ssh_state(ALICE, "again")["gpus"] == alice["gpus"]


def test_the_form_shows_free_gpus_refuses_a_count_no_host_has_and_starts_one_with_its_gpu(
    testbed, hub_factory, browser
):
    with standin_gpus(testbed, node1="a100x4-one-busy", node2="rtx4090x2-idle"):
        hub = hub_factory({"SSHSpawner.options_form_enabled": True, "SSHSpawner.user_gpus_max": 4})
        b, by = browser, test_browser.By
        wait = test_browser.page_wait(b)
        test_browser.log_in(b, hub, ALICE)

        # Each host says its free GPUs and model, as placement counts them.
        b.get(f"{hub.url}/hub/spawn")
        wait.until(lambda d: d.find_elements(by.ID, "spawn_form"))
        labels = {
            lab.text.split(":")[0]: lab.text
            for lab in b.find_elements(by.CSS_SELECTOR, "#ssh-spawner-hosts label")
        }
        assert labels["node1"].endswith("; GPUs: 3 of 4 free (NVIDIA A100-SXM4-40GB)"), labels
        assert labels["node2"].endswith("; GPUs: 2 of 2 free (NVIDIA GeForce RTX 4090)"), labels
        assert labels["node3"].endswith("; no GPUs"), labels
        field = b.find_element(by.NAME, "gpus")
        assert (field.get_attribute("value"), field.get_attribute("max")) == ("0", "4")

        # 4 GPUs: within user_gpus_max, but no host has them free. Refused
        # above the form, naming what each host has, by the form's check
        # (a ValueError of options_from_form): no spawn is attempted, so
        # placement never refuses it ("Not starting ...", same words).
        since = len(hub.log_text())
        field.clear()
        field.send_keys("4")
        b.find_element(by.CSS_SELECTOR, '#spawn_form button[type="submit"]').click()
        error = wait.until(
            lambda d: [e.text for e in d.find_elements(by.CSS_SELECTOR, ".spawn-error-msg")]
        )[0]
        assert (
            "no host has 4 free GPUs: node1: 3 of 4 GPUs free (GPU 2 busy: pid 31337 uses"
            " 20480 MiB), 4 asked, node2: 2 of 2 GPUs free, 4 asked" in error
        ), error
        assert not hub.user_model(ALICE)["servers"]
        log = hub.log_text()[since:]
        assert "ValueError: no host has 4 free GPUs: node1: 3 of 4" in log, log[-3000:]
        assert "Not starting" not in log and "starting tb-alice" not in log, log[-3000:]

        # 1 GPU: the server starts and its environment names its GPU.
        field = b.find_element(by.NAME, "gpus")
        field.clear()
        field.send_keys("1")
        b.find_element(by.CSS_SELECTOR, '#spawn_form button[type="submit"]').click()
        wait.until(lambda d: f"/user/{ALICE}/" in d.current_url)
        state = hub.ssh_state(ALICE)
        assert state["host"] in ("node1", "node2") and len(state["gpus"]) == 1, state
        assert proc_environ(state["pid"])["CUDA_VISIBLE_DEVICES"] == state["gpus"][0]
