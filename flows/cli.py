"""``stepforge``: run the pipeline, query any table with SQL, re-export a run, drive the synthetic world."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()


def _quiet_prefect(verbose: bool) -> None:
    # Prefect reads its settings at import: set before the flow module is imported.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network to send it to
    # The ephemeral API's default 20 s start-up limit is too short for a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


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
    _quiet_prefect(verbose)
    from stepforge.flows.config import RunConfig, demo_config
    from stepforge.flows.progress import RichReporter, set_reporter
    from stepforge.flows.synthesize import synthesize

    overrides = {"store": store, "run": run_name, "labeller": labeller}
    cfg = RunConfig.from_yaml(config, **overrides) if config else demo_config(**overrides)
    cfg = _with_overrides(
        cfg, model=model, limit=limit, verify=verify, policy=policy, backend=backend, base_url=base_url,
        server=server, max_in_flight=max_in_flight, ray=ray,
    )
    _require_engine(cfg)
    console.print(
        Panel.fit(f"run [bold]{cfg.run}[/] · model {cfg.backend.model_label} · labeller {cfg.labeller} · store {cfg.store.resolve()}")
    )
    import datasets

    datasets.disable_progress_bars()  # our own bars say what is happening; theirs repeat per file
    with RichReporter(console) as reporter:
        previous = set_reporter(reporter)
        try:
            result = synthesize(cfg.model_dump(mode="json"))
        finally:
            set_reporter(previous)
    print_summary(cfg.store, cfg.run, result)


def _require_engine(cfg) -> None:
    """Fail before any work when the chosen engine's package is missing, with what to install."""
    import importlib.util

    missing = []
    if cfg.backend.kind == "vllm" and importlib.util.find_spec("vllm") is None:
        missing.append("vLLM (a GPU machine): pip install 'stepforge[vllm]'")
    if cfg.ray is not None and importlib.util.find_spec("prefect_ray") is None:
        missing.append("Ray: pip install 'stepforge[ray]'")
    if missing:
        from rich.markup import escape

        console.print("[red]not installed:[/] " + escape("; ".join(missing)))
        raise typer.Exit(2)


def _with_overrides(
    cfg, *, model=None, limit=None, verify=None, policy=None, backend=None, base_url=None, server=None,
    max_in_flight=None, ray=None,
):
    """The config with the command line's section-level overrides applied (and validated again)."""
    from stepforge.flows.config import RunConfig

    data = cfg.model_dump(mode="json")
    if backend or base_url:
        data["backend"]["kind"] = backend or "openai"
    if base_url:
        data["backend"]["http"]["base_url"] = base_url
    if server:
        data["backend"]["http"]["server"] = server
    if max_in_flight:
        data["backend"]["max_in_flight"] = max_in_flight
    if ray:
        data["ray"] = {"address": None if ray == "local" else ray}
    if model:
        data["backend"]["model"] = model
    if limit is not None:
        data["ingest"]["limit"] = limit
    if verify is not None:
        data["verify"]["sources"] = [s.strip() for s in verify.split(",") if s.strip()]
    if policy:
        data["consensus"]["policy"] = policy
    try:
        return RunConfig.model_validate(data)
    except ValueError as exc:
        console.print(f"[red]invalid option:[/] {exc}")
        raise typer.Exit(2) from exc


def print_summary(store: Path, run_name: str, result: dict) -> None:
    from stepforge.storage.catalog import Catalog

    with Catalog(store) as catalog:
        catalog.refresh(run=run_name, shards=set(result["shards"]))
        q = lambda sql: catalog.query(sql).to_pylist()  # noqa: E731
        rollouts = q("select count(*) n, avg(outcome::int) acc from rollouts where origin = 'policy'")[0]
        labels = q("select label, count(*) n from labels group by 1 order by 1 desc")
        evidence = q("select source, count(*) n, count(*) filter (where verdict = -1) wrong from evaluations group by 1 order by 1")
        pairs = ", ".join(f"{r['kind']}: {r['n']}" for r in q("select kind, count(*) n from pairs group by 1 order by 1")) or "0"
        rejects = q("select stage, reason, count(*) n from rejects group by all order by n desc")
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
            f"{gen['generated']} generated, {gen['cache_hits']} from cache, {gen['generated_tokens']} tokens, "
            f"mean in flight {gen['mean_in_flight']}",
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
        except duckdb.Error as exc:
            console.print(f"[red]query failed:[/] {exc}")
            raise typer.Exit(1) from exc
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
    """Re-export a run's stored labels and pairs as datasets, without generating anything."""
    from stepforge.flows.config import RunConfig
    from stepforge.flows.shards import RunContext, completed_chains, export_run
    from stepforge.stages.export import ExportConfig

    run_file = Path(store) / "runs" / f"{run_name}.json"
    if not run_file.exists():
        console.print(f"[red]no run {run_name!r} in {store}[/]")
        raise typer.Exit(1)
    data = json.loads(run_file.read_text())["config"]
    if out is not None:
        data["export"] = ExportConfig(**{**(data.get("export") or {}), "out_dir": str(out)}).model_dump()
    ctx = RunContext(RunConfig.model_validate(data))
    try:
        chains, incomplete, reject_shard = completed_chains(ctx)
        if incomplete:
            console.print(f"[yellow]{incomplete} problem shard(s) are not fully labelled yet and are left out[/]")
        for summary in export_run(ctx, chains, reject_shard):
            console.print(f"{summary['dataset']}: {summary['rows']} rows → {summary['path']}")
        if push_to_hub:
            from stepforge.flows.hub import push_to_hub as publish

            try:
                where = publish(ctx.config.export.out_dir, push_to_hub, token_env=token_env, private=private)
            except ValueError as exc:
                console.print(f"[red]{exc}[/]")
                raise typer.Exit(1) from exc
            console.print(f"published → {where}")
    finally:
        ctx.close()


@app.command()
def report(
    store: Path = typer.Option(Path("stepforge-data"), help="Store root."),
    run_name: str = typer.Argument(..., metavar="RUN", help="Run to report on."),
    out: Optional[Path] = typer.Option(None, help="HTML file to write (default <store>/reports/<run>.html)."),
) -> None:
    """Write a static HTML report of a run: labels per source, values along solutions, agreement, rejects, cost."""
    from stepforge.flows.config import RunConfig
    from stepforge.flows.report import write_report
    from stepforge.flows.shards import RunContext, chain_shard_keys, completed_chains

    run_file = Path(store) / "runs" / f"{run_name}.json"
    if not run_file.exists():
        console.print(f"[red]no run {run_name!r} in {store}[/]")
        raise typer.Exit(1)
    ctx = RunContext(RunConfig.model_validate(json.loads(run_file.read_text())["config"]))
    try:
        chains, incomplete, reject_shard = completed_chains(ctx)
        if incomplete:
            console.print(f"[yellow]{incomplete} problem shard(s) are not complete and are left out[/]")
        path = write_report(store, run_name, out, shards=chain_shard_keys(chains, reject_shard))
    finally:
        ctx.close()
    console.print(f"report → {path}")


eval_app = typer.Typer(no_args_is_help=True, help="Score label sources and consensus policies against reference labels.")
app.add_typer(eval_app, name="eval")


@eval_app.command("processbench")
def eval_processbench(
    data: Path = typer.Argument(..., help="ProcessBench rows (.json array or .jsonl): id, generator, problem, steps, final_answer_correct, label."),
    method: Optional[list[str]] = typer.Option(
        None, "--method", "-m",
        help="A consensus policy to score, with optional rules: tool, judge, mc_hard, mc_soft, agreement, vote, "
        "e.g. vote+tool_veto+propagate. Repeat for several; default: tool, judge, mc_hard, agreement, vote, "
        "vote+tool_veto+propagate.",
    ),
    gold: Optional[Path] = typer.Option(None, help="GSM8K/MATH file whose gold answers are joined by question (needed by mc)."),
    config: Optional[Path] = typer.Option(None, help="Run config YAML for the models and evidence settings (backend, verify, mc_label)."),
    store: Path = typer.Option(Path("stepforge-data"), help="Store root."),
    run_name: str = typer.Option("processbench", "--run", help="Run name of the evaluation."),
    model: Optional[str] = typer.Option(None, help="Policy (and default judge) model."),
    limit: Optional[int] = typer.Option(None, help="Only the first N rows."),
    neutral_as: str = typer.Option("positive", help="Whether a neutral (0) label counts as an error: positive or negative."),
    verbose: bool = typer.Option(False, help="Show Prefect's own logs."),
) -> None:
    """ProcessBench's metric (accuracy on erroneous rows, on correct rows, F1) for each method; per-row results are stored."""
    _quiet_prefect(verbose)
    from stepforge.flows.config import RunConfig
    from stepforge.flows.evaluate import DEFAULT_METHODS, evaluate_flow, evaluation_config

    methods = list(method or DEFAULT_METHODS)
    ingest = {"source": str(data), "format": "processbench", "gold_source": str(gold) if gold else None}
    base = (
        RunConfig.from_yaml(config, run=run_name, store=store, ingest=ingest) if config
        else RunConfig(run=run_name, store=store, ingest=ingest)
    )
    base = _with_overrides(base, model=model, limit=limit)
    try:
        cfg = evaluation_config(base, methods)
    except ValueError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from exc
    console.print(Panel.fit(
        f"ProcessBench · {data} · evidence: labeller {cfg.labeller}, verify {', '.join(cfg.verify.sources) or 'none'} "
        f"· model {cfg.backend.model_label} · store {cfg.store.resolve()}"
    ))
    import datasets

    datasets.disable_progress_bars()
    result = evaluate_flow(cfg.model_dump(mode="json"), methods, "processbench", neutral_as)
    table = Table("method", "rows", "acc (erroneous)", "acc (correct)", "F1", "coverage", title="ProcessBench")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for score in result["scores"]:
        table.add_row(score["policy"], str(score["rows"]), fmt(score["acc_error"]), fmt(score["acc_correct"]),
                      fmt(score["f1"]), fmt(score["coverage"]))
    console.print(table)
    console.print(
        f"per-row results: stepforge query --store {store} --run {run_name} "
        "'select method, item, reference, predicted, correct from eval_results order by item'"
    )


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def world(ctx: typer.Context) -> None:
    """The synthetic world (a measuring instrument for labellers): `world problems ...` or `world serve ...`."""
    from stepforge.stages.llm.synthetic import main

    main(ctx.args)


if __name__ == "__main__":
    app()
