"""The numeric verifier: one table of cases covering every rule, then properties on arbitrary text."""

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dostream.envs.stem import FINAL_ANSWER, Verdict, answer_line_ended, verify


def row(answer, unit, rel=0.01, abs_=0.0):
    return {"answer": answer, "unit": unit, "rel_tol": rel, "abs_tol": abs_}


V10, W60, M = row(10.0, "V"), row(60.0, "W"), row(0.1276, "M")
RHO, PH, MPA, NM = row(2700.0, "kg/m^3"), row(4.0, "", 0.0, 0.01), row(500.0, "MPa"), row(0.2, "nm")
SMALL, NEG, DEG = row(1.2e-4, "M"), row(-4.2, "V"), row(22.5, "deg")
C = row(2431.0, "J/(kg·K)")

# (id, problem, completion, correct, answer, unit, reason fragment)
CASES = [
    # the marker and where the answer is
    ("marker", V10, "V = I*R = 10 V. Final answer: 10 V.", True, 10.0, "V", "after 'Final answer:'"),
    ("marker-lowercase", V10, "final answer: 10 V", True, 10.0, "V", "correct"),
    ("marker-uppercase", V10, "FINAL ANSWER: 10 V", True, 10.0, "V", "correct"),
    ("marker-bold", V10, "**Final answer:** 10 V", True, 10.0, "V", "correct"),
    ("marker-bold-colon-outside", V10, "**Final Answer**: **10 V**", True, 10.0, "V", "correct"),
    ("marker-underscore-emphasis", V10, "__Final answer:__ 10 V", True, 10.0, "V", "correct"),
    ("marker-italic", V10, "*Final answer:* 10", True, 10.0, None, "correct"),
    ("last-marker-wins", V10, "Final answer: 9 V. No, wait. Final answer: 10 V.", True, 10.0, "V", "correct"),
    ("last-marker-wins-wrong", V10, "Final answer: 10 V. Hmm. Final answer: 12 V.", False, 12.0, "V", "incorrect"),
    ("answer-on-next-line", V10, "Final answer:\n10 V", True, 10.0, "V", "correct"),
    ("chain-after-marker", V10, "Final answer: V = I*R = 2.5*4 = 10 V.", True, 10.0, "V", "correct"),
    ("aside-after-answer", V10, "Final answer: 10 V (I = 2.5 A).", True, 10.0, "V", "correct"),
    ("abbreviation-before", V10, "Final answer: approx. 10 V", True, 10.0, "V", "correct"),
    (
        "marker-without-number",
        V10,
        "The voltage is 10 V. Final answer: I don't know",
        False,
        None,
        None,
        "no number after the last 'Final answer:'",
    ),
    # fallback without a marker
    ("fallback-last-number", V10, "I = 2.5 A and R = 4 ohm, so V = 10 V", True, 10.0, "V", "last number"),
    ("fallback-last-number-wrong", V10, "V = 10 V, or maybe 11 V", False, 11.0, "V", "incorrect"),
    ("fallback-ignores-word-digits", PH, "pH = -log10(1e-4) = 4.00 for H2O", True, 4.0, None, "correct"),
    ("no-number", V10, "I have no idea.", False, None, None, "no number in the completion"),
    ("empty", V10, "", False, None, None, "no number"),
    # number forms
    ("unicode-minus", NEG, "Final answer: −4.2 V", True, -4.2, "V", "correct"),
    ("plus-sign", V10, "Final answer: +10 V", True, 10.0, "V", "correct"),
    ("sign-matters", NEG, "Final answer: 4.2 V", False, 4.2, "V", "incorrect"),
    ("thousands-separator", RHO, "Final answer: 2,700 kg/m^3", True, 2700.0, "kg/m^3", "correct"),
    ("thousands-with-decimals", row(1234.5, "J"), "Final answer: 1,234.5 J", True, 1234.5, "J", "correct"),
    ("thin-space-thousands", RHO, "Final answer: 2\u202f700 kg/m^3", True, 2700.0, "kg/m^3", "correct"),
    ("decimal-comma", row(0.125, "M"), "Final answer: 0,125 M", True, 0.125, "M", "correct"),
    ("decimal-comma-short", row(3.5, "V"), "Final answer: 3,5 V", True, 3.5, "V", "correct"),
    ("trailing-period", PH, "Final answer: 4.", True, 4.0, None, "correct"),
    ("leading-dot", row(0.5, "A"), "Final answer: .5 A", True, 0.5, "A", "correct"),
    ("sci-e", SMALL, "Final answer: 1.2e-4 M", True, 1.2e-4, "M", "correct"),
    ("sci-E", SMALL, "Final answer: 1.2E-4 M", True, 1.2e-4, "M", "correct"),
    ("sci-times", SMALL, "Final answer: 1.2 × 10^-4 M", True, 1.2e-4, "M", "correct"),
    ("sci-x", SMALL, "Final answer: 1.2x10^-4 M", True, 1.2e-4, "M", "correct"),
    ("sci-star", SMALL, "Final answer: 1.2*10^-4 M", True, 1.2e-4, "M", "correct"),
    ("sci-double-star", SMALL, "Final answer: 1.2 * 10**-4 M", True, 1.2e-4, "M", "correct"),
    ("sci-superscript", SMALL, "Final answer: 1.2·10⁻⁴ M", True, 1.2e-4, "M", "correct"),
    ("sci-latex", SMALL, "Final answer: $1.2 \\times 10^{-4}\\,\\text{M}$", True, 1.2e-4, "M", "correct"),
    ("sci-unicode-minus-exponent", SMALL, "Final answer: 1.2 × 10^−4 M", True, 1.2e-4, "M", "correct"),
    ("bare-power-of-ten", row(1e-4, "M"), "Final answer: 10^-4 M", True, 1e-4, "M", "correct"),
    ("not-finite", V10, "Final answer: 1e9999 V", False, None, None, "not a finite number"),
    # tolerance edges: |a - target| <= max(abs_tol, rel_tol * |target|), inclusive
    ("rel-edge-above", V10, "Final answer: 10.1 V", True, 10.1, "V", "within ±0.1"),
    ("rel-edge-below", V10, "Final answer: 9.9 V", True, 9.9, "V", "correct"),
    ("rel-edge-binary-float", row(0.7, "A"), "Final answer: 0.707 A", True, 0.707, "A", "correct"),
    ("rel-beyond-binary-float", row(0.7, "A"), "Final answer: 0.7071 A", False, 0.7071, "A", "incorrect"),
    ("rel-just-beyond", V10, "Final answer: 10.1001 V", False, 10.1001, "V", "not within"),
    ("abs-edge-ph", PH, "Final answer: 4.01", True, 4.01, None, "within ±0.01"),
    ("abs-beyond-ph", PH, "Final answer: 4.011", False, 4.011, None, "incorrect"),
    ("abs-beats-rel", row(0.0, "", 0.01, 0.05), "Final answer: 0.04", True, 0.04, None, "correct"),
    # units: same dimension converts, another dimension is wrong, none means the target unit
    ("millimolar", M, "Final answer: 127.6 mM", True, 127.6, "mM", "= 0.1276 M"),
    ("mol-per-litre", M, "Final answer: 0.1276 mol/L", True, 0.1276, "mol/L", "correct"),
    ("kilowatt", W60, "Final answer: 0.06 kW", True, 0.06, "kW", "= 60 W"),
    ("joule-for-watt", W60, "Final answer: 60 J", False, 60.0, "J", "wrong unit"),
    ("mol-for-molar", M, "Final answer: 0.1276 mol", False, 0.1276, "mol", "wrong unit"),
    ("millipascal-is-not-megapascal", MPA, "Final answer: 500 mPa", False, 500.0, "mPa", "incorrect"),
    ("megapascal", MPA, "Final answer: 500 MPa", True, 500.0, "MPa", "correct"),
    ("newton-per-mm2", MPA, "Final answer: 500 N/mm^2", True, 500.0, "N/mm^2", "correct"),
    ("pascal", MPA, "Final answer: 5.0e8 Pa", True, 5e8, "Pa", "correct"),
    ("grams-per-cc", RHO, "Final answer: 2.7 g/cm³", True, 2.7, "g/cm³", "= 2700 kg/m^3"),
    ("unit-with-space", RHO, "Final answer: 2700 kg m^-3.", True, 2700.0, "kg m^-3", "correct"),
    ("unit-glued", V10, "Final answer: 10V", True, 10.0, "V", "correct"),
    ("unit-name-plural", V10, "Final answer: 10 volts", True, 10.0, "volts", "correct"),
    ("kilovolt-wrong-number", V10, "Final answer: 10 kV", False, 10.0, "kV", "incorrect"),
    ("angstrom", NM, "Final answer: 2.0 Å", True, 2.0, "Å", "= 0.2 nm"),
    ("angstrom-sign", NM, "Final answer: 2.0 \u212b", True, 2.0, "Å", "correct"),
    ("ampere-is-not-angstrom", NM, "Final answer: 2.0 A", False, 2.0, "A", "wrong unit"),
    ("degree-sign", DEG, "Final answer: 22.5°", True, 22.5, "°", "correct"),
    ("radians", DEG, "Final answer: 0.3927 rad", True, 0.3927, "rad", "correct"),
    ("compound-unit", C, "Final answer: 2.431 kJ/(kg K).", True, 2.431, "kJ/(kg K)", "correct"),
    ("missing-temperature", C, "Final answer: 2431 J/kg.", False, 2431.0, "J/kg", "wrong unit"),
    ("no-unit-judged-on-number", M, "Final answer: 0.1276", True, 0.1276, None, "correct"),
    ("no-unit-wrong-scale", M, "Final answer: 127.6", False, 127.6, None, "incorrect"),
    ("ph-label-is-not-picohenry", PH, "Final answer: 4.00 pH units", True, 4.0, None, "correct"),
    ("ph-with-molar-unit", PH, "Final answer: 4.00 M", False, 4.0, "M", "wrong unit"),
    ("english-word-is-not-a-unit", PH, "Final answer: 4.00 as expected", True, 4.0, None, "correct"),
    ("unknown-word-ignored", V10, "Final answer: 10 blorps", True, 10.0, None, "correct"),
]


@pytest.mark.parametrize("name,problem,completion,correct,answer,unit,fragment", CASES, ids=[c[0] for c in CASES])
def test_verifier_table(name, problem, completion, correct, answer, unit, fragment):
    v = verify(problem, completion)
    assert isinstance(v, Verdict)
    assert v.correct is correct, v
    assert v.answer == pytest.approx(answer) if answer is not None else v.answer is None, v
    assert v.unit == unit, v
    assert fragment in v.reason, v


@pytest.mark.parametrize("name,problem,completion,correct,answer,unit,fragment", CASES, ids=[c[0] for c in CASES])
def test_marked_says_whether_a_marker_was_found(name, problem, completion, correct, answer, unit, fragment):
    assert verify(problem, completion).marked is (FINAL_ANSWER.search(completion) is not None)


@pytest.mark.parametrize(
    "completion,marked,ended",
    [
        ("**Final answer**: 2 V", True, False),  # graded after the marker ...
        ("**Final answer**: 2 V\nmore", True, True),  # ... and its line's end ends the attempt
        ("Final\nanswer: 2 V\nmore", False, False),  # not a marker: the last number, no cut
        ("Final answer:\n2 V", True, False),  # the answer may start on the next line
        ("Final answer:\n\n2 V\n", True, True),
        ("Final answer: $2\\,\\text{V}$\n", True, True),
        ("final ANSWER： 2 V\n", True, True),
        ("The answer is 2 V.\nDone.\n", False, False),
    ],
)
def test_the_cutter_and_the_grader_share_one_marker_rule(completion, marked, ended):
    v = verify(row(2.0, "V"), completion)
    assert v.marked is marked and answer_line_ended(completion) is ended
    assert v.answer == 2.0


def test_table_is_large_enough():
    assert len(CASES) >= 40


def test_problem_object_and_row_agree():
    from dostream.envs.stem import generate

    p = generate("test", 1, seed=0)[0]
    assert verify(p, p.solution) == verify(p.to_json(), p.solution)


ALPHABET = st.sampled_from(
    list("0123456789.,eE-+−×x*^·⁻⁴²³/()=≈: \n\tkgmMVWJÅ°%$\\{}_")
    + [
        "Final answer:",
        "**Final answer:**",
        "10^",
        " mM",
        " kW",
        " J",
        "\\times",
        "1,000",
        "e-4",
        " pH",
        "calc(",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_never_raises_on_arbitrary_text(text):
    v = verify(V10, text)
    assert isinstance(v.correct, bool) and isinstance(v.reason, str) and v.reason


@settings(max_examples=300, deadline=None)
@given(st.lists(ALPHABET, max_size=60).map("".join), st.sampled_from([V10, PH, M, RHO, NM, C]))
def test_never_raises_on_answer_like_text(text, problem):
    v = verify(problem, text)
    assert v.answer is None or isinstance(v.answer, float)
    assert not v.correct or v.answer is not None


@settings(max_examples=300, deadline=None)
@given(st.lists(ALPHABET | st.sampled_from(["Final\nanswer:", "**Final answer**:", "FINAL ANSWER"]), max_size=40))
def test_a_completion_is_cut_exactly_when_it_is_marked(parts):
    """A marked completion's answer line ends at its next line break; an unmarked one is never cut."""
    text = "".join(parts)
    assert verify(V10, text).marked is answer_line_ended(text + "x\n")
    assert not answer_line_ended(text) or verify(V10, text).marked


@pytest.mark.parametrize(
    "text",
    [
        "1," * 50_000,
        "1" * 100_000,
        "Final answer:" * 10_000,
        "1e" * 50_000,
        "1 × " * 30_000,
        "(" * 50_000,
        "1,1111" * 20_000,
        "Final answer: " + "a " * 50_000,
        "10" + " V" * 50_000,
        "x10^" * 30_000,
        "-" * 100_000 + "1",
        "Final answer: (" + "a=" * 40_000 + ")",
        "\\text{" * 30_000,
        "Final answer: 10 " + "m" * 100_000,
    ],
)
def test_adversarial_input_is_fast(text):
    verify(V10, "warm up the unit registry: 1 V")
    start = time.perf_counter()
    verify(V10, text)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "Final answer: 1e99999 M",
        "Final answer: 10^(-0.64) M",
        "Final answer: 1/3 M",
        "Final answer: 2^0 M",
        "Final answer: 1**2 M",
        "Final answer: 1 / 3 M",
    ],
)
def test_an_expression_or_an_unreadable_numeral_is_not_an_answer(completion):
    # Each of these once read as 1 and passed for a target of 1.0 M.
    v = verify(row(1.0, "M"), completion)
    assert not v.correct and v.answer is None and "not a plain number" in v.reason


@pytest.mark.parametrize(
    "completion", ["Final answer: 1 M.", "Final answer: 1e0 M", "Final answer: 10^0 M", "Final answer: 1.00 mol/L"]
)
def test_numbers_that_end_where_their_match_ends_still_pass(completion):
    assert verify(row(1.0, "M"), completion).correct
