"""The strict numeric verifier: find the final answer in a completion, parse its number and unit, and
compare with the problem's answer within its tolerance (units converted with pint).

>>> v = verify({"answer": 0.1276, "unit": "M", "rel_tol": 0.01, "abs_tol": 0.0}, "Final answer: 127.6 mM")
>>> v.correct, v.unit
(True, 'mM')
>>> v = verify({"answer": 60.0, "unit": "W", "rel_tol": 0.01, "abs_tol": 0.0}, "Final answer: 60 J.")
>>> v.correct, v.reason.split(":")[0]
(False, 'wrong unit')

The `Final answer:` rule lives here and only here: `FINAL_ANSWER` finds the marker that grading
reads, and `answer_line_ended` says when the line that holds the answer is complete (the stop rule
of a STEM attempt), so what is cut and what is graded agree.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from dostream.envs.stem.problems import Problem, as_problem


@dataclass(frozen=True)
class Verdict:
    """The verifier's judgement: `answer` and `unit` are as the completion wrote them (None when absent);
    `marked`: the completion has a `Final answer:` marker (else the answer is the last number)."""

    correct: bool
    answer: float | None
    unit: str | None
    marked: bool
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_REG = None


def unit_registry():
    """The one pint registry, built on first use (it takes about half a second). Case-sensitive:
    `mPa` is a millipascal, `MPa` a megapascal, `M` molar (mol/L) and `mM` millimolar."""
    global _REG
    if _REG is None:
        import pint

        reg = pint.UnitRegistry()
        try:
            if reg.parse_units("M").dimensionality != reg.parse_units("mol/L").dimensionality:
                raise RuntimeError("check failed")
        except Exception:  # older pint: define molar ourselves
            reg.define("molar = mole / liter = M")
        _REG = reg
    return _REG


@functools.lru_cache(maxsize=4096)
def _parse_unit(text: str):
    """A pint unit, or None when `text` is not a unit pint knows. Never raises."""
    try:
        return unit_registry().parse_units(text)
    except Exception:  # pint raises many types (undefined, syntax, tokenizer, assertion) on junk
        pass
    fixed = re.sub(r"(?<=[A-Za-z])([23])(?![0-9])", r"^\1", text)  # "m3" and "mm2" are powers
    if fixed != text:
        return _parse_unit(fixed)
    return None


_SUP = "⁰¹²³⁴⁵⁶⁷⁸⁹"
_SUP_TABLE = str.maketrans(_SUP + "⁻⁺", "0123456789-+")
_SIGN = "-+−–"  # hyphen-minus, plus, unicode minus, en dash (as a minus)
_EXP = rf"\s{{0,2}}[({{]?\s{{0,2}}[{_SIGN}]?\s{{0,2}}[0-9]{{1,4}}\s{{0,2}}[)}}]?"  # "^-4", "^{-4}", "^(-4)"
_NUMBER = re.compile(
    # not the tail of a word (H2O, log10), a decimal, or an exponent (m^3, 10^-4, **2)
    rf"(?<![\w.^])(?<!\*\*)(?<![\w.^][{_SIGN}])(?<!\*\*[{_SIGN}])"
    rf"(?P<sign>[{_SIGN}]?)(?:"
    rf"10\s{{0,2}}(?:\^|\*\*)(?P<p10>{_EXP})"  # a bare power of ten: 10^-4
    rf"|10(?P<p10s>[⁻⁺]?[{_SUP}]{{1,4}})"
    rf"|(?P<th>[1-9][0-9]{{0,2}}(?:[,\u2009\u202f][0-9]{{3}})+(?:\.[0-9]+)?)(?![0-9]|,[0-9])"  # 2,700; 1,234.5; 2 700
    rf"|(?P<dc>[0-9]+,[0-9]+)(?![0-9]|,[0-9])"  # a decimal comma: 0,125
    rf"|(?P<plain>[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    rf"(?:[eE](?P<e>[{_SIGN}]?[0-9]{{1,4}})(?![0-9])"
    rf"|\s{{0,2}}[×xX*·⋅]\s{{0,2}}10\s{{0,2}}(?:\^|\*\*)(?P<x>{_EXP})"
    rf"|\s{{0,2}}[×xX*·⋅]\s{{0,2}}10(?P<xs>[⁻⁺]?[{_SUP}]{{1,4}}))?"
)
# THE `Final answer:` marker: any case, blanks (not line breaks) inside, markdown emphasis before
# the colon (`**Final answer**:`), a full-width colon.
FINAL_ANSWER = re.compile(r"final[ \t]{0,3}answer[ \t]{0,3}(?:[*_]{1,3}[ \t]{0,3})?[:：]", re.IGNORECASE)
_ANSWER_LEAD = " \t\r\n*_"  # between the marker and the answer: blanks, line breaks, emphasis
# What may not follow a number's match directly: more of a numeral the number pattern could not
# read (`1e99999`, `10^(-0.64)`), or an operation (`1/3`, `2^3`, `2**3`): an expression, not a number.
_CONTINUES = re.compile(rf"[eE][{_SIGN}]?[0-9]|\.[0-9]|[0-9]|[ \t]{{0,2}}(?:\^|\*\*|/[ \t]{{0,2}}[0-9(.])")
_CLAUSE_END = re.compile(r"[;!?]|[.,](?=\s|$)")  # a decimal point or a thousands comma is followed by a digit
_ASIDE = re.compile(r"\([^()=\n]{0,80}=[^()\n]{0,80}\)")  # "(I = 2.5 A)": not the answer
_UNIT_TOKEN = re.compile(r"[A-Za-zµμΩÅ°%℃][A-Za-z0-9µμΩÅ°%·*/^()\-−⁻⁺⁰¹²³⁴⁵⁶⁷⁸⁹]{0,23}")
# Words pint would read as units but that, after a number, are English (as = attosecond, at =
# technical atmosphere, in = inch, a = year) or labels (pH = picohenry): never a stated unit.
_NOT_UNITS = frozenset(
    "a an as at in is it of on or to and are me he has the for by unit units point points "
    "ph poh pH pOH b c e k u x".split()
)
_LATEX = (
    ("\\times", "×"),
    ("\\cdot", "·"),
    ("\\,", " "),
    ("\\;", " "),
    ("\\!", ""),
    ("\\ ", " "),
    ("\\%", "%"),
    ("\\Omega", "Ω"),
    ("\\mu", "µ"),
    ("\\AA", "Å"),
    ("\\mathring{A}", "Å"),
    ("^\\circ", "°"),
    ("^{\\circ}", "°"),
    ("\\text{", ""),
    ("\\mathrm{", ""),
    ("\\boxed{", ""),
    ("{,}", ","),
    ("$", ""),
    ("\u212b", "Å"),
    ("\u00a0", " "),
)


def _value(m: re.Match) -> float:
    if m["th"]:
        mant = re.sub("[,\u2009\u202f]", "", m["th"])
    elif m["dc"]:
        mant = m["dc"].replace(",", ".")
    else:
        mant = m["plain"] or "1"  # a bare power of ten has mantissa 1
    exp = m["p10"] or m["p10s"] or m["e"] or m["x"] or m["xs"] or "0"
    exp = re.sub(r"[\s(){}]", "", exp.translate(_SUP_TABLE)).replace("−", "-").replace("–", "-")
    sign = "-" if m["sign"] and m["sign"] != "+" else ""
    return float(f"{sign}{mant}e{exp}")


def _stated_unit(after: str):
    """(text, pint unit) for the unit written right after a number, or None. Tries the longest run
    of unit-like words first: `kg m^-3`, then `kg`."""
    tokens, pos = [], re.match(r"[ \t\u2009\u202f]{0,2}", after).end()
    while len(tokens) < 4:
        m = _UNIT_TOKEN.match(after, pos)
        if not m:
            break
        tok = m.group().rstrip("*-−")
        if tok in _NOT_UNITS or (len(tok) > 1 and tok.lower() in _NOT_UNITS):  # "A" is an ampere, "At" is a word
            break
        tokens.append(tok)
        if not after.startswith(" ", m.end()):
            break
        pos = m.end() + 1
    for k in range(len(tokens), 0, -1):
        text = " ".join(tokens[:k])
        while text.endswith(")") and text.count(")") > text.count("("):
            text = text[:-1]
        unit = _parse_unit(text) if text else None
        if unit is not None:
            return text, unit
    return None


def _plain(text: str) -> str:
    """`text` with its LaTeX spelled out (`\\times` -> `×`, `$` dropped): what grading reads."""
    for old, new in _LATEX:
        text = text.replace(old, new)
    return text


def _answer_start(text: str, marker: re.Match) -> int:
    """Where the answer after `marker` begins: it may start on the marker's line or the next ones."""
    return len(text) - len(text[marker.end() :].lstrip(_ANSWER_LEAD))


def answer_line_ended(completion: str) -> bool:
    """Whether the line that holds the answer after the first `Final answer:` marker is complete
    (a line break follows the answer). The stop rule of a STEM attempt: the attempt ends there, and
    `verify` reads its answer on that same line.

    >>> answer_line_ended("**Final answer**: 2 V\\n"), answer_line_ended("Final answer:\\n2 V")
    (True, False)
    >>> answer_line_ended("Final\\nanswer: 2 V\\n")  # no marker: not an answer line
    False
    """
    text = _plain(completion)
    marker = FINAL_ANSWER.search(text)
    return marker is not None and "\n" in text[_answer_start(text, marker) :]


def _locate(text: str) -> tuple[re.Match | None, str, bool]:
    """(the answer's number match, the text it was matched in, whether a marker was found)."""
    marker = None
    for marker in FINAL_ANSWER.finditer(text):
        pass
    if marker is None:
        last = None
        for last in _NUMBER.finditer(text):
            pass
        return last, text, False
    # The answer is on the marker's line, in its first clause that holds a number; in a chain
    # "V = I*R = 10 V" it is the number after the last "=".
    line = text[_answer_start(text, marker) : marker.end() + 400].split("\n", 1)[0]
    for clause in _CLAUSE_END.split(_ASIDE.sub(" ", line)):
        for part in reversed(re.split(r"[=≈]", clause)):
            m = _NUMBER.search(part)
            if m:
                return m, part, True
    return None, "", True


def verify(problem: Problem | Mapping[str, Any], completion: str) -> Verdict:
    """Grade `completion` against `problem` (a `Problem` or a row with answer, unit, rel_tol, abs_tol).

    The answer is the number after the last `Final answer:` marker (any case, markdown emphasis
    allowed), else the last number in the text. Numbers may be signed (also `−`), use thousands
    separators, a decimal comma or scientific notation (`1.2e-4`, `1.2 × 10^-4`, `1.2·10⁻⁴`).
    A comma (or a thin space, the SI style) followed by exactly three digits groups thousands
    (`2,700` = 2700, `1,234.5`), unless the group before it is 0; any other comma between digits
    is a decimal comma (`0,125`, `3,5`, `0,700`). A plain space never joins digits (`2 700` is
    two numbers) and a dot is always a decimal point. A unit written
    after the number is converted to the target unit (`127.6 mM` for `0.1276 M`); a unit of
    another dimension is wrong; no unit means the number is read in the target unit. Correct iff
    |â − α| ≤ max(abs_tol, rel_tol·|α|), inclusive (with 1e-9 relative slack for binary floats).
    Never raises on any text.
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be str, got {type(completion).__name__}")
    p = as_problem(problem)
    target, unit = p.answer, p.unit
    text = _plain(completion)
    m, where, marked = _locate(text)
    if m is None:
        why = "no number after the last 'Final answer:' marker" if marked else "no number in the completion"
        return Verdict(False, None, None, marked, why)
    source = "after 'Final answer:'" if marked else "the last number; no 'Final answer:' marker"
    if _CONTINUES.match(where, m.end()):
        shown = (m.group() + where[m.end() :]).split()[0][:40]
        return Verdict(
            False,
            None,
            None,
            marked,
            f"the answer {shown!r} is not a plain number (an expression, or an exponent out of range)",
        )
    value = _value(m)
    if not math.isfinite(value):
        return Verdict(False, None, None, marked, f"the answer {m.group().strip()[:40]!r} is not a finite number")
    stated = _stated_unit(where[m.end() : m.end() + 120])
    tol = max(p.abs_tol, p.rel_tol * abs(target))
    target_name = unit or "dimensionless"
    shown, compared = f"{value:g}", value
    if stated is not None:
        s_text, s_unit = stated
        t_unit = _parse_unit(unit)
        shown += f" {s_text}"
        if t_unit is None:
            pass  # a target unit pint cannot read: judge on the number as written
        elif s_unit.dimensionality != t_unit.dimensionality:
            return Verdict(
                False,
                value,
                s_text,
                marked,
                f"wrong unit: {s_text!r} is {s_unit.dimensionality}, the answer is in "
                f"{target_name!r} ({t_unit.dimensionality})",
            )
        else:
            try:
                compared = float(unit_registry().Quantity(value, s_unit).to(t_unit).magnitude)
            except Exception as e:  # e.g. offset temperatures
                return Verdict(False, value, s_text, marked, f"cannot convert {s_text!r} to {target_name!r}: {e}")
            if s_unit != t_unit:
                shown += f" = {compared:g} {unit}"
    ok = math.isfinite(compared) and abs(compared - target) <= tol * (1 + 1e-9)
    reason = (
        f"{'correct' if ok else 'incorrect'}: {shown} ({source}) is {'' if ok else 'not '}within "
        f"±{tol:.3g} of {target:g} {unit}"
    ).rstrip()
    return Verdict(ok, value, stated[0] if stated else None, marked, reason)
