"""distilabel's half of the side-by-side Math-Shepherd benchmark.

Runs distilabel 1.5.3's own Math-Shepherd recipe — ``MathShepherdGenerator`` (M solutions per
problem) then ``MathShepherdCompleter`` (N completions per step, hard-estimation +/- labels) —
with ``distilabel.models.OpenAILLM`` against an OpenAI-compatible server, over GSM8K-style
problems, and prints ONE JSON line of counts and timings on stdout (everything else on stderr).

distilabel lives in its own virtualenv (default ``.venv-distilabel`` at the repo root, created
and filled with pip on first use); the project's venv never imports it. This file is run twice:
by the project's python (sets up the venv, then re-runs itself there with ``--worker``), and by
the venv's python in ``--worker`` mode (runs the pipeline).

What distilabel 1.5.3 actually sends (read from its source, checked by the counting proxy):

- Generator: one chat request per problem with ``n=1``; the *prompt* asks for M solutions
  "separated by a single ``---``", so the M solutions come back in one generation and are split
  on ``---`` and then on ``Step k:`` / ``The answer is:``. Nothing checks that M came back.
- Completer: for a solution of K parsed parts (steps + the "The answer is:" part) it sends one
  chat request, again ``n=1``, for each of the first K-2 parts (the prefix up to that step);
  that one generation is asked, in the prompt, for N completions separated by ``---``. A step
  is "+" if any parsed completion's last part equals the golden solution's last part
  ("The answer is: X", exact string match), else "-". The last step gets no completions: the
  "The answer is:" part is popped, appended to it and compared directly. So a labelled step costs
  N *requested* completions but only ONE request and one generation of max_tokens.
- Quirk of that labelling loop: a completion that parses to nothing (no ``Step k:`` / ``The
  answer is:``) or is missing (fewer than N ``---`` sections; the list is padded with "") sets the
  step's label to "" — left unlabelled — unless a *later* completion reaches the answer. A model
  that writes one solution where N were asked therefore gets no step labelled by completions
  when N >= 2, while every request is still paid for.
- ``use_default_structured_output`` needs ``instructor`` with OpenAILLM and, in the completer,
  its parser compares ``len(output)`` (the raw string) with N, so every structured completion is
  discarded; it is left off here (distilabel's default).

A small HTTP proxy in the worker sits between distilabel and the server and counts the real
requests, the ``n`` of each, and the usage (prompt/completion tokens) of each response.
``seconds`` is the wall clock of ``pipeline.run`` alone (use_cache=False; venv set-up excluded),
which includes distilabel's fixed cost (step processes, Parquet batches, the final
``load_dataset``): about 4 s on 2 cores. ``labelled_steps`` counts steps that ended with a
"+"/"-" tag, whether from completions or from the final answer match (both split out too);
``completions`` is N per completer request, i.e. what distilabel asked for.

``--solutions-source gold`` skips the generator and lets the completer label each problem's
reference solution (GSM8K worked answer, one ``Step k:`` per line): the same solutions for both
tools, and a completer that has work to do even when the policy ignores the ``Step k:`` format
(SmolLM2-135M mostly does, so the recipe proper leaves it almost nothing to label).

Usage (project python; the server must already be up):

    .venv/bin/python benchmarks/distilabel_side.py --base-url http://127.0.0.1:18431/v1 \\
        --model MODEL_ID --problems tests/fixtures/gsm8k_sample.jsonl --limit 3 \\
        --solutions 2 --completions 4 --max-tokens 256

``--problems``: JSONL with ``question`` and ``answer`` (the final number, or a GSM8K worked
solution ending ``#### N``). Exit status is non-zero if the pipeline failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DISTILABEL_VERSION = "1.5.3"

# What goes into the side venv. distilabel 1.5.3 leaves its dependencies open (lower bounds
# only), so pip resolves today's releases; only what is needed to make it import and run is added.
REQUIREMENTS = [
    f"distilabel[openai]=={DISTILABEL_VERSION}",
    # distilabel 1.5.3 imports `requests` at import time (distilabel/models/image_generation/
    # openai.py, pipeline/_dag.py) without declaring it: it used to arrive through
    # huggingface_hub/datasets, whose current releases (huggingface_hub 2.x on httpx2,
    # datasets 5.x) no longer depend on it, so without this line `import distilabel.models`
    # fails with "No module named 'requests'".
    "requests>=2.31",
]

# No Hub, no telemetry: distilabel must neither download nor push anything.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "DO_NOT_TRACK": "1",
    "DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def log(*parts: object) -> None:
    print("[distilabel_side]", *parts, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:18431/v1")
    p.add_argument("--model", required=True, help="model name sent to the server (see GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY") or "sk-local", help="default: $OPENAI_API_KEY or a dummy")
    p.add_argument("--problems", type=Path, default=REPO / "tests" / "fixtures" / "gsm8k_sample.jsonl")
    p.add_argument("--limit", type=int, default=None, help="first N problems only")
    p.add_argument("--solutions", "-M", type=int, default=2, help="MathShepherdGenerator M (solutions per problem)")
    p.add_argument("--completions", "-N", type=int, default=4, help="MathShepherdCompleter N (completions per step)")
    p.add_argument("--solutions-source", choices=["generator", "gold"], default="generator",
                   help="generator: MathShepherdGenerator writes M solutions (the recipe); gold: skip it and let "
                        "the completer label each problem's reference solution (GSM8K '####' answers, one 'Step k:' "
                        "per line) - same solutions for both tools, and a completer that runs even when the model "
                        "ignores the 'Step k:' format")
    p.add_argument("--max-tokens", type=int, default=512, help="max_new_tokens of every generation (both tasks)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--input-batch-size", type=int, default=50,
                   help="rows per batch of each task (distilabel default 50); OpenAILLM sends a batch's requests concurrently")
    p.add_argument("--request-timeout", type=int, default=3600,
                   help="OpenAILLM timeout in s (distilabel default 120 would time out requests queued behind a busy CPU server and retry them)")
    p.add_argument("--max-retries", type=int, default=6, help="OpenAILLM max_retries (distilabel default 6); retries show up in http_requests")
    p.add_argument("--no-proxy", action="store_true", help="talk to the server directly (http_requests and tokens then null)")
    p.add_argument("--pristine", action="store_true",
                   help="run distilabel unpatched (see apply_patches: a completer batch may then fail and lose its labels)")
    p.add_argument("--output", type=Path, default=None,
                   help="also write the labelled solutions as JSONL (Math-Shepherd input/label, via distilabel's FormatPRM)")
    p.add_argument("--dump-requests", type=Path, default=None,
                   help="write what the counting proxy saw (one JSON line per request, with the generated texts)")
    p.add_argument("--venv", type=Path, default=REPO / ".venv-distilabel", help="side virtualenv (created if missing)")
    p.add_argument("--reinstall", action="store_true", help="re-run pip in the side venv even if it looks ready")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Project side: make the venv, re-run this file in it.
# --------------------------------------------------------------------------------------------

def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path, reinstall: bool) -> Path:
    py = venv_python(venv)
    marker = venv / ".distilabel-side-requirements"
    wanted = "\n".join(REQUIREMENTS) + "\n"
    if not py.exists():
        log(f"creating virtualenv {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=sys.stderr)
    ready = (
        not reinstall
        and marker.exists()
        and marker.read_text() == wanted
        and subprocess.run([str(py), "-c", "import distilabel.models, openai, requests"],
                           check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    )
    if not ready:
        log("pip install", *REQUIREMENTS)
        t0 = time.perf_counter()
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", *REQUIREMENTS],
                       check=True, stdout=sys.stderr)
        marker.write_text(wanted)
        log(f"installed in {time.perf_counter() - t0:.0f}s")
    return py


def run_outer(args: argparse.Namespace, argv: list[str]) -> int:
    py = ensure_venv(args.venv.resolve(), args.reinstall)
    env = {**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # keep the project's packages out of the side venv
    env.pop("VIRTUAL_ENV", None)
    worker_argv = [a for a in argv if a != "--reinstall"]
    cmd = [str(py), str(Path(__file__).resolve()), "--worker", *worker_argv]
    proc = subprocess.run(cmd, check=False, env=env, stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        for line in lines:
            print(line, file=sys.stderr)
        log(f"worker failed (exit {proc.returncode})")
        return proc.returncode or 1
    for line in lines[:-1]:
        print(line, file=sys.stderr)
    print(lines[-1], flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# Worker side (runs in the side venv): counting proxy, pipeline, counts.
# --------------------------------------------------------------------------------------------

class CountingProxy:
    """Forwards HTTP to the real server and records each request's n, role and usage."""

    def __init__(self, upstream: str) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        up = urlsplit(upstream)
        if up.scheme != "http":
            raise SystemExit("the counting proxy only forwards plain http; use --no-proxy")
        self.upstream_path = up.path.rstrip("/")
        self.records: list[dict] = []
        lock = threading.Lock()
        records = self.records
        host, port = up.hostname, up.port or 80

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection", "keep-alive", "accept-encoding")}
                t0 = time.perf_counter()
                conn = http.client.HTTPConnection(host, port, timeout=None)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    status, resp_headers = resp.status, resp.getheaders()
                except OSError as e:
                    status, resp_headers, data = 502, [("Content-Type", "text/plain")], str(e).encode()
                finally:
                    conn.close()
                rec = {"method": self.command, "path": self.path, "status": status,
                       "start": t0, "end": time.perf_counter()}
                if body:
                    try:
                        req = json.loads(body)
                        msgs = req.get("messages") or []
                        system = next((m.get("content") or "" for m in msgs if m.get("role") == "system"), "")
                        rec.update(n=req.get("n", 1), max_tokens=req.get("max_tokens"), system=system[:80])
                    except ValueError:
                        pass
                try:
                    out = json.loads(data)
                    usage = out.get("usage") or {}
                    rec.update(prompt_tokens=usage.get("prompt_tokens"),
                               completion_tokens=usage.get("completion_tokens"),
                               texts=[(c.get("message") or {}).get("content") or c.get("text") or ""
                                      for c in out.get("choices") or []])
                except (ValueError, AttributeError):
                    pass
                with lock:
                    records.append(rec)
                self.send_response(status)
                for k, v in resp_headers:
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{self.upstream_path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def final_number(answer: str) -> str:
    """GSM8K '#### 1,234' (or a bare number) -> '1234'."""
    text = str(answer).split("####")[-1].strip()
    return text.replace(",", "").replace("$", "").strip()


def golden_solution(answer: str) -> list[str]:
    """distilabel's completer takes the golden solution as a list of parts and compares only its
    last one, "The answer is: X", with the last part of each completion (exact string match)."""
    answer = str(answer)
    steps: list[str] = []
    if "####" in answer:
        lines = [line.strip() for line in answer.split("####")[0].splitlines() if line.strip()]
        steps = [f"Step {i}: {line}" for i, line in enumerate(lines, 1)]
    return [*steps, f"The answer is: {final_number(answer)}"]


def load_problems(path: Path, limit: int | None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows.append({"instruction": r["question"], "golden_solution": golden_solution(r["answer"])})
            if limit is not None and len(rows) >= limit:
                break
    return rows


def check_server(args: argparse.Namespace) -> None:
    """Fail fast (instead of after OpenAILLM's retries) if the server is not up."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(args.base_url.rstrip("/") + "/models",
                                 headers={"Authorization": f"Bearer {args.api_key}"})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            served = [m.get("id") for m in json.load(resp).get("data", [])]
    except urllib.error.HTTPError as e:  # something answers: let the run tell
        log(f"warning: GET /models answered {e.code}; going on")
        return
    except (OSError, ValueError) as e:
        raise SystemExit(f"no OpenAI-compatible server at {args.base_url}: {e}") from e
    if args.model not in served:
        log(f"warning: --model {args.model!r} is not among the served models {served}")


def apply_patches() -> list[str]:
    """Two fixes to distilabel 1.5.3 that change neither the requests nor the labels.

    - ``MathShepherdCompleter._auto_label`` indexes the batch's per-*request* statistics and raw
      outputs by *row* (``statistics[i]`` for row i), so a batch with fewer completer requests
      than rows (solutions of <= 2 parts need none: common with a small model) raises IndexError
      after every request of the batch has been paid for, and distilabel replaces the batch's
      labels with Nones. Padding those lists to the number of rows avoids it.
    - ``create_distiset`` ends by "grabbing citations": for each step whose docstring lists arXiv
      references it calls arxiv2bibtex.org (requests + bs4, no timeout) inside ``pipeline.run``.
      Offline that is either an import error or a hang, so it is skipped.
    """
    import distilabel.distiset
    from distilabel.steps.tasks import MathShepherdCompleter

    original = MathShepherdCompleter._auto_label
    if getattr(original, "_stepforge_padded", False):
        return ["completer_metadata_index", "no_citation_lookup"]

    def _auto_label(self, inputs, final_outputs, input_positions, golden_answers,
                    statistics, raw_outputs, raw_inputs):
        missing = len(inputs) - len(statistics)
        if missing > 0:
            statistics = [*statistics, *({"input_tokens": [0], "output_tokens": [0]} for _ in range(missing))]
            raw_outputs = [*raw_outputs, *([""] * missing)]
            raw_inputs = [*raw_inputs, *([None] * missing)]
        return original(self, inputs, final_outputs, input_positions, golden_answers,
                        statistics, raw_outputs, raw_inputs)

    _auto_label._stepforge_padded = True
    MathShepherdCompleter._auto_label = _auto_label
    distilabel.distiset._grab_citations = lambda dag: []
    return ["completer_metadata_index", "no_citation_lookup"]


def run_worker(args: argparse.Namespace) -> int:
    import shutil
    import tempfile
    import warnings

    # Only the final JSON goes to the real stdout; distilabel's logs, rich output and those of
    # its step subprocesses (which inherit fd 1) all go to stderr.
    real_stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    # distilabel 1.5.3's Field(default=None) inside Annotated types, harmless under pydantic 2.12+
    warnings.filterwarnings("ignore", message="The 'default' attribute with value None")

    problems = load_problems(args.problems, args.limit)
    if not problems:
        raise SystemExit(f"no problems in {args.problems}")
    check_server(args)

    work = Path(tempfile.mkdtemp(prefix="distilabel-side-"))
    os.environ["HF_HOME"] = str(work / "hf")  # load_dataset() of the run's parquet files caches here
    os.environ["DISTILABEL_CACHE_DIR"] = str(work / "cache")
    try:
        result = run_pipeline(args, problems, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()
    return 0 if result["problems"] else 1


def run_pipeline(args: argparse.Namespace, problems: list[dict], work: Path) -> dict:
    import distilabel
    from distilabel.models import OpenAILLM
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts
    from distilabel.steps.tasks import MathShepherdCompleter, MathShepherdGenerator
    from distilabel.steps.tasks.math_shepherd.utils import split_solution_steps

    patches = [] if args.pristine else apply_patches()
    proxy = None if args.no_proxy else CountingProxy(args.base_url)
    base_url = proxy.base_url if proxy else args.base_url
    log(f"distilabel {distilabel.__version__}: {len(problems)} problems, M={args.solutions}, "
        f"N={args.completions}, max_tokens={args.max_tokens}, T={args.temperature}, "
        f"server {args.base_url}" + (f" via counting proxy {base_url}" if proxy else ""))

    def llm() -> OpenAILLM:
        return OpenAILLM(
            model=args.model, base_url=base_url, api_key=args.api_key,
            timeout=args.request_timeout, max_retries=args.max_retries,
            generation_kwargs={"max_new_tokens": args.max_tokens, "temperature": args.temperature,
                               "top_p": args.top_p},
        )

    with Pipeline(name="stepforge-distilabel-side", cache_dir=work / "cache") as pipeline:
        completer = MathShepherdCompleter(name="completer", llm=llm(), N=args.completions,
                                          input_batch_size=args.input_batch_size)
        if args.solutions_source == "gold":
            data = [{**p, "solutions": [list(p["golden_solution"])]} for p in problems]
            LoadDataFromDicts(name="load_problems", data=data, batch_size=args.input_batch_size) >> completer
        else:
            load = LoadDataFromDicts(name="load_problems", data=problems, batch_size=args.input_batch_size)
            generator = MathShepherdGenerator(name="generator", llm=llm(), M=args.solutions,
                                              input_batch_size=args.input_batch_size)
            load >> generator >> completer

    t0 = time.perf_counter()
    distiset = pipeline.run(use_cache=False)
    seconds = time.perf_counter() - t0
    if proxy:
        proxy.close()

    rows = list(distiset["default"]["train"]) if "default" in distiset else []
    tags = tuple(f" {t}" for t in completer.tags)  # (" +", " -")

    solutions = labelled = by_completion = by_answer = positive = 0
    expected_completer_requests = 0
    for row in rows:
        for sol in row.get("solutions") or []:
            if not sol:
                continue
            solutions += 1
            # the completer labelled parts [0, K-3] by completions and popped "The answer is:"
            # onto part K-2; here the solution has K-1 parts, the last labelled by answer match
            marks = [s.endswith(tags) for s in sol]
            labelled += sum(marks)
            positive += sum(s.endswith(tags[0]) for s in sol)
            by_answer += marks[-1]
            by_completion += sum(marks[:-1])
            expected_completer_requests += len(sol) - 1  # one request per part but the last

    recs = proxy.records if proxy else []
    chat = [r for r in recs if r["path"].endswith("/chat/completions")]
    gen_recs = [r for r in chat if r.get("system", "").startswith("You are a math tutor")]
    comp_recs = [r for r in chat if r.get("system", "").startswith("You are a math teacher")]
    n_values = sorted({r.get("n", 1) for r in chat})

    def tok(rs: list[dict], key: str) -> int | None:
        vals = [r[key] for r in rs if r.get(key) is not None]
        return sum(vals) if vals else None

    # time with at least one request in flight (the rest of `seconds` is distilabel's own)
    busy, cursor = 0.0, float("-inf")
    for r in sorted(chat, key=lambda r: r["start"]):
        if r["end"] > cursor:
            busy += r["end"] - max(r["start"], cursor)
            cursor = r["end"]

    # completions the completer's generations really contained, parsed the way distilabel does
    parsed = sum(
        sum(1 for part in (t or "").split("---") if split_solution_steps(part))
        for r in comp_recs for t in r.get("texts", [])
    ) if proxy else None
    completer_requests = len(comp_recs) if proxy else expected_completer_requests
    completions = completer_requests * args.completions

    if args.output:
        # the Math-Shepherd layout of distilabel's FormatPRM (format="math-shepherd"): "input" has
        # each step's last character (its tag) replaced by "ки", "label" keeps the tags
        with open(args.output, "w", encoding="utf-8") as f:
            for row in rows:
                for sol in row.get("solutions") or []:
                    if sol:
                        masked = [s[:-1] + "ки" if len(s) > 1 else s for s in sol]
                        f.write(json.dumps({"input": row["instruction"] + " " + "\n".join(masked),
                                            "label": row["instruction"] + " " + "\n".join(sol),
                                            "golden_answer": row["golden_solution"][-1]},
                                           ensure_ascii=False) + "\n")
        log(f"labelled solutions written to {args.output}")
    if args.dump_requests and proxy:
        with open(args.dump_requests, "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    return {
        "tool": "distilabel",
        "version": distilabel.__version__,
        "problems": len({r["instruction"] for r in rows}),
        "solutions": solutions,
        "labelled_steps": labelled,
        "completions": completions,
        "http_requests": len(chat) if proxy else None,
        "seconds": round(seconds, 2),
        "steps_per_hour": round(labelled / seconds * 3600, 1) if seconds > 0 else None,
        "completions_per_labelled_step": round(completions / labelled, 3) if labelled else None,
        # details
        "model": args.model,
        "M": args.solutions if args.solutions_source == "generator" else None,
        "N": args.completions,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "problems_in": len(problems),
        "solutions_source": args.solutions_source,
        "solutions_requested": len(problems) * args.solutions if args.solutions_source == "generator" else 0,
        "steps_labelled_by_completions": by_completion,
        "steps_labelled_by_answer_match": by_answer,
        "positive_labels": positive,
        "completer_requests": completer_requests,
        "completer_requests_expected": expected_completer_requests,
        "generator_requests": len(gen_recs) if proxy else None,
        "n_per_request": n_values if proxy else None,
        "completions_parsed": parsed,
        "seconds_requests_in_flight": round(busy, 2) if proxy else None,
        "failed_requests": sum(1 for r in chat if r["status"] != 200) if proxy else None,
        # rows whose completer (or generator) batch raised: distilabel then fills outputs with None
        "failed_rows": sum(1 for r in rows if r.get("model_name") is None),
        "patches": patches,
        "completion_tokens": tok(chat, "completion_tokens"),
        "completion_tokens_generator": tok(gen_recs, "completion_tokens"),
        "completion_tokens_completer": tok(comp_recs, "completion_tokens"),
        "prompt_tokens": tok(chat, "prompt_tokens"),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    return run_outer(args, argv)


if __name__ == "__main__":
    sys.exit(main())
