"""The calculator tool: right values, clear refusals, never a hang; the oracle replays with it."""

import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dostream.envs.calculator import (
    MAX_LENGTH,
    CalcError,
    calc_answer,
    calc_solution_segments,
    evaluate,
    trailing_call,
)
from dostream.envs.stem import SKILLS, generate, verify


@pytest.mark.parametrize(
    "expr,value",
    [
        ("12.5/98.0", 12.5 / 98.0),
        ("2^10", 1024.0),
        ("2**10", 1024.0),
        ("-log10(2.5e-04)", -math.log10(2.5e-4)),
        ("0.5*1200*20.00^2", 240000.0),
        ("sqrt(16)", 4.0),
        ("ln(e)", 1.0),
        ("log(100, 10)", 2.0),
        ("log(e)", 1.0),
        ("sin(30°)", 0.5),
        ("2*sin(30*deg)", 1.0),
        ("degrees(asin(0.5))", 30.0),
        ("pi*10.0^2/4", math.pi * 25),
        ("1.2×10^-4", 1.2e-4),
        ("3 · 4", 12.0),
        ("8 ÷ 2", 4.0),
        ("−3 + 5", 2.0),
        ("abs(-2)", 2.0),
        ("(1+2)*(3+4)", 21.0),
        ("1e299*10", 1e300),
        ("-(-(-1))", -1.0),
        ("tau/2", math.pi),
    ],
)
def test_values(expr, value):
    assert evaluate(expr) == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize(
    "expr,message",
    [
        ("__import__('os').system('ls')", "attribute access"),
        ("__import__('os')", "unknown function '__import__'"),
        ("open('/etc/passwd')", "unknown function 'open'"),
        ("eval('1+1')", "unknown function 'eval'"),
        ("().__class__", "attribute access"),
        ("(1).real", "attribute access"),
        ("x + 1", "unknown name 'x'"),
        ("__builtins__", "unknown name"),
        ("'a' * 10", "only numbers"),
        ("[1, 2]", "List is not allowed"),
        ("lambda: 1", "Lambda is not allowed"),
        ("1 if 1 else 2", "IfExp is not allowed"),
        ("1 < 2", "Compare is not allowed"),
        ("2j", "only numbers"),
        ("True + 1", "only numbers"),
        ("9**9**9", "too large"),
        ("10**10000", "exponent too large"),
        ("2**-5000", "exponent too large"),
        ("exp(1000)", "too large"),
        ("1e308*10", "too large"),
        ("(" * 300 + "1" + ")" * 300, "too long"),
        ("-(" * 50 + "1" + ")" * 50, "too deeply nested"),
        ("-" * 150 + "1", "too deeply nested"),
        ("1" * (MAX_LENGTH + 1), "too long"),
        ("1/0", "division by zero"),
        ("sqrt(-1)", "math error"),
        ("log10(0)", "math error"),
        ("(-8)**(1/3)", "math error"),
        ("sqrt(1, 2)", "takes 1 argument"),
        ("log(x=1)", "keyword"),
        ("sqrt(*[4])", "starred"),
        ("", "empty"),
        ("1 +", "cannot parse"),
        ("2,700", "Tuple is not allowed"),
        ("a\x00b", "cannot parse"),
    ],
)
def test_refusals_are_messages(expr, message):
    with pytest.raises(CalcError, match=message.replace("(", r"\(").replace("*", r"\*")):
        evaluate(expr)
    answer = calc_answer(expr)
    assert answer.startswith("error: ") and message.split("'")[0] in answer


def test_no_input_hangs():
    worst = [
        "9**9**9**9",
        "10**10**10",
        "(" * 100 + ")" * 100,
        "2**" * 60 + "2",
        "sqrt(" * 40 + "2" + ")" * 40,
        "1+" * 99 + "1",
        "exp(exp(exp(exp(10))))",
        "9" * 199,
        "factorial(100000)",
    ]
    for expr in worst:
        start = time.perf_counter()
        calc_answer(expr)
        assert time.perf_counter() - start < 0.5, expr


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=250))
def test_calc_answer_never_raises(text):
    out = calc_answer(text)
    assert out.startswith("error: ") or math.isfinite(float(out))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(list("0123456789.+-*/^()e ") + ["**", "sqrt(", "log10(", "pi", "°", "sin("]), max_size=60
    ).map("".join)
)
def test_calc_answer_never_raises_on_arithmetic_like_text(text):
    calc_answer(text)


def test_trailing_call():
    assert trailing_call("n = calc(12.5/98.0)") == "12.5/98.0"
    assert trailing_call("x = calc(sqrt((1+2)*3))  \n") == "sqrt((1+2)*3)"
    assert trailing_call("calc(1+2) is 3") is None
    assert trailing_call("mycalc(1+2)") is None
    assert trailing_call("f(1+2)") is None
    assert trailing_call("calc(1+2))") is None
    assert trailing_call(")" * 10_000) is None
    assert trailing_call("") is None


@pytest.mark.parametrize("skill", SKILLS)
def test_every_oracle_substitution_replays_on_the_calculator(skill):
    """The calculator agrees with every oracle solution's arithmetic (a check of the oracle too)."""
    problems = [p for p in generate("sft", 400, seed=4) if p.skill == skill]
    for p in problems:
        segments = calc_solution_segments(p.solution)
        assert "".join(s.text for s in segments if s.author == "oracle").count("calc(") >= 1, p.solution
        assert [s.author for s in segments][:2] == ["oracle", "tool"]
        text = "".join(s.text for s in segments)
        assert verify(p, text).correct, text


def test_every_attempt_gets_its_own_calls():
    """`max_calls` is per attempt: a repair after a wrong attempt that used them all may call again."""
    from dostream.envs.calculator import CalculatorStemEnv
    from dostream.envs.stem import Problem

    env = CalculatorStemEnv(max_calls=1, attempts=2)
    p = Problem("p", "physics", "ohm_voltage", "2.50 A through 4.00 ohm. Voltage?", "V = 10 V.", 10.0, "V", 0.01, 0.0)
    env.reset(p)
    assert env.step("V = calc(2.50*3.00)").segments[0].author == "tool"
    wrong = env.step(" V. Final answer: 7.5 V.")
    assert wrong.reward == 0.0 and not wrong.done
    again = env.step("V = calc(2.50*4.00)")
    assert again.segments[0].author == "tool" and again.segments[0].text == " = 10"
    assert env.step(" V. Final answer: 10 V.").reward == 1.0
