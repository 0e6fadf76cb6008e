"""ssh-spawner: a JupyterHub spawner that starts servers on shared hosts over SSH.

Use it with ``c.JupyterHub.spawner_class = "ssh"``.
"""

from .spawner import SSHSpawner

__all__ = ["SSHSpawner"]
