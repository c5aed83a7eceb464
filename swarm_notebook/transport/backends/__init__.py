"""Peer connection backends behind the mesh: aiortc (default) and libdatachannel (``native``).

``mesh.py`` only talks to :class:`~swarm_notebook.transport.backends.base.PeerBackend`;
``select.py`` picks the implementation from configuration or the environment.
"""
