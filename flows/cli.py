"""``stepforge``: run the pipeline, query any table with SQL, re-export a run, drive the synthetic world.

Thin: each command parses its arguments, calls one function of ``flows/service.py`` (or a flow), and
prints. The ``review`` and ``eval`` command groups live in ``cli_review.py`` and ``cli_eval.py``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import click
import typer
from rich.panel import Panel
from rich.table import Table
from typer.core import TyperGroup

from stepforge.flows import service
from stepforge.flows.cli_common import console, quiet_prefect, say_dropped
from stepforge.flows.cli_eval import eval_app
from stepforge.flows.cli_review import review_app
from stepforge.flows.errors import UserError, first_line

DEBUG_ENV = "STEPFORGE_DEBUG"


class UserErrorsInOneLine(TyperGroup):
    """Every command's user mistakes (``UserError``) become one line on stderr and their exit code
    (2), not a traceback; ``--debug`` or STEPFORGE_DEBUG=1 lets them through with the traceback.

    The group wraps every command it dispatches to (sub-apps included), so each command, the
    ``stepforge`` script and ``python -m stepforge.flows.cli`` answer mistakes alike. Click's own
    usage errors (an unknown option) never get here: they are raised while parsing and exit 2 as before.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            if ctx.meta.get(DEBUG_ENV, _env_debug()):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


def _env_debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# No locals in tracebacks: they run to hundreds of lines and can hold tokens.
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, cls=UserErrorsInOneLine,
                  pretty_exceptions_show_locals=False)


@app.callback()
def _global_options(
    ctx: typer.Context,
    debug: bool = typer.Option(
        False, "--debug", envvar=DEBUG_ENV, help=f"Show the traceback of a mistake instead of one line (or {DEBUG_ENV}=1)."
    ),
) -> None:
    ctx.meta[DEBUG_ENV] = debug


app.add_typer(eval_app, name="eval")
app.add_typer(review_app, name="review")


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="Run config YAML; omit for the embedded demo."),
    store: Optional[Path] = typer.Option(None, help="Store root (overrides the config)."),
    run_name: Optional[str] = typer.Option(None, "--run", help="Run name (overrides the config)."),
    backend: Optional[str] = typer.Option(
        None, help="Engine: llamacpp (in-process GGUF), openai (an OpenAI-compatible server), vllm (offline engine on GPUs)."
    ),
    model: Optional[str] = typer.Option(
        None, help="llamacpp: model name or .gguf path; openai: the served model's name; vllm: model dir or HF id."
    ),
    base_url: Optional[str] = typer.Option(None, help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1 (sets --backend openai)."),
    server: Optional[str] = typer.Option(None, help="What serves --base-url: vllm, sglang, llamacpp, tgi, openai, generic."),
    max_in_flight: Optional[int] = typer.Option(None, help="Samples (requests) in flight at once."),
    concurrent_shards: Optional[int] = typer.Option(
        None, help="Problem shards run at once in this process, sharing --max-in-flight (keeps a batching server full)."
    ),
    ray: Optional[str] = typer.Option(
        None, help="Run shards on Ray: 'local' starts a local cluster; 'auto', ray://host:10001 or host:port joins one."
    ),
    limit: Optional[int] = typer.Option(None, help="Only the first N source rows."),
    labeller: Optional[str] = typer.Option(
        None, help="mc (Math-Shepherd), binary_search (OmegaPRM), mcts or none (overrides the config)."
    ),
    verify: Optional[str] = typer.Option(
        None, help="Comma-separated verifiers: tool, judge; '' for none (overrides the config)."
    ),
    policy: Optional[str] = typer.Option(
        None, help="Consensus policy: mc_hard, mc_soft, judge, tool, agreement or vote (overrides the config)."
    ),
    verbose: bool = typer.Option(False, help="Show Prefect's own logs."),
) -> None:
    """Run the synthesize flow: rollouts, step labels (Monte Carlo, binary search or MCTS), verification, consensus, pairs, TRL datasets."""
    quiet_prefect(verbose)
    from stepforge.flows.prefect_server import guard_temporary_server
    from stepforge.flows.progress import RichReporter, set_reporter
    from stepforge.flows.synthesize import synthesize

    cfg = service.run_config(
        config, store=store, run=run_name, labeller=labeller, model=model, limit=limit, verify=verify, policy=policy,
        backend=backend, base_url=base_url, server=server, max_in_flight=max_in_flight, ray=ray,
        concurrent_shards=concurrent_shards,
    )
    console.print(
        Panel.fit(f"run [bold]{cfg.run}[/] · model {cfg.backend.model_label} · labeller {cfg.labeller} · store {cfg.store.resolve()}")
    )
    import datasets

    datasets.disable_progress_bars()  # our own bars say what is happening; theirs repeat per file
    guard_temporary_server()  # before any flow: Prefect's temporary API then dies with this process, even by SIGKILL
    with RichReporter(console) as reporter:
        previous = set_reporter(reporter)
        try:
            result = synthesize(cfg.model_dump(mode="json"))
        finally:
            set_reporter(previous)
    print_summary(cfg.store, cfg.run, result)


def print_summary(store: Path, run_name: str, result: dict) -> None:
    from stepforge.storage.catalog import Catalog

    with Catalog(store) as catalog:
        catalog.refresh(run=run_name, shards=set(result["shards"]))
        q = lambda sql: catalog.query(sql).to_pylist()  # noqa: E731
        rollouts = q("select count(*) n, avg(outcome::int) acc from rollouts where origin = 'policy'")[0]
        labels = q("select label, count(*) n from labels group by 1 order by 1 desc")
        evidence = q("select source, count(*) n, count(*) filter (where verdict = -1) wrong from evaluations group by 1 order by 1")
        pairs = ", ".join(f"{r['kind']}: {r['n']}" for r in q("select kind, count(*) n from pairs group by 1 order by 1")) or "0"
        rejects = q("select stage, reason, count(*) n from rejects group by all order by n desc, reason")
        # Show a pair about arithmetic if there is one: it says more than a rejected preamble.
        example = q(
            "select prompt, chosen, rejected, margin from pairs "
            "order by regexp_matches(rejected, '[0-9]') desc, margin desc nulls last, pair_id limit 1"
        )
    table = Table(title=f"run {run_name}", show_header=False)
    table.add_row("policy rollouts", str(rollouts["n"]))
    table.add_row("accuracy", f"{rollouts['acc']:.1%}" if rollouts["acc"] is not None else "-")
    table.add_row(
        "evidence", ", ".join(f"{r['source']}: {r['n']}" + (f" ({r['wrong']} say wrong)" if r["wrong"] else "") for r in evidence) or "none"
    )
    table.add_row("steps labelled", ", ".join(f"{'+1' if r['label'] > 0 else r['label']}: {r['n']}" for r in labels) or "0")
    table.add_row("pairs", pairs)
    table.add_row("rejects", ", ".join(f"{r['stage']}/{r['reason']}: {r['n']}" for r in rejects) or "none")
    gen = result.get("generation") or {}
    if gen:
        table.add_row(
            "generation",
            f"{gen['generated']} generated, {gen['cache_hits']} from cache, {gen['generated_tokens']} tokens",
        )
    if sat := (result.get("saturation") or {}).get("generation"):
        # Over the run's whole wall time: idle gaps between stages and shards count as idle.
        stages = ", ".join(f"{name} {v:g}" for name, v in sat["mean_in_flight_by_stage"].items())
        table.add_row(
            "samples in flight",
            f"mean {sat['mean_in_flight']:g} of {sat['limit']} ({sat['ratio']:.0%}) over {sat['wall_seconds']:.0f} s"
            + (f"; by stage: {stages}" if stages else ""),
        )
    traffic = (result.get("traffic") or {}).get("generation") or {}
    if traffic.get("http_requests"):
        retried = ", ".join(f"{k.split('.', 1)[1]} {v:g}" for k, v in traffic.items() if k.startswith("retries.")) or "none"
        gave_up = ", ".join(f"{k.split('.', 1)[1]} {v:g}" for k, v in traffic.items() if k.startswith("gave_up.")) or "none"
        table.add_row(
            "server traffic",
            f"{traffic['http_requests']:g} requests, {traffic.get('prompt_tokens', 0):g} prompt + "
            f"{traffic.get('completion_tokens', 0):g} completion tokens, ${traffic.get('cost_usd', 0):.4f}; "
            f"retried: {retried}; gave up: {gave_up}",
        )
    for export in result.get("exports", []):
        table.add_row(f"dataset {export['dataset']}", f"{export['rows']} rows → {export['path']}")
    console.print(table)
    say_dropped({r["reason"]: r["n"] for r in rejects if r["stage"] == "ingest"}, store, run_name)
    if example:
        pair = example[0]
        console.print(Panel(pair["prompt"][-600:], title="example pair: prompt (tail)"))
        console.print(Panel(pair["chosen"], title="chosen", border_style="green"))
        console.print(Panel(pair["rejected"], title="rejected", border_style="red"))


@app.command()
def query(
    sql: str = typer.Argument(..., help="Any SQL over the tables problems, rollouts, nodes, evaluations, labels, pairs, rejects, runs, shards."),
    store: Path = typer.Option(Path("stepforge-data"), help="Store root."),
    run_name: Optional[str] = typer.Option(None, "--run", help="Restrict the table views to one run."),
    output: str = typer.Option("table", "--format", help="table, csv or json."),
    max_rows: int = typer.Option(50, help="Rows shown in table format."),
) -> None:
    """Print the result of a SQL query over a store."""
    import duckdb

    from stepforge.storage.catalog import Catalog

    with Catalog(store) as catalog:
        catalog.refresh(run=run_name)
        try:
            result = catalog.query(sql)
        except duckdb.Error as exc:  # DuckDB's later lines repeat the query and point a caret at it
            raise UserError(f"query failed: {first_line(exc)}") from exc
    if output == "json":
        for row in result.to_pylist():
            sys.stdout.write(json.dumps(row, default=str) + "\n")
    elif output == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(result, sys.stdout.buffer)
    else:
        table = Table(*result.column_names)
        for row in result.slice(0, max_rows).to_pylist():
            table.add_row(*(str(v) for v in row.values()))
        console.print(table)
        if result.num_rows > max_rows:
            console.print(f"… {result.num_rows - max_rows} more rows (--max-rows, or --format csv)")


@app.command()
def export(
    store: Path = typer.Option(Path("stepforge-data"), help="Store root."),
    run_name: str = typer.Option("demo", "--run", help="Run to export."),
    out: Optional[Path] = typer.Option(None, help="Output directory (default: the run's configured one)."),
    push_to_hub: Optional[str] = typer.Option(
        None, "--push-to-hub",
        help="Publish the Parquet datasets and the card to this Hugging Face dataset repo (owner/name), or to a local "
        "folder given as file://DIR.",
    ),
    private: bool = typer.Option(False, help="Create the Hub repo private."),
    token_env: str = typer.Option("HF_TOKEN", help="Environment variable holding the Hub token."),
) -> None:
    """Re-export a run's stored labels and pairs as datasets, without generating anything (from this --store,
    wherever it was made; a run with no complete shard chain is an error)."""
    summaries, incomplete, out_dir = service.export_stored_run(store, run_name, out)
    if incomplete:
        console.print(f"[yellow]{incomplete} problem shard(s) are not fully labelled yet and are left out[/]")
    for summary in summaries:
        console.print(f"{summary['dataset']}: {summary['rows']} rows → {summary['path']}")
    if push_to_hub:
        from stepforge.flows.hub import push_to_hub as publish

        try:
            where = publish(out_dir, push_to_hub, token_env=token_env, private=private)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        console.print(f"published → {where}")


@app.command()
def report(
    store: Path = typer.Option(Path("stepforge-data"), help="Store root."),
    run_name: str = typer.Argument(..., metavar="RUN", help="Run to report on."),
    out: Optional[Path] = typer.Option(None, help="HTML file to write (default <store>/reports/<run>.html)."),
) -> None:
    """Write a static HTML report of a run: labels per source, values along solutions, agreement, rejects, cost."""
    path, incomplete = service.report_stored_run(store, run_name, out)
    if incomplete:
        console.print(f"[yellow]{incomplete} problem shard(s) are not complete and are left out[/]")
    console.print(f"report → {path}")


@app.command()
def backfill(
    run_name: str = typer.Argument(..., metavar="RUN", help="The stored run to backfill."),
    store: Path = typer.Option(Path("stepforge-data"), help="Store root."),
    stages: Optional[str] = typer.Option(
        None, help="Comma-separated stages that may be re-run, by stage name (rollout, mc_label, binary_search, mcts, "
        "verify, consensus, pairs, filter, a plugin's) or slot name, and export. Default: the labels and what derives "
        "from them (consensus, pairs, filter) and export. A stage outside them that the settings change is an error, "
        "not silent work."
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="A config override as dotted.key=value (value parsed as YAML), e.g. consensus.policy=vote "
        "or verify.sources=[tool,judge]; repeatable."
    ),
    overrides_file: Optional[Path] = typer.Option(None, "--overrides", help="A YAML file of config overrides (merged)."),
    shard: list[str] = typer.Option([], help="Only this problem shard (key or key prefix); repeatable."),
    sql: Optional[str] = typer.Option(
        None, help="Only the problem shards holding the problems this SQL over the catalog returns (a problem_id column)."
    ),
) -> None:
    """Re-run chosen stages of an existing run under changed settings (a new consensus policy, a new judge,
    human labels, a re-export): idempotent, with a progress bar, printing what changed."""
    from stepforge.flows.backfill import describe
    from stepforge.flows.progress import RichReporter, use_reporter

    overrides = service.parse_overrides(set_, overrides_file)
    chosen = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
    import datasets

    datasets.disable_progress_bars()
    with RichReporter(console) as rich, use_reporter(rich):
        summary = service.backfill_stored_run(store, run_name, chosen, overrides, shard or None, sql)
    console.print(describe(summary))


@app.command()
def serve(
    file: Path = typer.Option(Path("prefect.yaml"), "--file", "-f", help="The prefect.yaml whose deployments are served."),
    limit: Optional[int] = typer.Option(None, help="At most this many flow runs at once (default: no limit)."),
) -> None:
    """Serve prefect.yaml's deployments without a worker or Docker: register them with the Prefect API
    (PREFECT_API_URL) and run their scheduled and triggered runs in this process until Ctrl-C."""
    quiet_prefect(True)  # a service: the runner's INFO lines are its log
    if not file.is_file():
        raise UserError(f"no {file}: run from the repository root or pass --file")
    import yaml
    from prefect.settings import get_current_settings

    from stepforge.flows.deployments import deployments_from_yaml, serve_deployments
    from stepforge.flows.errors import yaml_error_message
    from stepforge.flows.prefect_server import guard_temporary_server

    try:
        deployments_from_yaml(file)  # a broken file stops here, before anything is registered
    except yaml.YAMLError as exc:
        raise UserError(f"{file}: {yaml_error_message(exc)}") from exc
    except (ValueError, TypeError, ImportError) as exc:
        raise UserError(f"{file}: {exc}") from exc
    if not get_current_settings().api.url:
        console.print(
            "[yellow]PREFECT_API_URL is not set: the deployments go to a temporary API that lives as long as "
            "this process. For the team's schedules start `prefect server start` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api.[/]"
        )
    guard_temporary_server()  # that temporary API dies with this process, even by SIGKILL
    serve_deployments(file, limit=limit)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def world(ctx: typer.Context) -> None:
    """The synthetic world (a measuring instrument for labellers): `world problems ...` or `world serve ...`."""
    from stepforge.stages.instruments.synthetic import main

    main(ctx.args)




if __name__ == "__main__":
    app()
