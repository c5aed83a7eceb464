"""Knowledge: signed reflections, their SQLite store, the gate for shared ones, ranking."""

from swarm_notebook.errors import ReflectionRejected
from swarm_notebook.knowledge.gate import GateConfig, SharedReflectionGate
from swarm_notebook.knowledge.ranking import (
    KnowledgeMerge,
    merge_knowledge,
    merge_knowledge_detailed,
    query_terms,
)
from swarm_notebook.knowledge.reflections import (
    DEFAULT_LIMITS,
    Reflection,
    ReflectionLimits,
    content_hash,
    encode_reflection,
    reflection_to_dict,
    sign_reflection,
    validate_reflection,
    verify_reflection,
)
from swarm_notebook.knowledge.store import (
    ReflectionStore,
    StoredReflection,
    fts5_available,
)

__all__ = [
    "DEFAULT_LIMITS",
    "GateConfig",
    "KnowledgeMerge",
    "Reflection",
    "ReflectionLimits",
    "ReflectionRejected",
    "ReflectionStore",
    "SharedReflectionGate",
    "StoredReflection",
    "content_hash",
    "encode_reflection",
    "fts5_available",
    "merge_knowledge",
    "merge_knowledge_detailed",
    "query_terms",
    "reflection_to_dict",
    "sign_reflection",
    "validate_reflection",
    "verify_reflection",
]
