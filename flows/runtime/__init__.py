"""The runtime: the stage registry and the chain it implies, keys, the executor, and what a run hands on.

- ``registry``: stages found by their ``SPEC`` declarations (``stages.base.Stage``), ordered into a chain.
- ``context``: ``RunContext``, what one run's stages share in one process.
- ``chain``: ingest into problem shards, every slot's key, which chains are complete.
- ``executor``: one stage over one problem shard (``run_stage``), a whole chain (``run_chain``), many
  shards' chains at once sharing one bound on samples in flight (``run_shards``).
- ``records``: export, traffic and the run record.

Flows (``flows/synthesize.py``, backfill, review, evaluate) and the CLI are thin layers over these.
"""

from stepforge.flows.runtime.chain import (
    chain_keys,
    chain_shard_keys,
    completed_chains,
    current_chains,
    ingest_shards,
    run_chains,
    shard_key,
    stored_chains,
)
from stepforge.flows.runtime.context import RunContext, load_run_config, open_run
from stepforge.flows.runtime.executor import Interrupted, run_chain, run_concurrently, run_shards, run_stage, stop_if_interrupted
from stepforge.flows.runtime.records import export_run, figure_shard_keys, record_run, run_provenance, shard_traffic
from stepforge.flows.runtime.registry import INGEST, ROOT, Chain, RegistryError, builtin_stages, chain_for
from stepforge.storage.runs import UnknownRunError, load_run_record, run_record_path
from stepforge.storage.shards import ShardManifest

__all__ = [
    "INGEST", "Interrupted", "ROOT", "Chain", "RegistryError", "RunContext", "ShardManifest", "UnknownRunError", "builtin_stages",
    "chain_for", "chain_keys", "chain_shard_keys", "completed_chains", "current_chains", "export_run",
    "figure_shard_keys", "ingest_shards", "load_run_config", "load_run_record", "open_run", "record_run",
    "run_chain", "run_chains", "run_concurrently", "run_shards", "run_provenance", "stored_chains", "run_record_path", "run_stage", "shard_key", "shard_traffic", "stop_if_interrupted",
]
