"""Tool-grounded checks of the arithmetic in one solution step (GroundedPRM / Safe style).

A pure library: no I/O, no model. ``check_step(step)`` finds the arithmetic a step states and
recomputes it with sympy in exact rational arithmetic.

What is extracted
    * GSM8K calculator annotations ``<<48/2=24>>`` (kind ``"annotation"``), every one, including
      malformed ones such as ``<<5*=3>>`` or ``<<>>`` (they come back ``uncheckable``).
    * Plain-text equalities (kind ``"equation"``): ``18 - 6 = 12``, ``3 x 4 = 12``,
      ``$5 * 3 = $15``, ``1,200 + 300 = 1,500``, ``12 ÷ 4 = 3``, ``20% of 50 = 10``,
      ``3 hours/day * 3 days = 9 hours``, ``$100 (Carmen) + $125 (Samantha) = $225``.
    * LaTeX (kind ``"latex"``): ``\\frac``/``\\dfrac``, ``\\times``, ``\\cdot``, ``\\div``, ``^``,
      ``\\sqrt``, ``\\left( \\right)``, ``\\$``, ``\\%``, ``\\text{...}`` units, ``1{,}000``.
    * Chains ``a = b = c`` give one claim per adjacent pair. A pair is only extracted when its left
      side computes something (has an operator): ``2 hours = 2 * 60 = 120 minutes`` yields
      ``2 * 60 = 120`` and not ``2 = 2 * 60``.

    Units, currency signs and thousands separators are dropped only where that is unambiguous:
    a word directly after a number (``3 days``, ``$2/meter``, ``(Carmen)``). An expression is not
    extracted when the words around it could change its value: ``half of 18 + 2 = 11``,
    ``5 more than 3 * 2 = 11``, ``= 1 hour and 30 minutes``, ``= 2 million``, a mixed number
    ``2 1/2``, ``\\pmod``, a subscript base ``12_4``, an ellipsis.

What is checkable
    A claim whose two sides are numbers after parsing. A variable (``2x``, ``\\pi``), an
    unsupported command (``\\binom``), an unparseable side, a division by zero or a number too
    large to compute (``9**9**9``, ``10000!``, deep nesting, very long expressions: refused
    before computing) make it ``uncheckable``, with the reason in ``detail``. A step with no
    arithmetic claim at all gives ``[]``.

Tolerance
    Exact numbers compare exactly. When the stated side is a decimal with d digits after the
    point, the value rounded (to nearest) or truncated to d digits passes: ``10/3 = 3.33``,
    ``2/3 = 0.67`` and ``2/3 = 0.66``, ``1/15 = 0.0667``, but not ``2/3 = 0.68``. ``≈`` /
    ``\\approx`` (or "about", "approximately" after the ``=``) passes anything within one unit of
    the last stated digit or within 1%. A stated percentage ``p%`` passes as p/100 or as p
    (``(4/20)*100 = 20%`` and ``4/20 = 20%`` are both right); in the computed side ``p%`` is read
    as p/100, then as a bare p, then as a share of what it is added to (``80 - 25% = 60``).

    A mismatch is ``uncheckable``, not ``false``, when a careful reader would not call it an
    arithmetic error: a running total ``2 * 3 = 6 + 1 = 7`` (the right side starts with the left
    side's value), inputs that are themselves rounded (``3 * 3.33 = 10``), a whole number next to
    a fractional result (``40 / 3 = 14 buses``), a change of unit by a conversion factor
    (``25 cents * 4 = $1``, ``30 minutes * 4 = 2 hours``), or a result that the written
    expression gives when worked left to right (``3 + 4 x 2 = 14``; not for a calculator
    annotation, whose calculator used precedence).

Why precision over recall
    A ``false`` marks a step as wrong in PRM training data. A false alarm on a correct step
    teaches the reward model that good reasoning is bad, while a missed error only leaves that
    step to the other labellers (Monte-Carlo rollouts, judges). So every ambiguity resolves to
    ``uncheckable`` or to not extracting the claim. Measured (``tests/test_claims.py``): on the
    1,319 GSM8K reference solutions (4,282 annotations, 355 plain-text equalities) and the 500
    MATH-500 reference solutions (1,220 LaTeX equalities), the only ``false`` results are two
    real slips of the references;
    on 40 ProcessBench GSM8K rows no step before the human-labelled first error is flagged, and
    both flagged steps are exactly at it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Literal

import sympy

__all__ = ["Claim", "ClaimCheck", "check_claim", "check_step", "extract_claims", "flagged"]

ClaimKind = Literal["annotation", "equation", "latex"]
CheckStatus = Literal["true", "false", "uncheckable"]


@dataclass(frozen=True)
class Claim:
    """One arithmetic statement found in a step."""

    kind: ClaimKind
    text: str
    """The claim exactly as it appears in the step (``step[span[0]:span[1]]``)."""
    expression: str
    """The left side, normalised: ``*``, ``/``, ``**``, ``sqrt()``, ``factorial()``, no units,
    currency or thousands separators. A percentage keeps its ``%`` so both of its readings stay
    available to ``check_claim``."""
    stated: str
    """The right side as written, with its units: ``"$94,860"``, ``"9 hours per week"``,
    ``"48 + 3"`` (in a chain the next claim's left side)."""
    span: tuple[int, int]
    approx: bool = False
    """The relation was ``≈`` / ``\\approx`` / "about": the looser tolerance applies."""


@dataclass(frozen=True)
class ClaimCheck:
    claim: Claim
    status: CheckStatus
    computed: str | None
    """The value of ``claim.expression``: ``"24"``, ``"4.95"``, ``"7/3"``, ``"sqrt(2)"``."""
    detail: str


# --------------------------------------------------------------------------- limits
# Every guard is a size check made before sympy computes anything, so no call can run long.
_MAX_STEP_CHARS = 50_000
_MAX_TOKENS = 150  # per side of a claim
_MAX_DEPTH = 40  # nested parentheses / fractions / powers
_MAX_BITS = 20_000  # numerator or denominator of any intermediate value (~6,000 digits)
_MAX_FACTORIAL = 1_000
_MAX_CLAIMS = 200
_STEP_BUDGET_SECONDS = 2.0

# --------------------------------------------------------------------------- tokens
_NUM, _OP, _LP, _RP, _EQ, _INEQ = "NUM", "OP", "LP", "RP", "EQ", "INEQ"
_WORD, _LETTER, _VAR, _TEXT, _FUNC, _FRAC = "WORD", "LETTER", "VAR", "TEXT", "FUNC", "FRAC"
_FACT, _DEG, _STOP, _ELLIPSIS, _MOD, _SUB = "FACT", "DEG", "STOP", "ELLIPSIS", "MOD", "SUB"

_CLOSING = {"(": ")", "[": "]", "{": "}"}


class _Tok:
    __slots__ = ("dec", "end", "kind", "latex", "math", "pct", "space", "start", "text", "value")

    def __init__(self, kind: str, text: str, start: int, end: int, space: bool, math_mode: bool):
        self.kind = kind
        self.text = text
        self.start = start
        self.end = end
        self.space = space  # whitespace (or nothing: start of text) right before the token
        self.math = math_mode
        self.latex = False
        self.value = ""
        self.dec = 0
        self.pct = False

    @property
    def low(self) -> str:
        return self.text.lower()

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"{self.kind}({self.text!r})"


_NUM_RE = re.compile(
    r"(?P<cur>(?:\\\$|\$|€|£|¥|₹)[ ]?)?"
    r"(?P<num>\d{1,3}(?:(?:,|\{,\}|,\\!)\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?P<pct>[ ]?(?:\\%|%)|[ ](?:percent|per[ ]?cent)\b)?"
)
_ORDINAL_RE = re.compile(r"(?:st|nd|rd|th)\b", re.IGNORECASE)
_LETTERS_RE = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
_SPACE_RE = re.compile(r"\s+")
_EQUALS_NEXT = re.compile(r"\s*=")
_COMMAND_RE = re.compile(r"\\([A-Za-z]+|[\s\S])")
_ENV_RE = re.compile(r"\\(begin|end)\s*\{([A-Za-z]+\*?)\}")
_MATH_ENVS = {"align", "align*", "aligned", "equation", "equation*", "gather", "gather*",
              "eqnarray", "eqnarray*", "multline", "multline*", "split", "displaymath"}

_TIMES_COMMANDS = {"times", "cdot", "ast", "cdotp"}
_APPROX_COMMANDS = {"approx", "simeq", "sim", "doteq", "approxeq", "thickapprox", "thicksim"}
_INEQ_COMMANDS = {"le", "leq", "ge", "geq", "lt", "gt", "neq", "ne", "equiv", "cong", "propto",
                  "leqslant", "geqslant", "ll", "gg", "in", "notin", "subset", "subseteq",
                  "to", "rightarrow", "Rightarrow", "implies", "iff", "mapsto", "longrightarrow"}
_TEXT_COMMANDS = {"text", "textbf", "textit", "textrm", "textnormal", "mathrm", "mbox", "textsf",
                  "mathit", "mathsf", "operatorname", "textup", "texttt"}
_SPACE_COMMANDS = {",", ";", ":", "!", " ", "\n", "\t", "displaystyle", "textstyle", "boxed",
                   "fbox", "big", "Big", "bigg", "Bigg", "bigl", "bigr", "Bigl", "Bigr", "biggl",
                   "biggr", "Biggl", "Biggr", "limits", "nolimits", "enspace", "thinspace",
                   "medspace", "thickspace", "negthinspace"}
_ELLIPSIS_COMMANDS = {"ldots", "cdots", "dots", "dotsc", "dotsb", "dotsm", "vdots", "ddots"}
_FRAC_COMMANDS = {"frac", "dfrac", "tfrac", "cfrac"}

_OP_CHARS = {"+": "+", "-": "-", "−": "-", "–": "-", "*": "*", "×": "*", "∗": "*", "·": "*",
             "⋅": "*", "✕": "*", "/": "/", "÷": "/", "^": "^"}
_INEQ_CHARS = set("<>≤≥≠≡≦≧⩽⩾→⇒")
_SUPERSCRIPTS = {"²": "2", "³": "3"}


class _Tokenizer:
    """Text to tokens, with character spans into the original text.

    Two modes: inside ``\\( \\)``, ``\\[ \\]``, ``$$ $$`` and math environments a run of letters
    is a variable; outside, it is an English word (a unit when it follows a number) and only a
    single letter can be a variable. A ``$`` before a number is a currency sign; any other ``$``
    delimits inline math and so ends an expression.
    """

    def __init__(self, text: str, masks: list[tuple[int, int]] | None, math_mode: bool):
        self.s = text
        self.masks = sorted(masks or [])
        self.math = math_mode
        self.toks: list[_Tok] = []
        self.space = True

    def add(self, kind: str, text: str, start: int, end: int, latex: bool = False) -> _Tok:
        tok = _Tok(kind, text, start, end, self.space, self.math)
        tok.latex = latex
        self.toks.append(tok)
        self.space = False
        return tok

    def stop(self, text: str, start: int, end: int) -> None:
        self.add(_STOP, text, start, end)

    def run(self) -> list[_Tok]:
        s, n, i = self.s, len(self.s), 0
        masks = list(self.masks)
        while i < n:
            if masks and i >= masks[0][0]:
                start, end = masks.pop(0)
                if end > i:
                    self.stop("<<>>", start, end)
                    self.space = True
                    i = end
                continue
            ch = s[i]
            if ch.isspace():
                match = _SPACE_RE.match(s, i)
                assert match is not None
                if "\n" in match.group() and not self.math:
                    self.stop("\n", i, match.end())
                self.space = True
                i = match.end()
                continue
            i = self.one(i)
        return self.toks

    def one(self, i: int) -> int:
        s = self.s
        ch = s[i]
        two = s[i : i + 2]
        if two in ("\\(", "\\["):
            self.stop(two, i, i + 2)
            self.math = True
            self.space = True
            return i + 2
        if two in ("\\)", "\\]"):
            self.stop(two, i, i + 2)
            self.math = False
            self.space = True
            return i + 2
        if two == "$$":
            self.stop(two, i, i + 2)
            self.math = not self.math
            self.space = True
            return i + 2
        number = _NUM_RE.match(s, i)
        if number and (number.group("cur") or ch != "." or i == 0 or not s[i - 1].isalnum()):
            return self.number(number)
        if ch == "\\":
            env = _ENV_RE.match(s, i)
            if env is None:
                return self.command(i)
            if env.group(2) in _MATH_ENVS:
                self.math = env.group(1) == "begin"
            self.stop(env.group(), i, env.end())
            self.space = True
            return env.end()
        if ch == "$":  # inline math delimiter (a price "$5" was taken as a number above)
            self.stop(ch, i, i + 1)
            self.space = True
            return i + 1
        if two == "**":
            self.add(_OP, "^", i, i + 2)
            return i + 2
        if ch == "^":
            return self.caret(i)
        if ch in _SUPERSCRIPTS:
            self.add(_OP, "^", i, i + 1)
            tok = self.add(_NUM, _SUPERSCRIPTS[ch], i, i + 1)
            tok.value = _SUPERSCRIPTS[ch]
            return i + 1
        if ch == "°":
            self.add(_DEG, ch, i, i + 1)
            return i + 1
        if ch in "=≈≃≅":
            return self.equals(i)
        if ch in _INEQ_CHARS or two in ("!=", "<=", ">="):
            width = 2 if two in ("!=", "<=", ">=", "=>") else 1
            self.add(_INEQ, s[i : i + width], i, i + width)
            return i + width
        if ch in _OP_CHARS:
            self.add(_OP, _OP_CHARS[ch], i, i + 1)
            return i + 1
        if ch in "([{":
            self.add(_LP, ch, i, i + 1, latex=ch == "{")
            return i + 1
        if ch in ")]}":
            self.add(_RP, ch, i, i + 1, latex=ch == "}")
            return i + 1
        if ch == "!" and self.math:
            self.add(_FACT, ch, i, i + 1)
            return i + 1
        if ch == "_":
            self.add(_SUB, ch, i, i + 1)
            return i + 1
        if s.startswith("...", i) or ch == "…":
            width = 3 if ch == "." else 1
            self.add(_ELLIPSIS, s[i : i + width], i, i + width)
            return i + width
        if ch == "&":
            # An alignment point right before/after "=" is spacing; elsewhere (matrices) it
            # separates cells and so ends an expression.
            if _EQUALS_NEXT.match(s, i + 1) or (self.toks and self.toks[-1].kind == _EQ):
                self.space = True
            else:
                self.stop(ch, i, i + 1)
            return i + 1
        if ch == "~" and self.math:
            self.space = True
            return i + 1
        letters = _LETTERS_RE.match(s, i)
        if letters:
            return self.letters(letters)
        self.stop(ch, i, i + 1)
        return i + 1

    def number(self, match: re.Match[str]) -> int:
        end = match.end()
        if not match.group("pct") and _ORDINAL_RE.match(self.s, end):
            ordinal = _ORDINAL_RE.match(self.s, end)
            assert ordinal is not None
            self.stop(self.s[match.start() : ordinal.end()], match.start(), ordinal.end())
            return ordinal.end()
        tok = self.add(_NUM, match.group(), match.start(), end, latex="\\" in match.group())
        digits = re.sub(r"\{,\}|,\\!|,", "", match.group("num"))
        tok.value = digits
        tok.dec = len(digits.split(".")[1]) if "." in digits else 0
        tok.pct = bool(match.group("pct"))
        return end

    def equals(self, i: int) -> int:
        s = self.s
        if s.startswith("==", i) or s.startswith("=>", i):
            self.add(_INEQ, s[i : i + 2], i, i + 2)
            return i + 2
        tok = self.add(_EQ, s[i], i, i + 1)
        tok.value = "≈" if s[i] != "=" else "="
        return i + 1

    def caret(self, i: int) -> int:
        rest = self.s[i + 1 : i + 12]
        for degree in ("\\circ", "{\\circ}", "{ \\circ }", "{\\circ }", "{ \\circ}"):
            if rest.startswith(degree):
                self.add(_DEG, "^" + degree, i, i + 1 + len(degree), latex=True)
                return i + 1 + len(degree)
        self.add(_OP, "^", i, i + 1)
        return i + 1

    def letters(self, match: re.Match[str]) -> int:
        word = match.group()
        start, end = match.start(), match.end()
        if word.lower() in ("sqrt", "factorial") and self.s[end : end + 1] == "(":
            self.add(_FUNC, word.lower(), start, end)
        elif self.math:
            self.add(_VAR, word, start, end)
        elif len(word) == 1:
            self.add(_LETTER, word, start, end)
        else:
            self.add(_WORD, word, start, end)
        return end

    def command(self, i: int) -> int:
        s = self.s
        match = _COMMAND_RE.match(s, i)
        if match is None:  # a lone trailing backslash
            self.stop("\\", i, i + 1)
            return i + 1
        name, end = match.group(1), match.end()
        if name == "\\" or name in ("quad", "qquad", "pm", "mp", "{", "}", "|", "%", "vert"):
            self.stop(match.group(), i, end)
            return end
        if name in _SPACE_COMMANDS or name == "$":  # "\$" without a number after it
            self.space = True
            return end
        if name in ("hspace", "vspace", "color", "textcolor"):
            group_end = _brace_group_end(s, end)
            self.space = True
            return group_end if group_end is not None else end
        if name in _TIMES_COMMANDS:
            self.add(_OP, "*", i, end, latex=True)
        elif name == "div":
            self.add(_OP, "/", i, end, latex=True)
        elif name in _APPROX_COMMANDS:
            tok = self.add(_EQ, match.group(), i, end, latex=True)
            tok.value = "≈"
        elif name in _INEQ_COMMANDS:
            self.add(_INEQ, match.group(), i, end, latex=True)
        elif name in _ELLIPSIS_COMMANDS:
            self.add(_ELLIPSIS, match.group(), i, end, latex=True)
        elif name in ("pmod", "bmod", "mod"):
            self.add(_MOD, match.group(), i, end, latex=True)
        elif name in ("circ", "degree"):
            self.add(_DEG, match.group(), i, end, latex=True)
        elif name in _FRAC_COMMANDS:
            self.add(_FRAC, match.group(), i, end, latex=True)
        elif name == "sqrt":
            if s[end:].lstrip().startswith("["):  # an n-th root: not supported
                self.add(_VAR, "\\sqrt[n]", i, end, latex=True)
            else:
                self.add(_FUNC, "sqrt", i, end, latex=True)
        elif name in ("left", "right"):
            return self.delimiter(i, end, name)
        elif name in _TEXT_COMMANDS:
            group_end = _brace_group_end(s, end)
            if group_end is None:
                self.add(_VAR, match.group(), i, end, latex=True)
                return end
            content = s[s.index("{", end) + 1 : group_end - 1]
            tok = self.add(_TEXT, content, i, group_end, latex=True)
            tok.value = content.strip().lower()
            return group_end
        else:
            self.add(_VAR, match.group(), i, end, latex=True)  # \pi, \binom, \log, \alpha, ...
        return end

    def delimiter(self, i: int, end: int, name: str) -> int:
        s = self.s
        j = end
        while j < len(s) and s[j] == " ":
            j += 1
        if j < len(s) and s[j] in "([":
            self.add(_LP, s[j], i, j + 1, latex=True)
            return j + 1
        if j < len(s) and s[j] in ")]":
            self.add(_RP, s[j], i, j + 1, latex=True)
            return j + 1
        if j < len(s) and s[j] == ".":
            self.space = True
            return j + 1
        # \left| (absolute value), \left\{ (a set), ...: not arithmetic we check.
        self.stop("\\" + name, i, end)
        return end


def _brace_group_end(s: str, i: int) -> int | None:
    """End (exclusive) of the ``{...}`` group starting at ``i`` (after spaces), or None."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s) or s[i] != "{":
        return None
    depth = 0
    for j in range(i, min(len(s), i + 400)):
        if s[j] == "{" and s[j - 1] != "\\":
            depth += 1
        elif s[j] == "}" and s[j - 1] != "\\":
            depth -= 1
            if depth == 0:
                return j + 1
    return None


def _tokenize(
    text: str, masks: list[tuple[int, int]] | None = None, math_mode: bool = False
) -> list[_Tok]:
    return _Tokenizer(text, masks, math_mode).run()


# --------------------------------------------------------------------------- words
def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Words that cannot be a unit: after a number they end the expression instead of being skipped.
_NON_UNITS = _words(
    """and or but so then thus hence therefore is are was were be been being am equals equal
    equaling gives give makes make get gets got to the a an of in on at by for from with as
    if than that this these those which who whom whose what when where why how it its he she they
    we you i his her their our my your him them us me times plus minus divided multiplied
    over per more less fewer twice half double triple thrice quadruple squared cubed hundred
    thousand million billion trillion dozen dozens k b mod modulo left remaining not no yes
    because since now also only all total into out up down after before until while there
    here will would can could should must may might has have had do does did let lets each
    every both either neither about approximately approx roughly around nearly almost
    exactly just means"""
)
# A word right before an expression that could make it part of a larger one ("half of 18 + 2").
_DANGER_BEFORE = _words(
    """than times twice half double triple thrice quadruple plus minus by over into per divided
    multiplied squared cubed"""
)
_FRACTION_WORDS = _words(
    """half halves third thirds quarter quarters fourth fourths fifth fifths sixth sixths
    seventh sevenths eighth eighths ninth ninths tenth tenths twice double triple percent
    fraction part parts portion"""
)
# A word right after a stated result that would change its value ("= 2 million", "= 5 squared").
_DANGER_AFTER = _words(
    """times squared cubed plus minus divided multiplied over hundred thousand million billion
    trillion dozen dozens k mod modulo percent"""
)
_LETTER_UNITS = frozenset("smghlL")  # single letters that are units after a number
_APPROX_WORDS = _words("about approximately approx roughly around nearly almost ~")


# --------------------------------------------------------------------------- AST
class _Node:
    __slots__ = ("a", "b", "first", "kind", "last", "name", "op", "tok")

    def __init__(self, kind, first, last, op="", a=None, b=None, tok=None, name=""):
        self.kind = kind  # num var bin neg pow func fact group
        self.op = op
        self.a = a
        self.b = b
        self.tok = tok
        self.first = first  # token index of the first / last token of the core (no units)
        self.last = last
        self.name = name


class _NoParse(Exception):
    pass


class _TooLarge(Exception):
    pass


class _Parser:
    """Recursive descent over tokens; ``parse(i)`` returns the longest expression starting at i."""

    def __init__(self, toks: list[_Tok], limit: int, word_vars: bool = False):
        self.t = toks
        self.limit = limit
        self.depth = 0
        self.word_vars = word_vars

    def peek(self, i: int) -> _Tok | None:
        return self.t[i] if i < self.limit else None

    def parse(self, i: int) -> tuple[_Node, int]:
        return self.expr(i)

    def starts_operand(self, i: int) -> bool:
        tok = self.peek(i)
        return tok is not None and tok.kind in (_NUM, _LP, _FRAC, _FUNC)

    def expr(self, i: int) -> tuple[_Node, int]:
        node, i = self.term(i)
        while True:
            tok = self.peek(i)
            if tok is None:
                break
            if tok.kind == _OP and tok.text in "+-":
                op = tok.text
            elif tok.kind == _WORD and tok.low in ("plus", "minus") and self.starts_operand(i + 1):
                op = "+" if tok.low == "plus" else "-"
            else:
                break
            try:
                rhs, j = self.term(i + 1)
            except _NoParse:
                break
            node, i = _Node("bin", node.first, rhs.last, op, node, rhs), j
        return node, i

    def term(self, i: int) -> tuple[_Node, int]:
        node, i = self.unary(i)
        while True:
            tok = self.peek(i)
            if tok is None:
                break
            op, j = "", i + 1
            if tok.kind == _OP and tok.text in "*/":
                op = tok.text
            elif tok.kind == _LETTER and tok.text in "xX" and self.starts_operand(i + 1):
                op = "*"  # "3 x 4"
            elif tok.kind == _WORD and tok.low == "times" and self.starts_operand(i + 1):
                op = "*"
            elif tok.kind == _WORD and tok.low in ("divided", "multiplied"):
                after = self.peek(i + 1)
                if after is None or after.low != "by":
                    break
                op, j = ("/" if tok.low == "divided" else "*"), i + 2
            elif _is_of(tok) and _of_means_times(node) and self.starts_operand(i + 1):
                op = "*"  # "20% of 50", "3/4 of 20"
            elif self.implicit(node, tok):
                op, j = "*", i
            else:
                break
            try:
                rhs, k = self.unary(j)
            except _NoParse:
                break
            node, i = _Node("bin", node.first, rhs.last, op, node, rhs), k
        return node, i

    def implicit(self, node: _Node, tok: _Tok) -> bool:
        """Juxtaposition as multiplication: ``2(3+4)``, ``(2)(3)``, ``2x``, ``5\\sqrt{2}``."""
        if tok.kind == _LP:
            return tok.math or not tok.space
        if tok.kind == _VAR:
            return True
        if tok.kind == _LETTER:
            return not tok.space
        if tok.kind == _FUNC:
            return tok.math and node.kind != "func"
        return False

    def unary(self, i: int) -> tuple[_Node, int]:
        tok = self.peek(i)
        if tok is not None and tok.kind == _OP and tok.text in "+-":
            self.enter()
            try:
                inner, j = self.unary(i + 1)
            finally:
                self.depth -= 1
            if tok.text == "+":
                return inner, j
            return _Node("neg", i, inner.last, a=inner), j
        return self.power(i)

    def power(self, i: int) -> tuple[_Node, int]:
        base, i = self.postfix(i)
        tok = self.peek(i)
        if tok is not None and tok.kind == _OP and tok.text == "^":
            self.enter()
            try:
                exponent, j = self.unary(i + 1)
            except _NoParse:
                return base, i
            finally:
                self.depth -= 1
            return _Node("pow", base.first, exponent.last, "^", base, exponent), j
        return base, i

    def postfix(self, i: int) -> tuple[_Node, int]:
        node, i = self.primary(i)
        while (tok := self.peek(i)) is not None and tok.kind == _FACT and not tok.space:
            node, i = _Node("fact", node.first, i, a=node), i + 1
        if node.kind in ("num", "group", "func", "fact"):
            i = self.units(i)
        return node, i

    def primary(self, i: int) -> tuple[_Node, int]:
        tok = self.peek(i)
        if tok is None:
            raise _NoParse
        if tok.kind == _NUM:
            return _Node("num", i, i, tok=tok), i + 1
        if tok.kind == _LP:
            inner, close = self.group(i)
            return _Node("group", i, close, a=inner), close + 1
        if tok.kind == _FRAC:
            numerator, close = self.group(i + 1, braces=True)
            denominator, close2 = self.group(close + 1, braces=True)
            quotient = _Node("bin", i, close2, "/", _Node("group", i + 1, close, a=numerator),
                             _Node("group", close + 1, close2, a=denominator))
            return _Node("group", i, close2, a=quotient), close2 + 1
        if tok.kind == _FUNC:
            inner, close = self.group(i + 1)
            return _Node("func", i, close, a=inner, name=tok.text), close + 1
        if tok.kind == _VAR or tok.kind == _LETTER or (tok.kind == _WORD and self.word_vars):
            return _Node("var", i, i, name=tok.text), i + 1
        raise _NoParse

    def group(self, i: int, braces: bool = False) -> tuple[_Node, int]:
        tok = self.peek(i)
        if tok is None or tok.kind != _LP or (braces and tok.text != "{"):
            raise _NoParse
        self.enter()
        try:
            inner, j = self.expr(i + 1)
        finally:
            self.depth -= 1
        close = self.peek(j)
        if close is None or close.kind != _RP or close.text != _CLOSING[tok.text]:
            raise _NoParse
        return inner, j

    def enter(self) -> None:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise _TooLarge

    def units(self, i: int) -> int:
        """Skip a unit after a number: ``3 days``, ``$2/meter``, ``5 sets per load``,
        ``\\text{ cm}``, ``90^\\circ``, ``ft^2``, a label ``(Carmen)``."""
        start = i
        for _ in range(8):
            tok = self.peek(i)
            if tok is None:
                break
            if i > start and tok.kind == _OP and tok.text == "^":
                power = self.peek(i + 1)
                if power is not None and power.kind == _NUM:  # a squared unit: "ft^2"
                    i += 2
                    continue
                break
            if tok.kind == _TEXT:
                if _is_of(tok) or tok.value in _NON_UNITS:
                    break
                i += 1
            elif tok.kind == _DEG:
                i += 1
            elif tok.kind == _WORD:
                if tok.low == "per" and self.unit_word(i + 1):
                    i += 2
                elif tok.low in _NON_UNITS:
                    break
                else:
                    i += 1
            elif tok.kind == _LETTER and tok.space and tok.text in _LETTER_UNITS:
                i += 1  # "3600 s", "5 m"; but "2 x + 1" has a variable, "$2 k" is 2,000
            elif tok.kind == _OP and tok.text == "/" and self.unit_word(i + 1):
                i += 2
            elif tok.kind == _LP and tok.text == "(" and not tok.math:
                close = self.label_end(i)
                if close is None:
                    break
                i = close + 1
            else:
                break
        return i

    def unit_word(self, i: int) -> bool:
        tok = self.peek(i)
        if tok is None:
            return False
        if tok.kind == _WORD:
            return tok.low not in _NON_UNITS
        return tok.kind == _LETTER or (tok.kind == _TEXT and tok.value not in _NON_UNITS)

    def label_end(self, i: int) -> int | None:
        """Index of the ``)`` closing a parenthesised label made of words only."""
        words = 0
        for j in range(i + 1, min(self.limit, i + 14)):
            tok = self.t[j]
            if tok.kind == _RP:
                return j if tok.text == ")" and words else None
            if tok.kind in (_WORD, _LETTER, _TEXT):
                words += 1
            elif not (tok.kind == _STOP and tok.text in ",'’-&"):
                return None
        return None


def _is_of(tok: _Tok | None) -> bool:
    return tok is not None and (
        (tok.kind == _WORD and tok.low == "of") or (tok.kind == _TEXT and tok.value == "of")
    )


def _is_percent(node: _Node) -> bool:
    node = _strip(node)
    return node.kind == "num" and node.tok.pct


def _of_means_times(node: _Node) -> bool:
    """"of" after a percentage or a fraction of two numbers multiplies: "20% of", "3/4 of"."""
    last = node
    while last.kind in ("bin", "pow"):
        last = last.b
    if last.kind == "num" and last.tok.pct:
        return True
    node = _strip(node)
    return (node.kind == "bin" and node.op == "/" and _strip(node.a).kind == "num"
            and _strip(node.b).kind == "num")


# --------------------------------------------------------------------------- printing
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def _prec(node: _Node) -> int:
    if node.kind == "bin":
        return _PRECEDENCE[node.op]
    if node.kind == "neg":
        return 3
    if node.kind == "pow":
        return 4
    return 5


def _show(node: _Node) -> str:
    """The sympy/Python spelling of a parsed side (a percentage keeps its ``%``)."""
    kind = node.kind
    if kind == "num":
        value = node.tok.value
        value = "0" + value if value.startswith(".") else value
        return value + ("%" if node.tok.pct else "")
    if kind == "var":
        return node.name.lstrip("\\")
    if kind == "group":
        return _show(node.a)
    if kind == "func":
        return f"{node.name}({_show(node.a)})"
    if kind == "fact":
        return f"factorial({_show(node.a)})"
    if kind == "neg":
        inner = _show(node.a)
        return f"-({inner})" if _prec(_strip(node.a)) < 3 else f"-{inner}"
    left, right = _strip(node.a), _strip(node.b)
    if kind == "pow":
        base = _show(left) if _prec(left) > 4 else f"({_show(left)})"
        exponent = _show(right) if _prec(right) >= 4 else f"({_show(right)})"
        return f"{base}**{exponent}"
    mine = _PRECEDENCE[node.op]
    a = _show(left) if _prec(left) >= mine else f"({_show(left)})"
    tight = _prec(right) > mine or (_prec(right) == mine and node.op in "+*")
    tight = tight and right.kind != "neg"  # 4*(-1), not 4*-1
    b = _show(right) if tight else f"({_show(right)})"
    return f"{a}{node.op}{b}"


def _strip(node: _Node) -> _Node:
    while node.kind == "group":
        node = node.a
    return node


def _variables(node: _Node) -> list[str]:
    if node.kind == "var":
        return [node.name]
    found = []
    for child in (node.a, node.b):
        if child is not None:
            found.extend(_variables(child))
    return found


def _has_operation(node: _Node) -> bool:
    node = _strip(node)
    if node.kind in ("bin", "pow", "func", "fact"):
        return True
    return node.kind == "neg" and _has_operation(node.a)


def _has_number(node: _Node) -> bool:
    if node.kind == "num":
        return True
    return any(child is not None and _has_number(child) for child in (node.a, node.b))


def _has_percent(node: _Node) -> bool:
    if node.kind == "num":
        return node.tok.pct
    return any(child is not None and _has_percent(child) for child in (node.a, node.b))


# --------------------------------------------------------------------------- evaluation
class _Uncheckable(Exception):
    pass


def _check_size(value: sympy.Expr) -> sympy.Expr:
    if value.is_Rational:
        if abs(int(value.p)).bit_length() > _MAX_BITS or int(value.q).bit_length() > _MAX_BITS:
            raise _TooLarge
    elif sympy.count_ops(value) > 60:
        raise _TooLarge
    return value


_ONE = sympy.Integer(1)
_HUNDREDTH = sympy.Rational(1, 100)
_MAX_LITERAL_DIGITS = 1_000


def _evaluate(node: _Node, percent: sympy.Rational, relative: bool = False) -> sympy.Expr:
    """The exact value of ``node``. A percentage is worth ``percent`` times its number, and with
    ``relative`` a percentage added to or taken from a number is a share of it ("80 - 25%")."""
    kind = node.kind
    shifted = kind == "bin" and node.op in "+-" and _is_percent(node.b)
    if relative and shifted and not _is_percent(node.a):
        base = _evaluate(node.a, percent, relative)
        share = sympy.Rational(_strip(node.b).tok.value) / 100
        return _check_size(base * (1 + share if node.op == "+" else 1 - share))
    if kind == "num":
        if len(node.tok.value) > _MAX_LITERAL_DIGITS:
            raise _TooLarge
        value = sympy.Rational(node.tok.value)
        return value * percent if node.tok.pct else value
    if kind == "group":
        return _evaluate(node.a, percent, relative)
    if kind == "var":
        raise _Uncheckable(f"contains a variable: {node.name}")
    if kind == "neg":
        return -_evaluate(node.a, percent, relative)
    if kind == "fact" or (kind == "func" and node.name == "factorial"):
        value = _evaluate(node.a, percent)
        if not (value.is_Integer and value >= 0):
            raise _Uncheckable(f"factorial of {value}")
        if value > _MAX_FACTORIAL:
            raise _TooLarge
        return sympy.factorial(int(value))
    if kind == "func":
        value = _evaluate(node.a, percent)
        if not value.is_Rational or value < 0:
            raise _Uncheckable(f"square root of {value}")
        if max(abs(int(value.p)), int(value.q)).bit_length() > 200:
            raise _TooLarge
        return sympy.sqrt(value)
    a = _evaluate(node.a, percent, relative)
    b = _evaluate(node.b, percent, relative)
    if kind == "pow":
        return _check_size(_power(a, b))
    if node.op == "+":
        return _check_size(a + b)
    if node.op == "-":
        return _check_size(a - b)
    if node.op == "*":
        return _check_size(a * b)
    if b == 0:
        raise _Uncheckable("division by zero")
    return _check_size(a / b)


def _power(base: sympy.Expr, exponent: sympy.Expr) -> sympy.Expr:
    if not exponent.is_Rational:
        raise _Uncheckable(f"exponent {exponent} is not a rational number")
    if base == 0 and exponent < 0:
        raise _Uncheckable("division by zero")
    if base in (0, 1):
        return base
    if base == -1 and exponent.is_Integer:
        return base**exponent
    if not base.is_Rational:
        if exponent.is_Integer and abs(exponent) <= 64:
            return base**exponent
        raise _TooLarge
    if abs(exponent.p) > 100_000:
        raise _TooLarge
    size = max(abs(int(base.p)), int(base.q)).bit_length()
    if size * abs(int(exponent.p)) / int(exponent.q) > _MAX_BITS:
        raise _TooLarge
    if exponent.is_Integer:
        return base**exponent
    if exponent.q > 12 or size > 200 or base < 0:
        raise _Uncheckable(f"root of {base}")
    return base**exponent


def _value(node: _Node) -> list[sympy.Expr]:
    """The value(s) of a side: percentages read as p/100, as bare p, and ``a - p%`` as
    ``a * (1 - p/100)``."""
    if not _has_percent(node):
        return [_evaluate(node, _ONE)]
    values = [_evaluate(node, _HUNDREDTH), _evaluate(node, _ONE)]
    relative = _evaluate(node, _HUNDREDTH, relative=True)
    return values if relative in values else [*values, relative]


def _show_value(value: sympy.Expr, decimal: bool = True) -> str:
    text = _exact_text(value, decimal)
    if len(text) > 40:
        return str(sympy.N(value, 7)) if value.is_real else text[:40] + "..."
    return text


def _exact_text(value: sympy.Expr, decimal: bool) -> str:
    if value.is_Rational and decimal:
        q = int(value.q)
        while q % 2 == 0:
            q //= 2
        while q % 5 == 0:
            q //= 5
        if q == 1 and value.q != 1:  # a terminating decimal: show it as one
            digits = len(str(int(value.q))) + 2
            text = f"{sympy.Float(value, digits + len(str(abs(int(value.p))))):f}"
            return text.rstrip("0").rstrip(".") if "." in text else text
        return str(value)
    return str(value)


def _approximate(value: sympy.Expr) -> str:
    if value.is_Integer and abs(value) < 10**15:
        return str(value)
    number = sympy.N(value, 20)
    if abs(number) < 1e15:
        return f"{float(number):.6g}"
    return str(sympy.N(value, 7))


def _close(
    computed: sympy.Expr, stated: sympy.Expr, decimals: int | None, approx: bool,
    scale: sympy.Rational = _ONE,
) -> tuple[bool, str]:
    """(equal, how): ``how`` names the tolerance that made a match. ``scale`` is the value of one
    unit of the stated number (1/100 when "1.05%" is read as 0.0105)."""
    if computed.is_Rational and stated.is_Rational:
        if computed == stated:
            return True, "exact"
        gap = abs(computed - stated)
    else:
        difference = sympy.N(computed - stated, 40)
        if not difference.is_real:
            return False, ""
        gap = abs(difference)
        if gap <= sympy.Float("1e-25") * max(1, abs(sympy.N(computed, 40))):
            return True, "exact"
    unit = scale / 10**decimals if decimals else scale
    if decimals:
        # rounding (to nearest, either way at a tie) or truncation toward zero
        toward_zero = abs(stated) <= abs(sympy.N(computed, 40)) and (stated >= 0) == (computed >= 0)
        if gap <= unit / 2 or (toward_zero and gap < unit):
            return True, f"rounded to {decimals} decimal{'s' * (decimals > 1)}"
    if approx and gap <= max(unit, abs(sympy.N(computed, 20)) / 100):
        return True, "approximately"
    return False, ""


# --------------------------------------------------------------------------- checking
def check_claim(claim: Claim) -> ClaimCheck:
    """Recompute ``claim.expression`` and compare it with ``claim.stated``. Never raises."""
    try:
        return _check(claim)
    except _TooLarge:
        return ClaimCheck(claim, "uncheckable", None, "too large")
    except RecursionError:
        return ClaimCheck(claim, "uncheckable", None, "too large")
    except Exception as error:  # noqa: BLE001 - a checker must not take the stage down
        return ClaimCheck(claim, "uncheckable", None, f"internal error: {type(error).__name__}")


def _parse_side(text: str, math_mode: bool, what: str) -> _Node:
    toks = _tokenize(text, math_mode=math_mode)
    toks = [tok for tok in toks if tok.kind != _STOP or tok.text not in ("\\(", "\\)", "\\[",
                                                                         "\\]", "$$")]
    if not toks:
        raise _Uncheckable(f"empty {what}")
    if len(toks) > _MAX_TOKENS:
        raise _TooLarge
    parser = _Parser(toks, len(toks), word_vars=True)
    try:
        node, end = parser.parse(0)
    except _NoParse:
        raise _Uncheckable(f"cannot parse {what}: {text.strip()!r}") from None
    if end != len(toks):
        raise _Uncheckable(f"cannot parse {what}: {text.strip()!r}")
    return node


def _check(claim: Claim) -> ClaimCheck:
    def unsure(detail: str, computed: str | None = None) -> ClaimCheck:
        return ClaimCheck(claim, "uncheckable", computed, detail)

    if claim.kind == "annotation" and not claim.expression.strip() and not claim.stated.strip():
        return unsure("empty annotation")
    if claim.kind == "annotation" and "=" not in claim.text:
        return unsure("annotation has no '='")
    math_mode = claim.kind == "latex"
    try:
        left = _parse_side(claim.expression, math_mode, "expression")
        right = _parse_side(claim.stated, math_mode, "stated side")
    except _Uncheckable as why:
        return unsure(str(why))
    names = _variables(left) + _variables(right)
    if names:
        listed = ", ".join(dict.fromkeys(name.lstrip("\\") for name in names))
        return unsure(f"contains a variable: {listed}")
    try:
        computed_values = _value(left)
        stated_values = _stated_values(right)  # (value, scale of one unit)
    except _Uncheckable as why:
        return unsure(str(why))
    computed = computed_values[0]
    # "4.95" for money, "3/4" for fractions: the value in the style of the claim
    decimal = any(mark in claim.expression + claim.stated for mark in ".%")
    shown = _show_value(computed, decimal)
    decimals = _decimals(right)
    for value in computed_values:
        for target, scale in stated_values:
            equal, how = _close(value, target, decimals, claim.approx, scale)
            if equal:
                return ClaimCheck(claim, "true", _show_value(value, decimal),
                                  _true_detail(claim, _show_value(value, decimal), value, how))
    # Mismatches that a careful reader would not call an arithmetic error.
    rounded = _rounded_inputs(left, stated_values[0][0], decimals)
    if rounded:
        return unsure(f"{claim.expression} is {shown} (≈ {_approximate(computed)}); "
                      f"{claim.stated.strip()} is within the rounding of {rounded}", shown)
    if _whole_part(computed, right):
        return unsure(f"{claim.expression} is {shown} (≈ {_approximate(computed)}); "
                      f"{claim.stated.strip()} may be its whole part", shown)
    change = _unit_change(claim, computed, stated_values[0][0])
    if change:
        return unsure(f"{claim.expression} is {shown}, stated {claim.stated.strip()}: {change}",
                      shown)
    # A calculator annotation is read with precedence, as its calculator did.
    if claim.kind != "annotation" and _left_to_right(left, stated_values[0][0], decimals):
        return unsure(f"{claim.expression} is {shown}, but {claim.stated.strip()} is what it gives "
                      f"worked left to right, ignoring precedence", shown)
    if _running_total(right, computed_values):
        return unsure(f"running total: {claim.expression} is {shown}, which the right side "
                      f"{claim.stated!r} continues", shown)
    stated_text = claim.stated.strip()
    extra = "" if shown == _approximate(computed) else f" (≈ {_approximate(computed)})"
    return ClaimCheck(claim, "false", shown,
                      f"{claim.expression} is {shown}{extra}, not {stated_text}")


_UNIT_NAMES = {
    "$": "dollar", "dollar": "dollar", "dollars": "dollar", "usd": "dollar", "cent": "cent",
    "cents": "cent", "¢": "cent", "second": "second", "seconds": "second", "sec": "second",
    "secs": "second", "s": "second", "minute": "minute", "minutes": "minute", "min": "minute",
    "mins": "minute", "hour": "hour", "hours": "hour", "hr": "hour", "hrs": "hour", "h": "hour",
    "day": "day", "days": "day", "week": "week", "weeks": "week", "month": "month",
    "months": "month", "year": "year", "years": "year", "inch": "inch", "inches": "inch",
    "foot": "foot", "feet": "foot", "ft": "foot", "yard": "yard", "yards": "yard", "yd": "yard",
    "mile": "mile", "miles": "mile", "mm": "mm", "cm": "cm", "m": "meter", "meter": "meter",
    "meters": "meter", "metre": "meter", "metres": "meter", "km": "km", "kilometer": "km",
    "kilometers": "km", "ounce": "ounce", "ounces": "ounce", "oz": "ounce", "pound": "pound",
    "pounds": "pound", "lb": "pound", "lbs": "pound", "gram": "gram", "grams": "gram",
    "g": "gram", "kg": "kg", "kilogram": "kg", "kilograms": "kg", "ml": "ml", "liter": "liter",
    "liters": "liter", "litre": "liter", "litres": "liter", "l": "liter", "cup": "cup",
    "cups": "cup", "gallon": "gallon", "gallons": "gallon", "quart": "quart", "quarts": "quart",
    "pint": "pint", "pints": "pint", "dozen": "dozen", "dozens": "dozen", "kb": "kb", "mb": "mb",
    "gb": "gb", "tb": "tb",
}
_CONVERSION_FACTORS = frozenset(
    [sympy.Integer(10) ** k for k in range(1, 7)]
    + [sympy.Integer(n) for n in (3, 4, 7, 12, 16, 24, 36, 52, 60, 365, 1440, 3600, 86400)]
)


def _units_in(text: str, math_mode: bool) -> set[str]:
    found = set()
    for tok in _tokenize(text, math_mode=math_mode):
        if tok.kind == _NUM and tok.text.lstrip("\\").startswith("$"):
            found.add("dollar")
        words = tok.value.split() if tok.kind == _TEXT else [tok.low]
        if tok.kind in (_WORD, _LETTER, _TEXT, _VAR):
            for word in words:
                for part in word.split("/"):
                    if part in _UNIT_NAMES:
                        found.add(_UNIT_NAMES[part])
    return found


def _unit_change(claim: Claim, computed: sympy.Expr, stated: sympy.Expr) -> str:
    """Why a mismatch may be a unit conversion ("25 cents * 4 = $1"), or ""."""
    if not (computed.is_Rational and stated.is_Rational) or computed == 0 or stated == 0:
        return ""
    ratio = computed / stated
    if ratio not in _CONVERSION_FACTORS and 1 / ratio not in _CONVERSION_FACTORS:
        return ""
    text, stated_text = claim.text, claim.stated
    left = text[: len(text) - len(stated_text)] if text.endswith(stated_text) else text
    math_mode = claim.kind == "latex"
    left_units, right_units = _units_in(left, math_mode), _units_in(stated_text, math_mode)
    if left_units and right_units and not right_units & left_units:
        return f"the unit changes ({', '.join(sorted(left_units))} to " \
               f"{', '.join(sorted(right_units))})"
    return ""


def _looks_rounded(tok: _Tok) -> bool:
    """A decimal that is a rounded fraction with a small denominator (3.33, 0.67, 26.67, 0.14),
    unlike a price that is exact as written (4.95, 0.75)."""
    if tok.dec < 2:  # one decimal is too coarse to tell: 0.8 is within 0.05 of 5/6
        return False
    value = sympy.Rational(tok.value)
    half = sympy.Rational(1, 2 * 10**tok.dec)
    for q in (3, 6, 9, 12):  # thirds, sixths, ninths, twelfths: 3.33, 0.17, 0.11, 0.08
        fraction = sympy.Rational(sympy.floor(value * q + sympy.Rational(1, 2)), q)
        if fraction.q not in (1, 2, 4, 5) and abs(fraction - value) <= half:
            return True
    return False


def _interval(node: _Node, inputs: list[str]) -> tuple[sympy.Rational, sympy.Rational] | None:
    """Bounds of ``node`` when each rounded-looking decimal may be off by half its last digit."""
    kind = node.kind
    if kind == "num":
        value = sympy.Rational(node.tok.value) / (100 if node.tok.pct else 1)
        if _looks_rounded(node.tok):
            inputs.append(node.tok.value)
            half = sympy.Rational(1, 2 * 10**node.tok.dec) / (100 if node.tok.pct else 1)
            return value - half, value + half
        return value, value
    if kind == "group":
        return _interval(node.a, inputs)
    if kind == "neg":
        inner = _interval(node.a, inputs)
        return None if inner is None else (-inner[1], -inner[0])
    if kind != "bin":
        value = _evaluate(node, _HUNDREDTH)
        return (value, value) if value.is_Rational else None
    a, b = _interval(node.a, inputs), _interval(node.b, inputs)
    if a is None or b is None:
        return None
    if node.op == "+":
        return a[0] + b[0], a[1] + b[1]
    if node.op == "-":
        return a[0] - b[1], a[1] - b[0]
    if node.op == "/":
        if b[0] <= 0 <= b[1]:
            return None
        b = (1 / b[1], 1 / b[0])
    corners = [x * y for x in a for y in b]
    return min(corners), max(corners)


def _rounded_inputs(left: _Node, stated: sympy.Expr, decimals: int | None) -> str:
    """The rounded-looking inputs that explain a small mismatch ("3 * 3.33 = 10"), or ""."""
    inputs: list[str] = []
    bounds = _interval(left, inputs)
    if not inputs or bounds is None or not stated.is_Rational:
        return ""
    slack = sympy.Rational(1, 10**decimals) if decimals else 0
    if bounds[0] - slack <= stated <= bounds[1] + slack:
        return ", ".join(dict.fromkeys(inputs))
    return ""


def _whole_part(computed: sympy.Expr, stated: _Node) -> bool:
    """A whole number next to a fractional result (40/3 = 13 boxes, 40/3 = 14 buses) is often
    deliberate rounding to whole items rather than an arithmetic slip."""
    core = _strip(stated)
    if core.kind != "num" or core.tok.dec or core.tok.pct or not computed.is_Rational:
        return False
    if computed.is_Integer:
        return False
    whole = sympy.Rational(core.tok.value)
    return whole in (sympy.floor(computed), sympy.ceiling(computed))


def _stated_values(node: _Node) -> list[tuple[sympy.Expr, sympy.Rational]]:
    core = _strip(node)
    if core.kind == "num" and core.tok.pct:  # "20%" stands for 0.2 or for 20
        value = sympy.Rational(core.tok.value)
        return [(value / 100, _HUNDREDTH), (value, _ONE)]
    return [(_value(node)[0], _ONE)]


def _decimals(node: _Node) -> int | None:
    core = _strip(node)
    if core.kind == "neg":
        core = _strip(core.a)
    if core.kind == "num":
        return core.tok.dec
    return None


def _left_to_right(left: _Node, stated: sympy.Expr, decimals: int | None) -> bool:
    """True when ``left`` read strictly left to right gives ``stated`` ("3 + 4 x 2 = 14" for
    "add 3 and 4, then double"): sloppy notation of a right computation."""

    def flatten(node: _Node) -> list:
        if node.kind != "bin":
            return [node]
        return [*flatten(node.a), node.op, *flatten(node.b)]

    items = flatten(left)
    ops = items[1::2]
    if not ({"+", "-"} & set(ops) and {"*", "/"} & set(ops)):
        return False  # without mixed precedence both readings agree
    value = _evaluate(items[0], _HUNDREDTH)
    for op, operand in zip(ops, items[2::2], strict=True):
        other = _evaluate(operand, _HUNDREDTH)
        if op == "+":
            value = value + other
        elif op == "-":
            value = value - other
        elif op == "*":
            value = value * other
        elif other == 0:
            return False
        else:
            value = value / other
        _check_size(value)
    return _close(value, stated, decimals, False)[0]


def _running_total(stated: _Node, computed_values: list[sympy.Expr]) -> bool:
    """True when the stated side is ``v op ...`` with v the computed value (``2*3 = 6 + 1``)."""
    node = _strip(stated)
    if node.kind not in ("bin", "pow"):
        return False
    leaf = node
    while leaf.kind in ("bin", "pow"):
        leaf = _strip(leaf.a)
    if leaf.kind != "num":
        return False
    first = sympy.Rational(leaf.tok.value)
    candidates = [(first, _ONE), (first / 100, _HUNDREDTH)] if leaf.tok.pct else [(first, _ONE)]
    return any(
        _close(value, candidate, leaf.tok.dec, False, scale)[0]
        for value in computed_values
        for candidate, scale in candidates
    )


def _true_detail(claim: Claim, shown: str, value: sympy.Expr, how: str) -> str:
    if how == "exact":
        return f"{claim.expression} = {shown}"
    return f"{claim.expression} = {shown} (≈ {_approximate(value)}), {claim.stated.strip()} " \
           f"{'is ' + how if how.startswith('rounded') else 'approximately'}"


# --------------------------------------------------------------------------- extraction
_ANNOTATION_RE = re.compile(r"<<([^<>]{0,400}?)>>")


def extract_claims(step: str) -> list[Claim]:
    """Every checkable-looking arithmetic claim in ``step``, in order of position. Never raises."""
    try:
        return _extract(step, time.monotonic() + _STEP_BUDGET_SECONDS)
    except Exception:  # noqa: BLE001 - extraction is best effort: nothing found is a valid answer
        return []


def check_step(step: str) -> list[ClaimCheck]:
    """``check_claim`` of every claim ``extract_claims`` finds. Never raises, never hangs."""
    try:
        claims = extract_claims(step)
        return [check_claim(claim) for claim in claims]
    except Exception:  # noqa: BLE001 - see check_claim
        return []


def flagged(checks: list[ClaimCheck]) -> list[ClaimCheck]:
    """The checks that found an arithmetic error."""
    return [check for check in checks if check.status == "false"]


def _extract(step: str, deadline: float) -> list[Claim]:
    if not isinstance(step, str) or not step:
        return []
    step = step[:_MAX_STEP_CHARS]
    claims: list[Claim] = []
    masks = []
    for match in _ANNOTATION_RE.finditer(step):
        masks.append(match.span())
        claims.append(_annotation(step, match))
    toks = _tokenize(step, masks)
    dollar_math = _dollar_regions(step)
    for index, tok in enumerate(toks):
        if tok.kind != _EQ:
            continue
        if time.monotonic() > deadline or len(claims) >= _MAX_CLAIMS:
            break
        claim = _pair_at(step, toks, index, dollar_math)
        if claim is not None:
            claims.append(claim)
    claims.sort(key=lambda claim: claim.span)
    return claims


def _annotation(step: str, match: re.Match[str]) -> Claim:
    inner = match.group(1)
    left, _, right = inner.partition("=")
    expression = left.strip()
    toks = _tokenize(expression)
    if toks and len(toks) <= _MAX_TOKENS:
        try:
            node, end = _Parser(toks, len(toks)).parse(0)
            if end == len(toks):
                expression = _show(node)
        except (_NoParse, _TooLarge):
            pass
    return Claim("annotation", match.group(), expression, right.strip(), match.span())


def _dollar_regions(step: str) -> list[tuple[int, int]]:
    """Spans of ``$...$`` pairs that look like inline math rather than two prices."""
    regions = []
    for match in re.finditer(r"(?<![\\$])\$(?!\$)([^$\n]{1,300}?)(?<![\\$])\$(?![$\d])", step):
        content = match.group(1)
        if "\\" in content or "=" in content and not re.match(r"\s*\d[\d,.]*\s*$", content):
            regions.append(match.span())
    return regions


def _pair_at(
    step: str, toks: list[_Tok], eq: int, dollar_math: list[tuple[int, int]]
) -> Claim | None:
    """The claim ``left = right`` around the ``=`` token at ``eq``, or None."""
    left = _left_side(toks, eq)
    if left is None:
        return None
    start, node, too_large = left
    approx = toks[eq].value == "≈"
    first = eq + 1
    while first < len(toks) and (
        (toks[first].kind == _WORD and toks[first].low in _APPROX_WORDS)
        or (toks[first].kind == _STOP and toks[first].text == "~")
    ):
        approx = True
        first += 1
    right = _right_side(toks, first)
    if right is None:
        return None
    _, right_end, right_large = right
    if too_large or right_large:
        end_char = toks[min(right_end, len(toks)) - 1].end
        text = step[toks[start].start : end_char]
        expression = step[toks[start].start : toks[eq].start].strip()
        stated = step[toks[first].start : end_char].strip()
        return Claim(_kind(toks, start, right_end - 1, step, dollar_math), text, expression,
                     stated, (toks[start].start, end_char), approx)
    if not _has_operation(node) or not _has_number(node):
        return None
    last = right_end - 1  # the stated side keeps its units: "2 hours", "$40"
    span = (toks[start].start, toks[last].end)
    if step[span[0]] == "$" and any(a == span[0] for a, _ in dollar_math):
        span = (span[0] + 1, span[1])  # the "$" opens inline math, it is no price
    return Claim(
        kind=_kind(toks, start, last, step, dollar_math),
        text=step[span[0] : span[1]],
        expression=_show(node),
        stated=step[toks[first].start : toks[last].end],
        span=span,
        approx=approx,
    )


def _kind(
    toks: list[_Tok], first: int, last: int, step: str, dollar_math: list[tuple[int, int]]
) -> ClaimKind:
    if any(tok.math or tok.latex for tok in toks[first : last + 1]):
        return "latex"
    start, end = toks[first].start, toks[last].end
    if any(a <= start and end <= b for a, b in dollar_math):
        return "latex"
    return "equation"


_EXPRESSION_KINDS = frozenset(
    {_NUM, _OP, _LP, _RP, _VAR, _LETTER, _FUNC, _FRAC, _FACT, _DEG, _TEXT, _WORD}
)


def _left_side(toks: list[_Tok], eq: int) -> tuple[int, _Node | None, bool] | None:
    """(start, node, too_large) for the longest expression ending right before ``toks[eq]``."""
    # Walk back over tokens that can belong to an expression; commas only inside parentheses
    # (labels such as "(Mondays, Wednesdays)").
    depth, floor = 0, eq
    while floor > 0:
        tok = toks[floor - 1]
        if tok.kind == _RP:
            depth += 1
        elif tok.kind == _LP:
            depth -= 1
        elif tok.kind not in _EXPRESSION_KINDS and not (depth > 0 and tok.kind == _STOP):
            break
        if eq - floor >= 4 * _MAX_TOKENS:
            break
        floor -= 1
    if eq - floor > _MAX_TOKENS:
        if all(tok.kind in (_NUM, _OP, _LP, _RP, _FRAC, _FUNC, _FACT) for tok in toks[floor:eq]):
            return floor, None, True  # a huge expression: a claim, refused as too large
        floor = eq - _MAX_TOKENS
    for start in range(floor, eq):
        tok = toks[start]
        if tok.kind not in (_NUM, _LP, _FRAC, _FUNC, _VAR, _LETTER, _OP):
            continue
        if tok.kind == _OP and not (tok.text == "-" and toks[start + 1].start == tok.end):
            continue
        parser = _Parser(toks, eq)
        try:
            node, end = parser.parse(start)
        except _NoParse:
            continue
        except _TooLarge:
            return start, None, True
        if end != eq:
            continue
        return (start, node, False) if _clean_before(toks, start) else None
    return None


_DELIMITERS = frozenset({"\\(", "\\)", "\\[", "\\]", "$$", "$", "\n", "<<>>"})


# Tokens that would continue an expression across its edge ("2 1/2", "x + 3", "12_4").
_JOINING_KINDS = frozenset(
    {_NUM, _OP, _RP, _VAR, _LETTER, _FUNC, _FRAC, _FACT, _DEG, _SUB, _ELLIPSIS, _MOD}
)


def _clean_before(toks: list[_Tok], start: int) -> bool:
    """False when the token before the left side could make it part of a larger expression."""
    if start == 0:
        return True
    before = toks[start - 1]
    if before.kind in _JOINING_KINDS:
        return False
    if before.kind == _STOP:
        # "10:30", "0.\overline{3}", "a@b": punctuation glued to both neighbours joins them;
        # "Total:3+4" is a label.
        if before.text in _DELIMITERS or toks[start].space or before.space:
            return True
        return before.text == ":" and start >= 2 and toks[start - 2].kind in (_WORD, _LETTER)
    if before.kind == _WORD or before.kind == _TEXT:
        word = before.low if before.kind == _WORD else (before.value.split() or [""])[-1]
        if word in _DANGER_BEFORE:
            return False
        if word == "of" and start >= 2:
            previous = toks[start - 2]
            previous_word = previous.low if previous.kind == _WORD else ""
            if previous.kind == _NUM or previous_word in _FRACTION_WORDS:
                return False
    return True


def _right_side(toks: list[_Tok], first: int) -> tuple[_Node | None, int, bool] | None:
    """(node, end, too_large) for the expression starting at ``toks[first]``, or None."""
    if first >= len(toks):
        return None
    tok = toks[first]
    if tok.kind not in (_NUM, _LP, _FRAC, _FUNC, _VAR, _LETTER, _OP):
        return None
    if tok.kind == _OP and tok.text not in "-+":
        return None
    limit = len(toks)
    parser = _Parser(toks, limit)
    try:
        node, end = parser.parse(first)
    except _NoParse:
        return None
    except _TooLarge:
        return None, min(limit, first + _MAX_TOKENS), True
    if end - first > _MAX_TOKENS:
        return None, end, True
    if not _clean_after(toks, end, node):
        return None
    return node, end, False


def _clean_after(toks: list[_Tok], end: int, node: _Node) -> bool:
    """False when what follows the right side could change its value."""
    if end >= len(toks):
        return True
    after = toks[end]
    if after.kind in (_NUM, _OP, _VAR, _LETTER, _FUNC, _FRAC, _SUB, _MOD, _ELLIPSIS, _FACT):
        return False
    if after.kind == _LP:
        # "= 12 (since ...)" is a remark; "= 2 (3 + 4)" might be a product.
        inside = toks[end + 1] if end + 1 < len(toks) else None
        return not after.math and inside is not None and inside.kind in (_WORD, _TEXT)
    if after.kind == _STOP:
        following = toks[end + 1] if end + 1 < len(toks) else None
        glued = not after.space and following is not None and not following.space
        return after.text in _DELIMITERS or not glued or following.kind == _STOP
    if after.kind in (_WORD, _TEXT):
        word = after.low if after.kind == _WORD else after.value
        if word in _DANGER_AFTER:
            return False
        following = toks[end + 1] if end + 1 < len(toks) else None
        if following is None:
            return True
        # "= 1/2 of 18", "= 2 and a half", "= 2 and 1/2", "= 1 hour and 30 minutes": the value
        # goes on in words. "= 4 and 3 + 3 = 6" is a new claim.
        if word == "of" and following.kind == _NUM:
            return False
        if word == "and":
            if following.low in ("a", "an", "one") and end + 2 < len(toks):
                return toks[end + 2].low not in _FRACTION_WORDS
            if following.kind == _NUM:
                with_units = end > node.last + 1
                fraction = end + 3 < len(toks) and toks[end + 2].text == "/"
                return not (with_units or fraction)
    return True
