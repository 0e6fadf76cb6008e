"""ssh-spawner: a JupyterHub spawner that starts servers on shared hosts over SSH.

Use it with ``c.JupyterHub.spawner_class = "ssh"``.
"""

__all__ = ["SSHSpawner"]


def __getattr__(name: str):
    # Not bound in this module on purpose: JupyterHub looks the class up
    # again here when it loads its configuration, with its event loop
    # running, which is when the spawner's background work can start (see
    # spawner._hub_starting).
    if name == "SSHSpawner":
        from .spawner import SSHSpawner, _hub_starting

        _hub_starting()
        return SSHSpawner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
