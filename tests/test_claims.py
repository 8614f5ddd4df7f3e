"""Arithmetic claims in one solution step: extraction and exact sympy checks (stages/verify/claims.py).

Measured on tests/fixtures/processbench_gsm8k_dev40.json (ProcessBench, GSM8K split, every 10th
row: 40 rows, 21 with an error, 210 steps, 137 of them before the human's earliest-error index):

* 139 claims in 118 steps: 124 true, 13 uncheckable (variables: the algebra steps), 2 false.
* Steps flagged false: 2. At or after the earliest-error index: 2 (gsm8k-40 step 1
  ``$194/meter × 490 meters = $94,860``, really 95,060; gsm8k-110 step 4 ``\\$20 - \\$13.00 =
  \\$6.00``). Before it (false alarms): 0. Precision 2/2.
* Erroneous rows with a flag exactly at the labelled index: 2 of 21. Most ProcessBench errors are
  wrong reasoning with right arithmetic, which this checker does not see.

Measured on /work/shared/data (not part of the suite): the 1,319 GSM8K test reference solutions
give 4,282 annotations (all true) and 355 plain-text equalities (221 true, 132 uncheckable for a
variable, 1 running total, 1 false: a real slip of the reference, row 1025 ``$32 - $20 = $300``);
the 500 MATH-500 reference solutions give 1,220 LaTeX equalities (526 true, 693 with a variable,
1 false: a real typo, row 175, a discriminant written ``(-4)^2 + 4 \\cdot 1 \\cdot (-1) = 20``).
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pytest
from stepforge.stages.verify.claims import (
    Claim,
    ClaimCheck,
    check_claim,
    check_step,
    extract_claims,
    flagged,
)

FIXTURES = Path(__file__).parent / "fixtures"
GSM8K_ROWS = [json.loads(line) for line in (FIXTURES / "gsm8k_solutions40.jsonl").open()]
# 1-based rows of grade_school_math/data/test.jsonl, in fixture order (see fixtures/README.md)
GSM8K_ROW_NUMBERS = [1, 2, 3, 4, 5, 6, 7, 116, 120, 136, 137, 161, 184, 185, 264, 342, 414, 520,
                     623, 632, 660, 690, 696, 708, 755, 832, 859, 921, 932, 947, 1013, 1031, 1048,
                     1067, 1114, 1134, 1160, 1174, 1205, 1271]
PROCESSBENCH = json.loads((FIXTURES / "processbench_gsm8k_dev40.json").read_text())


def summary(checks: list[ClaimCheck]) -> list[tuple[str, str, str, str]]:
    return [(c.claim.kind, c.status, c.claim.expression, c.claim.stated) for c in checks]


# --------------------------------------------------------------------------- canonical examples
@pytest.mark.parametrize(
    ("step", "expected"),
    [
        # GSM8K calculator annotations; the text around one is not a second claim
        ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.",
         [("annotation", "true", "16-3-4", "9")]),
        ("It takes 2/2=<<2/2=1>>1 bolt", [("annotation", "true", "2/2", "1")]),
        # plain text
        ("So they have 18 - 6 = 12 left.", [("equation", "true", "18-6", "12")]),
        ("3 x 4 = 12", [("equation", "true", "3*4", "12")]),
        ("$5 * 3 = $15", [("equation", "true", "5*3", "$15")]),
        ("1,200 + 300 = 1,500", [("equation", "true", "1200+300", "1,500")]),
        ("12 ÷ 4 = 3", [("equation", "true", "12/4", "3")]),
        ("2 × 3 = 6", [("equation", "true", "2*3", "6")]),
        ("20% of 50 = 10", [("equation", "true", "20%*50", "10")]),
        ("3/4 of 20 = 15", [("equation", "true", "3/4*20", "15")]),
        ("3 hours/day * 3 days = 9 hours per week",
         [("equation", "true", "3*3", "9 hours per week")]),
        ("$100 (Carmen) + $125 (Samantha) = $225", [("equation", "true", "100+125", "$225")]),
        ("4 twin sets / 2 sets per load = 2 loads", [("equation", "true", "4/2", "2 loads")]),
        ("5 plus 3 times 2 = 11", [("equation", "true", "5+3*2", "11")]),
        # LaTeX
        (r"Since there were 18, \(1/3 \times 18 = 6\) flamingos",
         [("latex", "true", "1/3*18", "6")]),
        (r"\[ \frac{1300}{2} = 650 \]", [("latex", "true", "1300/2", "650")]),
        (r"$\dfrac{3}{4} \cdot 8 = 6$", [("latex", "true", "3/4*8", "6")]),
        (r"\(\left( 2 + 3 \right)^2 = 25\)", [("latex", "true", "(2+3)**2", "25")]),
        (r"\[ \$20 - \$13.00 = \$7.00 \]", [("latex", "true", "20-13.00", r"\$7.00")]),
        (r"\(1{,}000 \div 4 = 250\)", [("latex", "true", "1000/4", "250")]),
        (r"\(2 \text{ checks/month} \times 12 \text{ months} = 24 \text{ checks}\)",
         [("latex", "true", "2*12", r"24 \text{ checks}")]),
        (r"\(\frac{200 \text{ pounds}}{50 \text{ pounds/bag}} = 4\)",
         [("latex", "true", "200/50", "4")]),
        (r"\(\sqrt{16} + 1 = 5\)", [("latex", "true", "sqrt(16)+1", "5")]),
        (r"\(\sqrt{2} \times \sqrt{8} = 4\)", [("latex", "true", "sqrt(2)*sqrt(8)", "4")]),
        (r"\(2^{10} = 1024\)", [("latex", "true", "2**10", "1024")]),
        (r"\(5! = 120\)", [("latex", "true", "factorial(5)", "120")]),
        (r"\(50\% \times 80 = 40\)", [("latex", "true", "50%*80", "40")]),
        (r"so the total is $40 + 60 + 50 = 150$ minutes", [("latex", "true", "40+60+50", "150")]),
        # decimals: rounding or truncation to the stated digits; "≈" is looser
        ("10/3 = 3.33", [("equation", "true", "10/3", "3.33")]),
        ("2/3 = 0.67", [("equation", "true", "2/3", "0.67")]),
        ("2/3 = 0.66", [("equation", "true", "2/3", "0.66")]),
        (r"\(1/3 \approx 0.333\)", [("latex", "true", "1/3", "0.333")]),
        ("100/17 ≈ 5.9", [("equation", "true", "100/17", "5.9")]),
        ("$0.05 / $0.75 = 0.0667", [("equation", "true", "0.05/0.75", "0.0667")]),
        ("26.67 meters × $1.5/meter ≈ $40.00", [("equation", "true", "26.67*1.5", "$40.00")]),
        ("10/3 = 3.34", [("equation", "false", "10/3", "3.34")]),
        ("2/3 = 0.68", [("equation", "false", "2/3", "0.68")]),
        # percentages: p% is p/100 or p, whichever the other side means
        ("(4 / 20) * 100 = 20%", [("equation", "true", "4/20*100", "20%")]),
        ("4/20 = 20%", [("equation", "true", "4/20", "20%")]),
        ("100% - 20% = 80%", [("equation", "true", "100%-20%", "80%")]),
        ("1% * 5% = 0.05%", [("equation", "true", "1%*5%", "0.05%")]),
        ("80 - 25% = 60", [("equation", "true", "80-25%", "60")]),
        ("1% * 5% = 1.05%", [("equation", "false", "1%*5%", "1.05%")]),
        # chains: one claim per adjacent pair, the left side of each must compute something
        ("= 20 - (12 + 4) = 20 - 16 = 4.",
         [("equation", "true", "20-(12+4)", "20 - 16"), ("equation", "true", "20-16", "4")]),
        ("2 hours = 2 * 60 = 120 minutes", [("equation", "true", "2*60", "120 minutes")]),
        (r"\[ 4 \times 12 + 3 = 48 + 3 = 51 \]",
         [("latex", "true", "4*12+3", "48 + 3"), ("latex", "true", "48+3", "51")]),
        # a running total is not a false claim
        ("2 * 3 = 6 + 1 = 7",
         [("equation", "uncheckable", "2*3", "6 + 1"), ("equation", "true", "6+1", "7")]),
        # wrong arithmetic
        ("3 * 4 = 13", [("equation", "false", "3*4", "13")]),
        ("Cost = $194/meter × 490 meters = $94,860.",
         [("equation", "false", "194*490", "$94,860")]),
        ("5 + 3 = 7, wait, 5 + 3 = 8",
         [("equation", "false", "5+3", "7"), ("equation", "true", "5+3", "8")]),
        # variables: uncheckable when there is arithmetic around them, else not a claim
        ("Then 2x + 3 = 13", [("equation", "uncheckable", "2*x+3", "13")]),
        (r"\(28 - x = 2J\)", [("latex", "uncheckable", "28-x", "2J")]),
        (r"\(\pi \times 2^2 = 12.57\)", [("latex", "uncheckable", "pi*2**2", "12.57")]),
        ("Let x be the number of apples, so x = 28 - 2J.", []),
        (r"\(12 = 4x\)", []),
        ("There are 20 students in the class.", []),
        # not extracted: words or notation around the numbers could change their value
        ("Half of 18 + 2 = 11", []),
        ("5 more than 3 * 2 = 11", []),
        ("1 + 0.5 = 1 hour and 30 minutes", []),
        ("5 / 2 = 2 and a half", []),
        ("1.5 million + 0.5 million = 2 million", []),
        ("3 1/2 + 1 1/2 = 5", []),
        (r"\(2\frac{1}{2} + 1 = 3.5\)", []),
        ("1 + 2 + ... + 10 = 55", []),
        (r"\(10n + 10 \leq 120\)", []),
        ("40 / 3 = 13 remainder 1", []),
        ("It is 10:30 - 15 = 10:15", []),
        (r"\(\frac{1}{3} = 0.\overline{3}\)", []),
        (r"\(3 \cdot 4 = 2 \pmod{5}\)", []),
        # deliberate rounding, rounded inputs and unit changes are not arithmetic errors
        ("40 / 3 = 14 buses", [("equation", "uncheckable", "40/3", "14 buses")]),
        ("3 * 3.33 = 10", [("equation", "uncheckable", "3*3.33", "10")]),
        ("25 cents * 4 = $1", [("equation", "uncheckable", "25*4", "$1")]),
        ("30 minutes * 4 = 2 hours", [("equation", "uncheckable", "30*4", "2 hours")]),
        ("Add 3 and 4, then double: 3 + 4 x 2 = 14",
         [("equation", "uncheckable", "3+4*2", "14")]),
        ("<<3+4*2=14>>", [("annotation", "false", "3+4*2", "14")]),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_canonical_steps(step: str, expected: list[tuple[str, str, str, str]]) -> None:
    assert summary(check_step(step)) == expected


@pytest.mark.parametrize(
    ("step", "computed", "detail"),
    [
        ("3 * 4 = 13", "12", "3*4 is 12, not 13"),
        ("<<48/2=25>>", "24", "48/2 is 24, not 25"),
        ("10/3 = 3.34", "10/3", "10/3 is 10/3 (≈ 3.33333), not 3.34"),
        ("0.99 * $5 = $4.96", "4.95", "0.99*5 is 4.95, not $4.96"),
        (r"\(\$20 - \$13.00 = \$6.00\)", "7", r"20-13.00 is 7, not \$6.00"),
        (r"\(\frac{1}{4} + \frac{1}{2} = \frac{5}{4}\)", "3/4",
         r"1/4+1/2 is 3/4 (≈ 0.75), not \frac{5}{4}"),
        ("12.5% of 80 = 11", "10", "12.5%*80 is 10, not 11"),
    ],
)
def test_a_false_claim_says_computed_versus_stated(step: str, computed: str, detail: str) -> None:
    (check,) = check_step(step)
    assert (check.status, check.computed, check.detail) == ("false", computed, detail)


@pytest.mark.parametrize(
    ("expression", "stated", "status", "computed"),
    [
        ("3*4", "12", "true", "12"),
        ("7/3", "2.33", "true", "7/3"),
        ("7/3", "2.4", "false", "7/3"),
        ("2**-2", "0.25", "true", "0.25"),
        ("sqrt(2)*sqrt(2)", "2", "true", "2"),
        ("25%*80", "20", "true", "20"),
        ("2*x", "10", "uncheckable", None),
        ("1/0", "5", "uncheckable", None),
    ],
)
def test_check_claim_on_a_claim_built_by_hand(
    expression: str, stated: str, status: str, computed: str | None
) -> None:
    text = f"{expression} = {stated}"
    check = check_claim(Claim("equation", text, expression, stated, (0, len(text))))
    assert (check.status, check.computed) == (status, computed)


def test_a_variable_is_named_in_the_detail() -> None:
    (check,) = check_step("so 1.5x = 150")
    assert (check.status, check.detail) == ("uncheckable", "contains a variable: x")


@pytest.mark.parametrize(
    ("step", "detail"),
    [
        ("<<5*=3>>", "cannot parse expression: '5*'"),
        ("<<>>", "empty annotation"),
        ("<<7>>", "annotation has no '='"),
        ("<<2*x=10>>", "contains a variable: x"),
        ("<<4/0=1>>", "division by zero"),
        ("<<3+4=>>", "empty stated side"),
        ("<<3+4=7=8>>", "cannot parse stated side: '7=8'"),
    ],
)
def test_malformed_annotations_are_uncheckable(step: str, detail: str) -> None:
    (check,) = check_step(step)
    assert (check.claim.kind, check.status, check.detail) == ("annotation", "uncheckable", detail)


# --------------------------------------------------------------------------- robustness
PATHOLOGICAL = {
    "power tower": "9**9**9 = 5",
    "latex power tower": r"\(2^{2^{2^{2^{2}}}} = 5\)",
    "huge exponent": r"\(10^{10^{10}} = 1\)",
    "huge factorial": r"\(100000! = 1\)",
    "huge literal": "1" * 6000 + " + 1 = 2",
    "huge square root": r"\(\sqrt{" + "9" * 300 + r"} = 3\)",
    "deep parentheses": "(" * 5000 + "1" + ")" * 5000 + " = 1",
    "deep fractions": r"\(" + r"\frac{1}{" * 300 + "2" + "}" * 300 + r" = 1\)",
    "long expression": "1+" * 5000 + "1 = 5001",
}


@pytest.mark.parametrize("step", PATHOLOGICAL.values(), ids=PATHOLOGICAL.keys())
def test_pathological_input_is_refused_quickly(step: str) -> None:
    started = time.perf_counter()
    checks = check_step(step)
    assert time.perf_counter() - started < 1.0
    assert [(c.status, c.detail) for c in checks] == [("uncheckable", "too large")]


@pytest.mark.parametrize(
    "expression", ["9**9**9", "2**100000", "factorial(100000)", "sqrt(" * 60 + "2" + ")" * 60]
)
def test_check_claim_refuses_huge_values_before_computing(expression: str) -> None:
    check_claim(Claim("equation", "1+1=2", "1+1", "2", (0, 5)))  # sympy's first-call setup
    started = time.perf_counter()
    check = check_claim(Claim("equation", f"{expression}=1", expression, "1", (0, 1)))
    assert time.perf_counter() - started < 0.1
    assert (check.status, check.detail) == ("uncheckable", "too large")


def test_check_step_never_raises_and_returns_quickly_on_noise() -> None:
    rng = random.Random(0)
    alphabet = "0123456789+-*/^()=.,x$%\\{}<> \n"
    noise = ["".join(rng.choice(alphabet) for _ in range(20_000)) for _ in range(3)]
    words = " ".join(rng.choice(["3", "+", "=", "apples", "of", "x", "(", ")", "2.5", "%",
                                 r"\frac", "{", "}", "<<", ">>"]) for _ in range(10_000))
    for step in [*noise, words, "", "=" * 5000, "<<" * 1000, "1 = " * 3000, None, b"3+4=7"]:
        started = time.perf_counter()
        checks = check_step(step)  # type: ignore[arg-type]
        assert time.perf_counter() - started < 2.5
        assert isinstance(checks, list)


def test_claim_text_is_its_span_in_the_step() -> None:
    steps = [row["answer"] for row in GSM8K_ROWS]
    steps += [step for row in PROCESSBENCH for step in row["steps"]]
    claims = [(step, claim) for step in steps for claim in extract_claims(step)]
    assert len(claims) > 300
    for step, claim in claims:
        assert step[claim.span[0] : claim.span[1]] == claim.text
        assert claim.text.endswith(claim.stated) or claim.kind == "annotation"


# --------------------------------------------------------------------------- GSM8K references
@pytest.mark.parametrize("row", GSM8K_ROWS, ids=[f"gsm8k-test-{n}" for n in GSM8K_ROW_NUMBERS])
def test_gsm8k_reference_solutions_raise_no_false_alarm(row: dict) -> None:
    answer = row["answer"]
    checks = check_step(answer)
    annotations = [c for c in checks if c.claim.kind == "annotation"]
    plain = [c for c in checks if c.claim.kind != "annotation"]
    assert len(annotations) == answer.count("<<")
    assert [c.status for c in annotations] == ["true"] * len(annotations)
    for check in plain:  # the references' own algebra ("3B = 75") cannot be computed
        assert check.status == "true" or check.detail.startswith("contains a variable"), check


def test_the_gsm8k_fixture_has_plain_text_claims_to_check() -> None:
    plain = [c for row in GSM8K_ROWS for c in check_step(row["answer"])
             if c.claim.kind != "annotation" and c.status == "true"]
    assert len(plain) >= 70


def test_a_real_slip_in_a_gsm8k_reference_is_caught() -> None:
    # grade_school_math/data/test.jsonl row 1025 (MIT): the revenue was $320, not $32
    step = "She gave a total of 10 x 2 = $<<10*2=20>>20 to her sisters for helping her.\n" \
           "So, Suzzane has $32 - $20 = $300 left."
    assert [(c.claim.text, c.status) for c in check_step(step)] == [
        ("<<10*2=20>>", "true"), ("$32 - $20 = $300", "false")]


def _bump(number: str) -> str:
    """``number`` (digits, maybe commas and decimals) with 1 added to its whole part."""
    whole, _, decimals = number.partition(".")
    value = int(whole.replace(",", "") or 0) + 1
    text = f"{value:,}" if "," in whole else str(value)
    return text + ("." + decimals if decimals else "")


_ANNOTATION = re.compile(r"<<([^<>=]*)=(\d[\d.]*)>>([\d,]*(?:\.\d+)?)")
_STATED_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
_OPERATOR = re.compile(r"[-+*×÷^]|/\s*[\d$(]")


def _mutations(answer: str):
    """(mutated text, start of the changed claim, new stated number) for every claim whose result
    is a plain number: the annotation and the number shown after it, or a plain-text result."""
    for match in _ANNOTATION.finditer(answer):
        expression, result, shown = match.groups()
        new = _bump(result)
        shown_new = _bump(shown) if shown.replace(",", "") == result else shown
        annotation = f"<<{expression}={new}>>{shown_new}"
        yield answer[: match.start()] + annotation + answer[match.end() :], match.start(), new
    for check in check_step(answer):
        if check.claim.kind == "annotation" or check.status != "true":
            continue
        start = check.claim.span[1] - len(check.claim.stated)
        number = _STATED_NUMBER.search(check.claim.stated)
        if number is None or _OPERATOR.search(check.claim.stated):
            continue  # "= 20 - 16 = 4": changing 20 would change the next claim too
        at = start + number.start()
        new = _bump(number.group())
        yield answer[:at] + new + answer[start + number.end() :], check.claim.span[0], new


@pytest.mark.parametrize("row", GSM8K_ROWS, ids=[f"gsm8k-test-{n}" for n in GSM8K_ROW_NUMBERS])
def test_one_changed_result_is_exactly_the_one_false_claim(row: dict) -> None:
    mutations = list(_mutations(row["answer"]))
    assert mutations
    for mutated, start, new in mutations:
        flagged = [c for c in check_step(mutated) if c.status == "false"]
        assert [c.claim.span[0] for c in flagged] == [start], (mutated, flagged)
        (check,) = flagged
        assert check.computed is not None
        assert f"is {check.computed}" in check.detail and new in check.detail


# --------------------------------------------------------------------------- ProcessBench
def _processbench_flags() -> list[tuple[str, int, int, str]]:
    """(row id, step index, human label, flagged claim) for every step with a false claim."""
    flags = []
    for row in PROCESSBENCH:
        for index, step in enumerate(row["steps"]):
            flags.extend(
                (row["id"], index, row["label"], check.claim.text)
                for check in flagged(check_step(step))
            )
    return flags


def test_processbench_steps_the_humans_call_correct_are_never_flagged() -> None:
    flags = _processbench_flags()
    false_alarms = [f for f in flags if f[2] == -1 or f[1] < f[2]]
    assert false_alarms == []
    # the two arithmetic slips in the sample, both at the human's earliest-error index
    assert [(row_id, index) for row_id, index, label, _ in flags if index == label] == [
        ("gsm8k-40", 1), ("gsm8k-110", 4)]


def test_processbench_correct_steps_do_have_claims_to_check() -> None:
    correct_steps = [step for row in PROCESSBENCH for index, step in enumerate(row["steps"])
                     if row["label"] == -1 or index < row["label"]]
    statuses = [c.status for step in correct_steps for c in check_step(step)]
    assert len(correct_steps) == 137
    assert statuses.count("true") >= 60
    assert "false" not in statuses


def test_math500_reference_solutions_raise_no_false_alarm() -> None:
    rows = [json.loads(line) for line in (FIXTURES / "math500_sample.jsonl").open()]
    statuses = [c.status for row in rows for c in check_step(row["solution"])]
    assert "false" not in statuses
    assert statuses.count("true") >= 3
