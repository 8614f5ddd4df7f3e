"""``stepforge eval``: score label sources and consensus policies against reference step labels."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.panel import Panel
from rich.table import Table

from stepforge.flows.cli_common import console, quiet_prefect, say_dropped
from stepforge.flows.errors import UserError
from stepforge.flows.service import require_sources, with_overrides

eval_app = typer.Typer(no_args_is_help=True, help="Score label sources and consensus policies against reference labels.")


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
    quiet_prefect(verbose)
    from pydantic import ValidationError

    from stepforge.flows.config import RunConfig
    from stepforge.flows.errors import validation_message
    from stepforge.flows.evaluate import DEFAULT_METHODS, evaluate_flow, evaluation_config
    from stepforge.flows.prefect_server import guard_temporary_server

    methods = list(method or DEFAULT_METHODS)
    ingest = {"source": str(data), "format": "processbench", "gold_source": str(gold) if gold else None}
    base = (
        RunConfig.from_yaml(config, run=run_name, store=store, ingest=ingest) if config
        else RunConfig.from_data({"run": run_name, "store": store, "ingest": ingest}, where="invalid option")
    )
    base = with_overrides(base, model=model, limit=limit)
    try:
        cfg = evaluation_config(base, methods)
    except ValidationError as exc:
        raise UserError(f"invalid option: {validation_message(exc, RunConfig)}") from exc
    except ValueError as exc:  # an unknown policy or rule in a --method
        raise UserError(str(exc)) from exc
    require_sources(cfg)
    console.print(Panel.fit(
        f"ProcessBench · {data} · evidence: labeller {cfg.labeller}, verify {', '.join(cfg.verify.sources) or 'none'} "
        f"· model {cfg.backend.model_label} · store {cfg.store.resolve()}"
    ))
    import datasets

    datasets.disable_progress_bars()
    guard_temporary_server()  # before the flow: Prefect's temporary API then dies with this process, even by SIGKILL
    result = evaluate_flow(cfg.model_dump(mode="json"), methods, "processbench", neutral_as)
    table = Table("method", "rows", "acc (erroneous)", "acc (correct)", "F1", "coverage", title="ProcessBench")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for score in result["scores"]:
        table.add_row(score["policy"], str(score["rows"]), fmt(score["acc_error"]), fmt(score["acc_correct"]),
                      fmt(score["f1"]), fmt(score["coverage"]))
    console.print(table)
    say_dropped(result.get("dropped") or {}, store, run_name)
    console.print(
        f"per-row results: stepforge query --store {store} --run {run_name} "
        "'select method, item, reference, predicted, correct from eval_results order by item'"
    )
