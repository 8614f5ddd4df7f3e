"""A SIGKILLed ``stepforge run`` leaves no process behind.

Without PREFECT_API_URL the run has Prefect start a temporary API server as its child
(flows/prefect_server.py); a kill -9 or the OOM killer gives the run no chance to stop it, so
the kernel must. The run is killed once that server exists: from then on the run has started
everything it starts before the model is loaded.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from cli_runs import start_run
from processes import kill_all, marked, wait_until_gone

FIXTURES = Path(__file__).parent / "fixtures"
PREFECT_SERVER = "prefect.server.api.server:create_app"  # in the temporary server's command line
MARK = "STEPFORGE_TEST_RUN_MARK"  # inherited by everything the run starts, orphans included

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds processes through /proc")


def write_config(tmp: Path) -> Path:
    config = {
        "run": "orphans",
        "store": str(tmp / "store"),
        "backend": {"model": "smollm2-135m", "n_ctx": 2048},
        "ingest": {"source": str(FIXTURES / "gsm8k_sample.jsonl"), "format": "gsm8k", "limit": 1},
    }
    path = tmp / "orphans.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_sigkilled_run_leaves_no_process_behind(tmp_path):
    mark = os.urandom(8).hex()
    run = start_run(write_config(tmp_path), tmp_path, env={MARK: mark})
    started = lambda: marked(MARK, mark)  # noqa: E731 - the run and everything it started, wherever they are now
    try:
        deadline = time.monotonic() + 300  # the run imports Prefect and starts the server: slow on a busy machine
        while not any(PREFECT_SERVER in p.cmdline for p in started()):
            if run.poll() is not None:
                pytest.fail(f"the run ended before it started Prefect's server:\n{run.stdout.read().decode()[-4000:]}")
            assert time.monotonic() < deadline, "the run started no Prefect server within 300 s"
            time.sleep(0.2)
        before = started()
        assert any(p.pid != run.pid for p in before), before

        run.send_signal(signal.SIGKILL)
        run.wait()  # not communicate(): an orphan would hold the output pipe open, and the read would hang
        # The kernel kills the children as their parent dies; the deadline only bounds the wait.
        left = wait_until_gone(started, 30)
        assert left == [], "still alive after the run was SIGKILLed:\n" + "\n".join(map(str, left))
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        kill_all(started())  # a failed run of this test must not leave its orphans to the next
        run.stdout.close()
