"""``stepforge review``: human review of step labels in Label Studio (its own venv; flows/review_server.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from stepforge.flows.cli_common import RUN_ARGUMENT, STORE_OPTION, console, say_dropped
from stepforge.flows.errors import UserError

review_app = typer.Typer(no_args_is_help=True, help="Human review of step labels in a Label Studio server.")


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
        raise UserError(str(exc)) from exc
    raise typer.Exit(code)


def review_call(fn, store: Path, run_name: str, **kwargs):
    """``fn(ctx)`` on the stored run; a missing run, an unreachable server or a missing token is a
    clean exit with the message."""
    from stepforge.flows.review import ReviewError
    from stepforge.flows.secrets import SecretError
    from stepforge.flows.runtime import open_run

    try:
        with open_run(store, run_name) as ctx:
            return fn(ctx, **kwargs)
    except (SecretError, FileNotFoundError) as exc:  # a missing token, an unknown run: the user's to fix
        raise UserError(str(exc)) from exc
    except ReviewError as exc:  # the server refused or is down: not a mistake in the command, exit 1 as before
        raise UserError(str(exc), exit_code=1) from exc


@review_app.command("push")
def review_push(
    run_name: str = RUN_ARGUMENT,
    store: Path = STORE_OPTION,
    limit: Optional[int] = typer.Option(None, help="At most this many new trajectories (default review.max_items)."),
) -> None:
    """Send the trajectories the run's review policies select (review section of its config) to Label Studio."""
    from stepforge.flows.review import push

    summary = review_call(push, store, run_name, limit=limit)
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
    from stepforge.stages.review.annotations import STAGE as REVIEW_STAGE

    summary = review_call(pull, store, run_name)
    console.print(f"{summary['new_step_labels']} new step labels from {summary['pages']} page(s) of annotated tasks")
    say_dropped(summary["reject_reasons"], store, run_name, stage=REVIEW_STAGE)
    if rerun and (summary["new_step_labels"] or summary["rejected_annotations"]):
        import datasets

        datasets.disable_progress_bars()
        with RichReporter(console) as rich, use_reporter(rich):
            console.print(describe(backfill_run(store, run_name)))


@review_app.command("status")
def review_status(run_name: str = RUN_ARGUMENT, store: Path = STORE_OPTION) -> None:
    """What review has produced: items, annotations, agreement between annotators, conflicts, and how the
    automatic labels fare against humans (on the random audit sample and on everything reviewed)."""
    from stepforge.flows.review import status

    report = review_call(status, store, run_name)
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
    from stepforge.flows.review import pull
    from stepforge.flows.review_webhook import webhook_app

    from stepforge.flows.runtime import load_run_record, open_run

    try:
        load_run_record(store, run_name)  # an unknown run is the user's mistake now, not at the first webhook
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from exc

    def pull_once() -> dict:
        with open_run(store, run_name) as ctx:
            summary = pull(ctx)
        if summary["new_step_labels"] or summary["rejected_annotations"]:
            summary["backfill"] = backfill_run(store, run_name)
        console.print(f"pulled {summary['new_step_labels']} step labels")
        return summary

    console.print(f"listening on http://{host}:{port}/webhook (status: /status)")
    uvicorn.run(webhook_app(pull_once), host=host, port=port, log_level="warning")
