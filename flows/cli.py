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
    from stepforge.flows.shards import RunContext, completed_chains, export_run, load_run_record
    from stepforge.stages.export import ExportConfig

    try:
        data = load_run_record(store, run_name)["config"]
    except FileNotFoundError as exc:
        console.print(str(exc), style="red", markup=False, highlight=False)
        raise typer.Exit(1) from exc
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
    from stepforge.flows.shards import RunContext, completed_chains, figure_shard_keys, load_run_record

    try:
        ctx = RunContext(RunConfig.model_validate(load_run_record(store, run_name)["config"]))
    except FileNotFoundError as exc:
        console.print(str(exc), style="red", markup=False, highlight=False)
        raise typer.Exit(1) from exc
    try:
        chains, incomplete, reject_shard = completed_chains(ctx)
        if incomplete:
            console.print(f"[yellow]{incomplete} problem shard(s) are not complete and are left out[/]")
        path = write_report(store, run_name, out, shards=figure_shard_keys(ctx, chains, reject_shard))
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


@app.command()
def serve(
    file: Path = typer.Option(Path("prefect.yaml"), "--file", "-f", help="The prefect.yaml whose deployments are served."),
    limit: Optional[int] = typer.Option(None, help="At most this many flow runs at once (default: no limit)."),
) -> None:
    """Serve prefect.yaml's deployments without a worker or Docker: register them with the Prefect API
    (PREFECT_API_URL) and run their scheduled and triggered runs in this process until Ctrl-C."""
    _quiet_prefect(True)  # a service: the runner's INFO lines are its log
    if not file.is_file():
        console.print(f"[red]no {file}: run from the repository root or pass --file[/]")
        raise typer.Exit(2)
    import yaml
    from prefect.settings import get_current_settings

    from stepforge.flows.deployments import deployments_from_yaml, serve_deployments

    try:
        deployments_from_yaml(file)  # a broken file stops here, before anything is registered
    except (ValueError, TypeError, ImportError, yaml.YAMLError) as exc:
        console.print(f"[red]{file}: {exc}[/]")
        raise typer.Exit(2) from exc
    if not get_current_settings().api.url:
        console.print(
            "[yellow]PREFECT_API_URL is not set: the deployments go to a temporary API that lives as long as "
            "this process. For the team's schedules start `prefect server start` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api.[/]"
        )
    serve_deployments(file, limit=limit)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def world(ctx: typer.Context) -> None:
    """The synthetic world (a measuring instrument for labellers): `world problems ...` or `world serve ...`."""
    from stepforge.stages.llm.synthetic import main

    main(ctx.args)


# ---- review: human review of step labels in Label Studio (own venv; see flows/review_server.py) ----

review_app = typer.Typer(no_args_is_help=True, help="Human review of step labels in a Label Studio server.")
app.add_typer(review_app, name="review")


@review_app.command("server")
def review_server(
    host: str = typer.Option("127.0.0.1", help="Address to bind: loopback unless --allow-remote."),
    port: int = typer.Option(8080, help="Port to listen on."),
    data_dir: Path = typer.Option(Path("stepforge-data/label-studio"), help="Label Studio's database and media."),
    secrets_file: Optional[Path] = typer.Option(
        None, help="File with LABEL_STUDIO_USERNAME=, LABEL_STUDIO_PASSWORD=, LABEL_STUDIO_API_KEY= lines "
        "(chmod 600); without it they come from the environment."
    ),
    allow_loopback_webhooks: bool = typer.Option(
        False, help="Let Label Studio send webhooks to loopback addresses (turns off its SSRF protection)."
    ),
    allow_remote: bool = typer.Option(False, help="Allow binding a non-loopback --host (reachable from the network)."),
    install_only: bool = typer.Option(False, help="Only build Label Studio's own venv and print its executable."),
) -> None:
    """Run Label Studio in the foreground (its own venv, built on first use) until Ctrl-C.

    The admin e-mail, password and the API token to preset are read from --secrets-file or the environment,
    never from the command line; the first start on a new --data-dir creates that admin and token.
    """
    from stepforge.flows.review_server import LabelStudioError, ensure_label_studio, serve_command
    from stepforge.flows.secrets import SecretError

    try:
        if install_only:
            print(ensure_label_studio())
            return
        code = serve_command(host, port, data_dir, secrets_file, allow_loopback_webhooks, allow_remote=allow_remote)
    except (SecretError, LabelStudioError, ValueError) as exc:
        console.print(str(exc), style="red", markup=False, highlight=False)
        raise typer.Exit(2) from exc
    raise typer.Exit(code)


def _review_call(fn, store: Path, run_name: str, **kwargs):
    """``fn(ctx)`` on the stored run; a missing run, an unreachable server or a missing token is a
    clean exit with the message."""
    from stepforge.flows.review import ReviewError
    from stepforge.flows.secrets import SecretError
    from stepforge.flows.shards import open_run

    try:
        with open_run(store, run_name) as ctx:
            return fn(ctx, **kwargs)
    except (ReviewError, SecretError, FileNotFoundError) as exc:
        console.print(str(exc), style="red", markup=False, highlight=False)
        raise typer.Exit(1) from exc


STORE_OPTION = typer.Option(Path("stepforge-data"), help="Store root.")
RUN_ARGUMENT = typer.Argument(..., metavar="RUN", help="The run under review.")


@review_app.command("push")
def review_push(
    run_name: str = RUN_ARGUMENT,
    store: Path = STORE_OPTION,
    limit: Optional[int] = typer.Option(None, help="At most this many new trajectories (default review.max_items)."),
) -> None:
    """Send the trajectories the run's review policies select (review section of its config) to Label Studio."""
    from stepforge.flows.review import push

    summary = _review_call(push, store, run_name, limit=limit)
    reasons = ", ".join(f"{k} {v}" for k, v in summary["by_reason"].items()) or "-"
    console.print(f"{summary['pushed']} trajectories pushed ({reasons}); {summary['already_in_project']} already in "
                  f"the project; {summary['left_for_next_push']} left for the next push → {summary['url']}")


@review_app.command("pull")
def review_pull(
    run_name: str = RUN_ARGUMENT,
    store: Path = STORE_OPTION,
    rerun: bool = typer.Option(True, help="Re-run consensus, pairs, filter and export where human labels changed."),
) -> None:
    """Read new and edited annotations back as human evaluations (rejects for skipped or malformed ones)."""
    from stepforge.flows.backfill import backfill_run, describe
    from stepforge.flows.progress import RichReporter, use_reporter
    from stepforge.flows.review import pull

    summary = _review_call(pull, store, run_name)
    reasons = ", ".join(f"{k} {v}" for k, v in summary["reject_reasons"].items())
    console.print(f"{summary['new_step_labels']} new step labels from {summary['pages']} page(s) of annotated tasks"
                  + (f"; rejected annotations: {reasons}" if reasons else ""))
    if rerun and (summary["new_step_labels"] or summary["rejected_annotations"]):
        import datasets

        datasets.disable_progress_bars()
        with RichReporter(console) as rich, use_reporter(rich):
            console.print(describe(backfill_run(store, run_name, stages=("consensus", "pairs", "filter", "export"))))


@review_app.command("status")
def review_status(run_name: str = RUN_ARGUMENT, store: Path = STORE_OPTION) -> None:
    """What review has produced: items, annotations, agreement between annotators, conflicts, and how the
    automatic labels fare against humans (on the random audit sample and on everything reviewed)."""
    from stepforge.flows.review import status

    report = _review_call(status, store, run_name)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    table = Table("", "value", title=f"review of {run_name}")
    reasons = ", ".join(f"{k} {v}" for k, v in report["items_by_reason"].items())
    table.add_row("trajectories pushed", f"{report['items']} ({reasons})" if reasons else "0")
    table.add_row("annotations / step labels", f"{report['annotations']} / {report['step_labels']}")
    table.add_row("rejected annotations", ", ".join(f"{k} {v}" for k, v in report["rejected_annotations"].items()) or "0")
    table.add_row("steps with 2+ annotators", str(report["multi_annotated_steps"]))
    table.add_row("pairwise agreement / Krippendorff's alpha",
                  f"{fmt(report['pairwise_agreement'])} / {fmt(report['krippendorff_alpha'])}")
    for scope, c in report["automatic_vs_human"].items():
        table.add_row(f"automatic labels right ({scope})", f"{fmt(c['accuracy'])} on {c['steps']} steps")
    console.print(table)
    for conflict in report["conflicts"]:
        votes = ", ".join(f"{who}: {label}" for who, label in conflict["votes"].items())
        console.print(f"conflict: rollout {conflict['rollout_id']} step {conflict['step_index'] + 1} ({votes})")


@review_app.command("webhook")
def review_webhook(
    run_name: str = RUN_ARGUMENT,
    store: Path = STORE_OPTION,
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8765, help="Port to listen on; point a Label Studio webhook at http://HOST:PORT/webhook."),
) -> None:
    """Pull (and re-label) whenever Label Studio reports an annotation: a receiver for its webhooks.

    Label Studio refuses webhooks to loopback addresses unless it runs with SSRF_PROTECTION_ENABLED=false
    (`stepforge review server --allow-loopback-webhooks`)."""
    import uvicorn

    from stepforge.flows.backfill import backfill_run
    from stepforge.flows.review import pull, webhook_app

    from stepforge.flows.shards import open_run

    def pull_once() -> dict:
        with open_run(store, run_name) as ctx:
            summary = pull(ctx)
        if summary["new_step_labels"] or summary["rejected_annotations"]:
            summary["backfill"] = backfill_run(store, run_name, stages=("consensus", "pairs", "filter", "export"))
        console.print(f"pulled {summary['new_step_labels']} step labels")
        return summary

    console.print(f"listening on http://{host}:{port}/webhook (status: /status)")
    uvicorn.run(webhook_app(pull_once), host=host, port=port, log_level="warning")


@app.command()
def backfill(
    run_name: str = typer.Argument(..., metavar="RUN", help="The stored run to backfill."),
    store: Path = typer.Option(Path("stepforge-data"), help="Store root."),
    stages: str = typer.Option(
        "consensus,pairs,filter,export", help="Comma-separated stages that may be re-run: rollout, label, verify, "
        "consensus, pairs, filter, export. A stage outside them that the settings change is an error, not silent work."
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
    import yaml

    from stepforge.flows.backfill import BackfillError, backfill_run, describe
    from stepforge.flows.progress import RichReporter, use_reporter

    overrides: dict = yaml.safe_load(overrides_file.read_text()) or {} if overrides_file else {}
    for item in set_:
        path, sep, raw = item.partition("=")
        if not sep or not path:
            console.print(f"[red]--set {item!r}: expected dotted.key=value[/]")
            raise typer.Exit(2)
        node = overrides
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    import datasets

    datasets.disable_progress_bars()
    try:
        with RichReporter(console) as rich, use_reporter(rich):
            summary = backfill_run(store, run_name, [s.strip() for s in stages.split(",") if s.strip()], overrides,
                                   shard or None, sql)
    except (BackfillError, FileNotFoundError) as exc:
        console.print(str(exc), style="red", markup=False, highlight=False)
        raise typer.Exit(1) from exc
    except ValueError as exc:  # the merged config does not validate
        console.print(f"the overrides do not make a valid config: {exc}", style="red", markup=False, highlight=False)
        raise typer.Exit(2) from exc
    console.print(describe(summary))


if __name__ == "__main__":
    app()
