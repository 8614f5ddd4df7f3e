"""Records of the step tree, their Arrow schemas, stable ids and the exported dataset formats."""

from stepforge.schemas.ids import content_hash, node_id, normalize_step_text, problem_id
from stepforge.schemas.records import (
    RECORD_TYPES,
    TABLES,
    Evaluation,
    Label,
    Node,
    Pair,
    Problem,
    Record,
    Reject,
    Rollout,
    to_arrow,
)

__all__ = [
    "RECORD_TYPES", "TABLES", "Evaluation", "Label", "Node", "Pair", "Problem", "Record", "Reject",
    "Rollout", "content_hash", "node_id", "normalize_step_text", "problem_id", "to_arrow",
]
