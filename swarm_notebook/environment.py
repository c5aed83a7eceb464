"""Every ``SWARM_NOTEBOOK_*`` environment variable, named once.

Readers import the names from here; nothing else spells them out.

``SWARM_NOTEBOOK_SIGNALING``
    Signaling server URL that ``%swarm join`` uses when none is given (``up`` sets it).
``SWARM_NOTEBOOK_ROOM``
    Room that ``%swarm join`` joins when none is given (``up`` sets it).
``SWARM_NOTEBOOK_SECRET``
    Room secret for ``%swarm join`` and ``swarm-notebook worker``; the environment keeps it
    out of ``ps`` (``up`` sets it to a secret made for the session).
``SWARM_NOTEBOOK_PROFILE``
    Profile folder holding this peer's key and stores (default ``~/.swarm_notebook/default``).
``SWARM_NOTEBOOK_ICE_HOSTS``
    Comma-separated local addresses ICE offers as host candidates, e.g. ``127.0.0.1`` for
    peers that all run on one machine (default: every interface).
``SWARM_NOTEBOOK_SIGNAL_SECRET``
    Secret every room of ``swarm-notebook signal`` requires (default: none).
``SWARM_NOTEBOOK_ICE_SERVERS``
    JSON list of STUN/TURN servers (``[{"urls": ..., "username": ..., "credential": ...}]``)
    for peers that did not pass ``ice_servers`` (``up`` passes its own on to kernels).
``SWARM_NOTEBOOK_ICE_POLICY``
    ``all`` (default) or ``relay``: which ICE candidates links may use.
``SWARM_NOTEBOOK_TURN_SECRET``
    coturn's static-auth-secret, from which ``swarm-notebook signal`` issues TURN
    credentials.
``SWARM_NOTEBOOK_ROSTER_OWNER``
    Peer id of the room owner whose roster a kernel or worker trusts (``up`` sets it).
``SWARM_NOTEBOOK_CA_FILE``
    PEM certificate to trust for a ``wss://`` signaling server, e.g. its self-signed one
    (read by ``join()``, ``%swarm join`` and workers; default: the system's authorities).
``SWARM_NOTEBOOK_TRANSPORT_BACKEND``
    ``aiortc`` (default), ``native`` (libdatachannel, the ``swarm_notebook[native]``
    extra on Python >= 3.13) or ``direct`` (TLS over TCP where the peers reach each
    other, aiortc otherwise): what makes this peer's links.
"""

from __future__ import annotations

SIGNALING = "SWARM_NOTEBOOK_SIGNALING"
ROOM = "SWARM_NOTEBOOK_ROOM"
SECRET = "SWARM_NOTEBOOK_SECRET"
PROFILE = "SWARM_NOTEBOOK_PROFILE"
ICE_HOSTS = "SWARM_NOTEBOOK_ICE_HOSTS"
SIGNAL_SECRET = "SWARM_NOTEBOOK_SIGNAL_SECRET"
ICE_SERVERS = "SWARM_NOTEBOOK_ICE_SERVERS"
ICE_POLICY = "SWARM_NOTEBOOK_ICE_POLICY"
TURN_SECRET = "SWARM_NOTEBOOK_TURN_SECRET"
ROSTER_OWNER = "SWARM_NOTEBOOK_ROSTER_OWNER"
CA_FILE = "SWARM_NOTEBOOK_CA_FILE"
TRANSPORT_BACKEND = "SWARM_NOTEBOOK_TRANSPORT_BACKEND"

# Not ours: Jupyter sets it in a kernel to the notebook's path; it names notebook peers.
JUPYTER_SESSION_NAME = "JPY_SESSION_NAME"

# What the room and signaling variables fall back to: the same everywhere (join(),
# %swarm join, swarm-notebook worker and up), so default peers always meet.
DEFAULT_ROOM = "default"
DEFAULT_SIGNALING = "ws://127.0.0.1:8765/ws"

ALL = (
    SIGNALING,
    ROOM,
    SECRET,
    PROFILE,
    ICE_HOSTS,
    ICE_SERVERS,
    ICE_POLICY,
    SIGNAL_SECRET,
    TURN_SECRET,
    ROSTER_OWNER,
    CA_FILE,
    TRANSPORT_BACKEND,
)
