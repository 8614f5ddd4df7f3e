"""Stable content hashes: the same content always gets the same id, on any machine."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import Any

_WHITESPACE = re.compile(r"\s+")
ID_HEX_CHARS = 20  # 80 bits: collisions stay negligible far past a billion steps


def content_hash(*parts: Any, length: int = ID_HEX_CHARS) -> str:
    """Hash of any JSON-serialisable parts; ``None`` and ``""`` hash differently."""
    payload = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:length]


def normalize_step_text(text: str) -> str:
    """The form of a step that decides node identity: NFKC, trimmed, whitespace runs folded.

    Two steps that differ only in spacing or Unicode presentation are the same step.
    """
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def node_id(problem_id: str, parent_id: str | None, step_text: str) -> str:
    """A step's id: hash of (problem, parent, normalised text), so a step reached twice is one node.

    Hashed from a delimited string rather than through ``content_hash``'s JSON: it is computed
    for every step of every completion, and ids never contain the separator.
    """
    key = f"node\x1f{problem_id}\x1f{'' if parent_id is None else parent_id}\x1f{normalize_step_text(step_text)}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:ID_HEX_CHARS]


def problem_id(question: str, gold_answer: str | None) -> str:
    return content_hash("problem", normalize_step_text(question), gold_answer)
