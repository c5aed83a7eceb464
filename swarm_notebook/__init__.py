"""swarm_notebook: a peer-to-peer swarm of notebooks and workers over WebRTC."""

__version__ = "0.1.0"
