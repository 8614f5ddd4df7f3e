"""Every retry of the HTTP backend accounted for by its reason, against the faults the proxy injected.

A retry count equal to the injected fault count is a coincidence of an idle machine: an answer
slower than the client's timeout is retried too (reason ``timeout``), and a fault the proxy injects
only after forwarding the request (``drop``, ``truncated_json``) is seen as a timeout when the
upstream was that slow. What holds however busy the machine is:

- every fault costs exactly one retry (no sample is given up), so retries >= faults;
- a retry no fault explains is a timeout;
- a fault not seen under its own reason is a forwarded one, seen as a timeout instead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

# The retry reason the backend (stages/llm/openai_http.py) records for each kind of injected fault.
REASON_OF_FAULT = {
    "http_500": "http_500", "http_503": "http_503", "http_429": "http_429", "hang": "timeout",
    "drop": "connection", "truncated_json": "bad_json", "garbage_json": "bad_json",
}
# Injected after the upstream's answer, so only once the upstream has answered.
FORWARDED_FAULTS = ("drop", "truncated_json")


def retries_by_reason(counters: Mapping[str, float]) -> Counter[str]:
    """``retries.<reason>`` counts from a backend's counters or a run record's traffic."""
    return Counter({k.split(".", 1)[1]: int(v) for k, v in counters.items() if k.startswith("retries.") and v})


def assert_retries_accounted_for(proxy_counts: Mapping[str, int], counters: Mapping[str, float]) -> int:
    """Check the invariants above; return the retries no fault explains (slow answers)."""
    faults = Counter({kind: n for kind, n in proxy_counts.items() if kind != "forwarded" and n})
    # No other trouble: the upstream was always reachable, every request well-formed.
    assert set(faults) <= set(REASON_OF_FAULT), proxy_counts
    assert counters.get("gave_up", 0) == 0, counters
    retries = retries_by_reason(counters)
    assert sum(retries.values()) == counters.get("retries", 0), counters
    expected = Counter()
    for kind, n in faults.items():
        expected[REASON_OF_FAULT[kind]] += n
    surplus, shortfall = retries - expected, expected - retries
    forwarded = Counter()
    for kind in FORWARDED_FAULTS:
        forwarded[REASON_OF_FAULT[kind]] += faults[kind]
    context = f"retries {dict(retries)}, injected {dict(faults)}"
    assert set(surplus) <= {"timeout"}, f"retries no fault explains, for reasons other than a timeout: {context}"
    assert not shortfall - forwarded, f"faults the client never saw (nor saw as timeouts): {context}"
    assert surplus["timeout"] >= sum(shortfall.values()), f"forwarded faults missing from the timeouts: {context}"
    slow = sum(retries.values()) - sum(faults.values())
    assert slow >= 0, context
    return slow
