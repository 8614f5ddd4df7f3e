"""The chain as documentation: the picture and the stage table of ``docs/architecture.md``, generated
from the registry so the page cannot drift from the code (tests/test_docs.py compares them).

``python -m stepforge.flows.runtime.docs docs/architecture.md`` rewrites the generated block in place.
"""

from __future__ import annotations

import sys
from pathlib import Path

from stepforge.flows.config import demo_config
from stepforge.flows.runtime.registry import INGEST, INGEST_TABLES, ROOT, Chain, chain_for

BEGIN, END = "<!-- generated from the stage registry: begin -->", "<!-- generated from the stage registry: end -->"


def picture(chain: Chain) -> str:
    """Each slot under the slot its key follows, as a tree (the chain is a tree of keys)."""
    children: dict[str, list[str]] = {}
    for slot in chain.stage_slots:
        children.setdefault(chain.stage(slot).after, []).append(slot)

    def name(slot: str) -> str:
        if slot == ROOT:
            return f"{ROOT} [{INGEST}]"
        options = chain.candidates[slot]
        return f"{slot} [{' | '.join(s.name for s in options)}]"

    lines = [name(ROOT)]

    def walk(slot: str, prefix: str) -> None:
        kids = children.get(slot, [])
        for i, kid in enumerate(kids):
            last = i == len(kids) - 1
            lines.append(f"{prefix}{'└─ ' if last else '├─ '}{name(kid)}")
            walk(kid, prefix + ("   " if last else "│  "))

    walk(ROOT, "")
    return "\n".join(lines)


def stage_table(chain: Chain) -> str:
    rows = ["| slot | stage | kind | key follows | reads (table ← slots) | writes | settings | what |",
            "|---|---|---|---|---|---|---|---|",
            f"| `{ROOT}` | `{INGEST}` | source | — | the configured source | {', '.join(INGEST_TABLES)} | `ingest` | "
            "Rows of a dataset become problems (and imported trajectories and labels), `shard_size` per shard. |"]
    for slot in chain.stage_slots:
        for stage in chain.candidates[slot]:
            reads = "; ".join(f"{t} ← {', '.join(s)}" for t, s in stage.reads.items()) or "—"
            rows.append(
                f"| `{slot}` | `{stage.name}` v{stage.version} | {stage.kind} | `{stage.after}` | {reads} | "
                f"{', '.join(stage.writes)} | {f'`{stage.config_field}`' if stage.config_field else '—'} | {stage.doc} |"
            )
    return "\n".join(rows)


def generated_block() -> str:
    """What the doc holds between its markers, for the built-in stages (the demo config's choices
    decide nothing here: every candidate of a slot is listed)."""
    chain = chain_for(demo_config())
    return f"{BEGIN}\n```text\n{picture(chain)}\n```\n\n{stage_table(chain)}\n{END}"


def rewrite(path: Path) -> bool:
    """Replace the generated block of ``path``; True if it changed."""
    text = path.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + generated_block() + text[end:]
    path.write_text(new)
    return new != text


if __name__ == "__main__":
    print("updated" if rewrite(Path(sys.argv[1])) else "up to date")
