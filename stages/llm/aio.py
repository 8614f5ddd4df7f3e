"""Drive per-item async labelling logic from a plain generator.

A stage's ``run`` is a plain generator of records (the stage contract, ``stages/base.py``).
Its LLM work is async so that every item's requests are outstanding at once; this bridge runs
all items concurrently on a private event loop and yields their results in input order, so
output is deterministic however the engine schedules the work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def run_in_order(items: Iterable[T], work: Callable[[T], Awaitable[list[R]]]) -> Iterator[R]:
    """Start ``work(item)`` for every item at once; yield each item's results in input order."""
    loop = asyncio.new_event_loop()
    try:
        tasks = [loop.create_task(work(item)) for item in items]
        for task in tasks:
            yield from loop.run_until_complete(task)
    finally:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
