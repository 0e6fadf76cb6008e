"""The spawn page in a real browser: headless Chromium (Debian's ``chromium``
and ``chromium-driver``) driven by Selenium. Log in, open the options form,
submit a refused value and read the message, see a failed spawn's reason on
the progress page, pick a host, watch the progress messages, land on the
running server.

Screenshots of the form and of the progress page are written to the test's
temporary directory, or to ``$SSH_SPAWNER_SCREENSHOTS`` when set
(``scripts/screenshots`` sets it to ``docs/``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .conftest import standin_gpus

ALICE = "tb-alice"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

try:
    from selenium import webdriver
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - reported by the skip below
    webdriver = None


@pytest.fixture
def browser():
    missing = [
        what
        for what, ok in [
            ("selenium (pip install selenium)", webdriver is not None),
            ("chromium (apt-get install chromium)", CHROMIUM),
            ("chromedriver (apt-get install chromium-driver)", CHROMEDRIVER),
        ]
        if not ok
    ]
    if missing:
        why = f"missing {', '.join(missing)}"
        if os.environ.get("SSH_SPAWNER_REQUIRE_BROWSER") == "1":  # CI: never skip
            pytest.fail(f"browser test required but {why}", pytrace=False)
        pytest.skip(f"!!! BROWSER TEST SKIPPED: {why} !!!")
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # we run as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1100,850",
        "--hide-scrollbars",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def page_wait(driver, timeout: float = 60):
    """A wait that looks again when the page is replaced under it (form →
    pending page → server): an element gone stale mid-check."""
    return WebDriverWait(
        driver,
        timeout,
        poll_frequency=0.1,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    )


def log_in(driver, hub, user: str) -> None:
    driver.get(f"{hub.url}/hub/login")
    driver.find_element(By.ID, "username_input").send_keys(user)
    driver.find_element(By.ID, "password_input").send_keys("e2e")
    driver.find_element(By.ID, "login_submit").click()
    page_wait(driver).until(lambda d: "/hub/login" not in d.current_url)


def shots_dir(tmp_path: Path) -> Path:
    d = Path(os.environ.get("SSH_SPAWNER_SCREENSHOTS") or tmp_path / "screenshots")
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_spawn_page_in_a_browser(testbed, hub_factory, browser, tmp_path):
    # node1 has four stand-in A100s (one busy with another user's job), so
    # the form and the progress (and their screenshots in docs/) show GPUs.
    with standin_gpus(testbed, node1="a100x4-one-busy"):
        spawn_page_round(testbed, hub_factory, browser, tmp_path)


def spawn_page_round(testbed, hub_factory, browser, tmp_path):
    names = [h["name"] for h in testbed["hosts"]]
    pick = names[0]
    hub = hub_factory(
        {
            "SSHSpawner.options_form_enabled": True,
            "SSHSpawner.user_mem_limit_max": "4G",
            "SSHSpawner.user_cpu_limit_max": 2.0,
            "SSHSpawner.user_gpus_max": 2,
            # No systemd user manager on the testbed hosts: a memory limit
            # cannot be enforced there, so choosing one makes the spawn fail
            # (a real failure whose reason the page must show).
            "SSHSpawner.enforcement": "systemd",
            # Long enough to watch the progress page, not a proof of anything.
            "SSHSpawner.prologue": ["sleep 2"],
        }
    )
    shots = shots_dir(tmp_path)
    wait = page_wait(browser)
    b = browser
    log_in(b, hub, ALICE)

    # The form: every host with live figures, "let the spawner choose" preselected.
    b.get(f"{hub.url}/hub/spawn")
    wait.until(lambda d: d.find_elements(By.ID, "spawn_form"))
    auto = b.find_element(By.CSS_SELECTOR, 'input[name="host"][value="auto"]')
    assert auto.is_selected()
    labels = {
        lab.get_attribute("for"): lab.text
        for lab in b.find_elements(By.CSS_SELECTOR, "#ssh-spawner-hosts label")
    }
    for i, name in enumerate(names):
        assert labels[f"host-{i}"].startswith(f"{name}: "), labels
        assert " free, load " in labels[f"host-{i}"], labels
    assert labels["host-0"].endswith("GPUs: 3 of 4 free (NVIDIA A100-SXM4-40GB)"), labels
    b.save_screenshot(str(shots / "spawn-form.png"))

    # A refused value comes back to the form with a message.
    mem = b.find_element(By.NAME, "mem_limit")
    mem.send_keys("64G")
    b.find_element(By.CSS_SELECTOR, '#spawn_form button[type="submit"]').click()
    error = wait.until(
        lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, ".spawn-error-msg")]
    )[0]
    assert 'memory (mem_limit) "64G": must be between 128M and 4G' in error, error
    assert not hub.user_model(ALICE)["servers"]

    # A value within bounds that the host cannot honour: the spawn fails and
    # the progress page says why.
    b.find_element(By.CSS_SELECTOR, f'input[name="host"][value="{pick}"]').click()
    mem = b.find_element(By.NAME, "mem_limit")
    mem.clear()
    mem.send_keys("1G")
    b.find_element(By.CSS_SELECTOR, '#spawn_form button[type="submit"]').click()

    # JupyterHub shows a spawn that fails at once above the form, and one
    # that fails later under the progress bar ("Spawn failed: ...").
    def failure(d):
        shown = d.find_elements(By.CSS_SELECTOR, ".spawn-error-msg, #progress-message")
        return next((e.text for e in shown if "no systemd" in e.text), None)

    failed = wait.until(failure)
    print("FAILED_PAGE", b.current_url, failed)
    assert "enforcement = systemd, but no systemd user manager answers there" in failed, failed
    assert "SpawnException" not in failed, failed

    # Pick a host and start, without a limit this time.
    b.get(f"{hub.url}/hub/spawn")
    wait.until(lambda d: d.find_elements(By.ID, "spawn_form"))
    b.find_element(By.CSS_SELECTOR, f'input[name="host"][value="{pick}"]').click()
    b.find_element(By.NAME, "mem_limit").clear()
    b.find_element(By.NAME, "gpus").clear()
    b.find_element(By.NAME, "gpus").send_keys("1")
    b.find_element(By.CSS_SELECTOR, '#spawn_form button[type="submit"]').click()
    wait.until(lambda d: "spawn-pending" in d.current_url)
    b.execute_script("document.getElementById('progress-details').open = true;")

    def log_lines(d):
        try:
            return [e.text for e in d.find_elements(By.CSS_SELECTOR, ".progress-log-event")]
        except Exception:  # noqa: BLE001 -- the page is replaced when the server is ready
            return []

    seen: list[str] = []

    def starting(d):
        lines = log_lines(d)
        if lines:
            seen[:] = lines
        return any("Starting the server" in m for m in lines)

    wait.until(starting)
    b.save_screenshot(str(shots / "spawn-progress.png"))
    print("PROGRESS_PAGE", seen)
    assert any(f"Host {pick} chosen, as you asked" in m for m in seen), seen
    assert any(m.startswith("Connecting to") for m in seen), seen
    assert any(f"Starting the server on {pick} as {ALICE}" in m for m in seen), seen
    assert any(f"GPUs assigned on {pick}: GPU " in m for m in seen), seen

    # Land on the running server.
    wait.until(lambda d: f"/user/{ALICE}/" in d.current_url)
    state = hub.ssh_state(ALICE)
    assert state["host"] == pick and len(state["gpus"]) == 1, state
    assert hub.server_model(ALICE)["ready"]
