"""Everything a coordinator can be told, with defaults that need no configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from swarm_notebook.environment import DEFAULT_ROOM, DEFAULT_SIGNALING
from swarm_notebook.governance.service import ConsensusConfig
from swarm_notebook.knowledge.service import KnowledgeConfig
from swarm_notebook.transport.mesh import MeshConfig
from swarm_notebook.workload.delegator import DelegationConfig
from swarm_notebook.workload.executors.capabilities import ExecutorConfig
from swarm_notebook.workload.policy import TaskPolicy
from swarm_notebook.workload.store import DEFAULT_STORE_BYTES

# One room for every entry point (join(), %swarm join, worker, up): defaults meet.


@dataclass
class CoordinatorConfig:
    room: str = DEFAULT_ROOM
    signaling: str = DEFAULT_SIGNALING
    secret: str | None = None
    # PEM bundle to trust for a wss:// signaling server (e.g. its self-signed certificate);
    # None: $SWARM_NOTEBOOK_CA_FILE, then the system's authorities.
    ca_file: str | None = None
    profile: Path | None = None
    # The room owner whose signed roster decides who votes (None: the owner of the roster
    # file in the profile, if any; with neither the room is open).
    roster_owner: str | None = None
    name: str = "swarm-notebook"
    concurrency: int = 2
    max_queue: int = 64
    # None: offer whatever is configured, except python-execution, which needs the owner's
    # explicit opt-in (listing it here, or ``allow_remote_code``).
    capabilities: list[str] | None = None
    executors: ExecutorConfig = field(default_factory=ExecutorConfig)
    policy: TaskPolicy = field(default_factory=TaskPolicy)
    delegation: DelegationConfig = field(default_factory=DelegationConfig)
    consensus: ConsensusConfig = field(default_factory=ConsensusConfig)
    knowledge: KnowledgeConfig = field(default_factory=KnowledgeConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    drain_grace_s: float = 30.0
    # Arrow codec for DataFrames sent to peers ("lz4", "zstd", None: never), used only
    # when a sample of the frame shrinks and the link is slower than the codec.
    compression: str | None = "lz4"
    # Packages whose versions this peer's card reports besides python, numpy, pandas,
    # pyarrow and scikit-learn (worker --report-package).
    report_packages: list[str] = field(default_factory=list)
    # Resident data other peers put here: a hard memory budget, and optionally a folder
    # where least recently used refs spill (worker --store-mb / --spill-dir / --spill-mb).
    store_bytes: int = DEFAULT_STORE_BYTES
    store_spill_dir: Path | None = None
    store_spill_bytes: int = 0
