"""The package version, written once: ``pyproject.toml`` reads it (``[tool.hatch.version]``)
and ``swarm_notebook.__version__`` re-exports it.

It lives down here so that any layer may report it without importing the package root.
"""

__version__ = "0.1.0"
