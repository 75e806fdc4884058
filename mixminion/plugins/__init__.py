"""Plugin package for mixminion exit modules.

Every ``mixminion/plugins`` directory on ``sys.path`` that has no
``__init__.py`` of its own is part of this package, so other distributions
can ship exit modules by installing a file into such a directory.  Plugins
are found with ``twisted.plugin.getPlugins`` (see
:mod:`mixminion.exits.registry`).
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))  # type: ignore[name-defined]  # noqa: F821
__all__: list[str] = []
