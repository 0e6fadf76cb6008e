"""internal_ssl: the certificate names the chosen host; key, certificate and CA
travel to the host as 0600 files and are removed on stop."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

from cryptography import x509

from .conftest import assert_server_process

ALICE = "tb-alice"


def test_internal_ssl_certificate_names_the_host(testbed, hub_factory, tmp_path, argv_watch):
    hub = hub_factory(
        {
            "JupyterHub.internal_ssl": True,
            "JupyterHub.internal_certs_location": str(tmp_path / "internal-ssl"),
            # the servers reach the hub API at hub_ip: its certificate must name it
            "JupyterHub.trusted_alt_names": [f"IP:{testbed['hub_address']}"],
        }
    )
    hub.spawn(ALICE)
    state = hub.ssh_state(ALICE)
    _, env = assert_server_process(testbed, state, ALICE)
    assert env["JUPYTERHUB_SERVICE_URL"].startswith("https://"), env["JUPYTERHUB_SERVICE_URL"]
    assert env["JUPYTERHUB_API_URL"].startswith("https://")

    r = hub.proxy_get(f"/user/{ALICE}/api/status")
    assert r.status_code == 200, (r.status_code, r.text[:300])

    files = {
        k: Path(env[k])
        for k in ("JUPYTERHUB_SSL_KEYFILE", "JUPYTERHUB_SSL_CERTFILE", "JUPYTERHUB_SSL_CLIENT_CA")
    }
    for var, path in files.items():
        assert str(path).startswith(state["dir"] + "/"), (var, path, state["dir"])
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600, f"{var} {path} mode {oct(st.st_mode)}"
        assert st.st_uid == testbed["uids"][ALICE], f"{path} owned by uid {st.st_uid}"

    cert = x509.load_pem_x509_certificate(files["JUPYTERHUB_SSL_CERTFILE"].read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = san.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address(state["address"]) in ips, (state["address"], san)
    assert state["host"] in san.get_values_for_type(x509.DNSName), san

    argv_watch.stop()
    assert not argv_watch.offending(
        {"server API token": env["JUPYTERHUB_API_TOKEN"], "e2e token": hub.token}
    )

    hub.stop_server(ALICE)
    for path in files.values():
        assert not path.exists(), f"{path} left behind after stop"
    d = Path(state["dir"])
    left = set(os.listdir(d)) if d.exists() else set()
    assert left <= {"server.log", "exit_status"}, left
