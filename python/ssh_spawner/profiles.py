"""wrapspawner's ProfilesSpawner, made to work with JupyterHub >= 2.

wrapspawner 1.0.1 (the release on PyPI) builds its child spawner with
``server=self._server``, which no JupyterHub since 2.0 takes as an argument
(``Spawner.server`` is a property; traitlets drops the argument with a
DeprecationWarning), and without the ``orm_spawner``. The child then has no
server: JupyterHub's ``get_env`` leaves ``JUPYTERHUB_SERVICE_PREFIX`` unset
and binds the server at ``/``, so every page of it is a 404 through the proxy,
and a named server's child believes it is the default one
(jupyterhub/wrapspawner#44 and #26; fixed only on wrapspawner's main branch).

This subclass hands the child the wrapper's ``orm_spawner``, from which
JupyterHub derives ``server``, ``name`` and the rest. Use it in place of
``wrapspawner.ProfilesSpawner``::

    c.JupyterHub.spawner_class = "ssh_spawner.profiles.ProfilesSpawner"
    c.ProfilesSpawner.profiles = [...]   # as for wrapspawner

It needs ``pip install wrapspawner``.
"""

from __future__ import annotations

from wrapspawner import ProfilesSpawner as _PublishedProfilesSpawner


class ProfilesSpawner(_PublishedProfilesSpawner):
    """ProfilesSpawner whose child knows its server (see the module doc)."""

    def construct_child(self):
        # wrapspawner's ProfilesSpawner.construct_child returns nothing.
        super().construct_child()
        child = self.child_spawner
        if child is not None and child.orm_spawner is None and self.orm_spawner is not None:
            child.orm_spawner = self.orm_spawner
        return child
