"""A safe calculator tool and the calculator variant of the STEM environment.

The agent may end a turn with `calc(<expression>)`; the environment answers with the value as a
`tool` segment (` = 0.127551`) and the episode goes on. Tool outputs are world-written evidence,
so they are supervised in every view, while the agent's call itself stays an intervention.

The evaluator never calls `eval`: it parses with `ast` and walks a whitelist (numbers, + - * /
and powers, a few functions and constants). Every input is bounded (length, nesting depth,
exponent, magnitude) and all arithmetic is in floats, so no input can hang it or allocate a huge
integer. Anything else gets a one-line error message as the tool's answer.

>>> evaluate("12.5/98.0")
0.12755102040816327
>>> calc_answer("2*sin(30°)")
'1'
>>> calc_answer("__import__('os')")[:36]
"error: unknown function '__import__'"
"""

from __future__ import annotations

import ast
import math
import re

from dostream.envs.base import StepResult
from dostream.envs.stem import StemEnv
from dostream.stream import Segment

MAX_LENGTH = 200  # characters in one expression
MAX_DEPTH = 40  # nesting of the syntax tree
MAX_EXPONENT = 1000.0  # |b| in a**b
MAX_MAGNITUDE = 1e300  # any intermediate value

FUNCTIONS = {
    "sqrt": math.sqrt,
    "log10": math.log10,
    "ln": math.log,
    "log": math.log,
    "log2": math.log2,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "asin": math.asin,
    "acos": math.acos,
    "atan": math.atan,
    "sinh": math.sinh,
    "cosh": math.cosh,
    "tanh": math.tanh,
    "abs": abs,
    "radians": math.radians,
    "degrees": math.degrees,
}
CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau, "deg": math.pi / 180}
_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: None,  # checked separately: bounded exponent
}
# Written forms a model (or a person) uses for the same operators.
_REWRITES = (("^", "**"), ("×", "*"), ("·", "*"), ("⋅", "*"), ("÷", "/"), ("−", "-"), ("°", "*deg"))


class CalcError(ValueError):
    """The expression is not allowed or cannot be computed; the message says why."""


def evaluate(expression: str) -> float:
    """The value of an arithmetic expression, or `CalcError` with a clear message.

    `^` means power, `°` means degrees (`sin(30°)`), `ln` is the natural log, `log(x, b)` takes
    an optional base. Only floats are ever computed.
    """
    if not isinstance(expression, str):
        raise CalcError("expression must be text")
    if len(expression) > MAX_LENGTH:
        raise CalcError(f"expression too long ({len(expression)} characters, at most {MAX_LENGTH})")
    text = expression.strip()
    for old, new in _REWRITES:
        text = text.replace(old, new)
    if not text:
        raise CalcError("empty expression")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        msg = getattr(e, "msg", None) or str(e) or type(e).__name__
        raise CalcError(f"cannot parse: {msg}") from None
    try:
        return _eval(tree.body, 0)
    except ZeroDivisionError:
        raise CalcError("division by zero") from None
    except OverflowError:
        raise CalcError("result too large") from None
    except (ValueError, TypeError) as e:
        if isinstance(e, CalcError):
            raise
        raise CalcError(f"math error: {e}") from None
    except RecursionError:
        raise CalcError("expression too deeply nested") from None


def _eval(node: ast.AST, depth: int) -> float:
    if depth > MAX_DEPTH:
        raise CalcError(f"expression too deeply nested (more than {MAX_DEPTH} levels)")
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise CalcError(f"only numbers are allowed, not {type(node.value).__name__}")
        return _checked(float(node.value))
    if isinstance(node, ast.Name):
        if node.id not in CONSTANTS:
            raise CalcError(f"unknown name {node.id!r} (allowed: {', '.join(CONSTANTS)})")
        return CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _eval(node.operand, depth + 1)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _eval(node.left, depth + 1), _eval(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            if abs(b) > MAX_EXPONENT:
                raise CalcError(f"exponent too large (|{b:g}| > {MAX_EXPONENT:g})")
            return _checked(math.pow(a, b))  # math.pow: no complex results, OverflowError
        return _checked(_BINOPS[type(node.op)](a, b))
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name):
            raise CalcError("only plain function calls are allowed (no attribute access)")
        name = node.func.id
        if name not in FUNCTIONS:
            raise CalcError(f"unknown function {name!r} (allowed: {', '.join(FUNCTIONS)})")
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise CalcError("keyword and starred arguments are not allowed")
        n_max = 2 if name == "log" else 1
        if not 1 <= len(node.args) <= n_max:
            raise CalcError(f"{name}() takes {'1 or 2 arguments' if n_max == 2 else '1 argument'}")
        return _checked(float(FUNCTIONS[name](*(_eval(a, depth + 1) for a in node.args))))
    if isinstance(node, ast.Attribute):
        raise CalcError("attribute access is not allowed")
    raise CalcError(f"{type(node).__name__} is not allowed (numbers, + - * / ^, functions, constants)")


def _checked(v: float) -> float:
    if not math.isfinite(v) or abs(v) > MAX_MAGNITUDE:
        raise CalcError("result too large")
    return v


def format_value(v: float) -> str:
    """Six significant digits, the way a pocket calculator shows them."""
    return f"{v:.6g}"


def calc_answer(expression: str) -> str:
    """The tool's answer text: the value, or `error: <why>`. Never raises."""
    try:
        return format_value(evaluate(expression))
    except CalcError as e:
        return f"error: {e}"


def trailing_call(text: str) -> str | None:
    """The expression of a `calc(...)` call that ends `text` (trailing spaces allowed), else None.

    A sampler can use this as its stop rule: generation pauses exactly where the tool must answer.

    >>> trailing_call("n = calc(12.5/(2*49.0))")
    '12.5/(2*49.0)'
    >>> trailing_call("n = calc(1+2) mol") is None
    True
    """
    t = text.rstrip()
    if not t.endswith(")"):
        return None
    depth = 0
    # Walk back from the closing parenthesis to its partner; bounded so a huge text costs nothing.
    for i in range(len(t) - 1, max(-1, len(t) - 4 * MAX_LENGTH - 1), -1):
        depth += {")": 1, "(": -1}.get(t[i], 0)
        if depth == 0:
            head = t[max(0, i - 5) : i]
            if head.endswith("calc") and not (len(head) == 5 and (head[0].isalnum() or head[0] == "_")):
                return t[i + 1 : -1]
            return None
    return None


_RESULT = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?")


def calc_solution_segments(solution: str, author: str = "oracle") -> list[Segment]:
    """An oracle solution rewritten to use the calculator: each "= <substitution> = <result>"
    becomes a call and the tool writes the value, e.g. `V = I*R = calc(2.50*4.00)` + tool ` = 10`
    + ` V. Final answer: 10.00 V.`

    A substitution is rewritten only if the calculator agrees with the stated result (within
    0.5%), so a demonstration never shows the tool contradicting the solution.
    """
    parts = solution.split(" = ")
    segments, text, result_taken = [], parts[0], False
    for i in range(1, len(parts)):
        part = parts[i]
        if result_taken:  # this part began with the result the tool has just written
            text, result_taken = text + part, False
            continue
        result = _RESULT.match(parts[i + 1]) if i + 1 < len(parts) else None
        value = _agreeing_value(part, float(result.group())) if result else None
        if value is None:
            text += " = " + part
            continue
        segments += [
            Segment(author, f"{text} = calc({part})"),
            Segment("tool", f" = {format_value(value)}", role="tool"),
        ]
        parts[i + 1] = parts[i + 1][result.end() :]
        text, result_taken = "", True
    return [s for s in segments + [Segment(author, text)] if s.text]


def _agreeing_value(expression: str, stated: float) -> float | None:
    if not re.search(r"[-+*/^(]", expression):  # "250 mL" is a conversion, not arithmetic
        return None
    try:
        value = evaluate(expression)
    except CalcError:
        return None
    return value if abs(value - stated) <= 5e-3 * abs(stated) + 1e-12 else None


TOOL_HINT = "You may write calc(<expression>) to evaluate arithmetic; the calculator answers.\n\n"


class CalculatorStemEnv(StemEnv):
    """The STEM environment with a calculator tool.

    A turn that ends with `calc(<expr>)` gets a `tool` segment ` = <value>` (or ` = error: ...`)
    and the episode continues; any other turn is the attempt and is graded, with the tool outputs
    in between counted as part of it (`Final answer: calc(2*5) = 10 V.` verifies). After
    `max_calls` calls a turn is graded whatever it ends with. With `calc_oracle`, corrections
    demonstrate the tool too (oracle text interleaved with tool outputs).

    Sampling pauses at every `)` (`stop`); the turn is over there only if it ends in a call
    (`turn_over`), else the model goes on writing the same turn.

    >>> from dostream.envs.stem import Problem
    >>> env = CalculatorStemEnv()
    >>> p = Problem("p", "physics", "ohm_voltage", "2.50 A through 4.00 ohm. Voltage?",
    ...             "V = I*R = 2.50*4.00 = 10.00 V. Final answer: 10.00 V.", 10.0, "V", 0.01, 0.0)
    >>> _ = env.reset(p)
    >>> env.step("V = calc(2.50*4.00)").segments[0].text
    ' = 10'
    >>> env.step(" V. Final answer: 10 V.").reward
    1.0
    >>> env.calls  # every attempt gets its own `max_calls`
    0
    """

    stop = (")",)  # a ")" may close a tool call

    def __init__(self, *, max_calls: int = 8, calc_oracle: bool = True, tool_hint: str | None = TOOL_HINT, **kwargs):
        super().__init__(**kwargs)
        self.max_calls, self.calc_oracle, self.tool_hint = max_calls, calc_oracle, tool_hint
        self.calls = 0

    def reset(self, item) -> list[Segment]:
        self.calls = 0
        segments = super().reset(item)
        if self.tool_hint:
            segments.insert(0, Segment("context", self.tool_hint, role="system"))
        return segments

    def step(self, agent_text: str, token_ids: list[int] | None = None) -> StepResult:
        expr = trailing_call(agent_text)
        if expr is None or self.calls >= self.max_calls or self.done or self.problem is None:
            self.calls = 0  # the attempt is graded: a next attempt (a repair) gets its own max_calls
            return super().step(agent_text, token_ids)
        self.calls += 1
        out = f" = {calc_answer(expr)}"
        self._attempt_text += agent_text + out
        return StepResult([Segment("tool", out, role="tool")], 0.0, False, {"calls": self.calls, **self.info()})

    def turn_over(self, text: str) -> bool:
        """The attempt's answer line has ended, or the turn ends in a call the tool must answer."""
        return super().turn_over(text) or trailing_call(text) is not None

    def correction(self) -> list[Segment]:
        if not self.calc_oracle:
            return super().correction()
        return calc_solution_segments(self.problem.solution, "oracle")
