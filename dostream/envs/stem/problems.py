"""STEM problems: ten skills in three domains, several phrasings each, physically sensible values in SI
units. Every row carries a worked oracle solution in the paper's style (formula, substitution, result,
`Final answer: <number> <unit>.`) and the tolerances the verifier (`verifier.py`) uses.

>>> p = generate("sft", 1, seed=3)[0]
>>> p.solution.rstrip().endswith(f"{p.unit}.") or p.unit == ""
True
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

DOMAINS = {
    "ohm_voltage": "physics",
    "ohm_current": "physics",
    "electric_power": "physics",
    "kinetic_energy": "physics",
    "specific_heat": "chemistry",
    "molarity": "chemistry",
    "ph": "chemistry",
    "density": "materials",
    "engineering_stress": "materials",
    "bragg_diffraction": "materials",
}
SKILLS = tuple(DOMAINS)
SPLITS = ("sft", "agent", "test")
SPLIT_SIZES = {"sft": 200, "agent": 200, "test": 100}
# 1% relative: a 3-4 significant-figure answer passes, a wrong formula (a lost 1/2, a lost 2)
# does not. pH is a logarithm: a relative tolerance means nothing there, so 0.01 pH units.
TOLERANCES = {s: (0.01, 0.0) for s in SKILLS} | {"ph": (0.0, 0.01)}


@dataclass(frozen=True)
class Problem:
    """One STEM problem row (docs/design.md): the question, the worked oracle solution, the target."""

    id: str
    domain: str
    skill: str
    question: str
    solution: str
    answer: float
    unit: str
    rel_tol: float
    abs_tol: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> Problem:
        """Build from a row; a missing or mistyped field is a `ValueError` naming the field."""
        if not isinstance(row, Mapping):
            raise ValueError(f"a problem row must be an object, got {type(row).__name__}")
        values = {}
        for f in fields(cls):
            num = f.name in ("answer", "rel_tol", "abs_tol")
            v = row.get(f.name, "" if f.name in ("id", "domain", "skill", "question", "solution") else None)
            if num and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ValueError(f"problem field {f.name!r}: expected a finite number, got {v!r}")
            if not num and not isinstance(v, str):
                raise ValueError(f"problem field {f.name!r}: expected a string, got {v!r}")
            values[f.name] = float(v) if num else v
        return cls(**values)


def as_problem(item: Problem | Mapping[str, Any]) -> Problem:
    return item if isinstance(item, Problem) else Problem.from_json(item)


# ---------------------------------------------------------------- the generator


def _fmt(x: float, sig: int = 3) -> str:
    """`sig` significant figures, fixed-point in [1e-3, 1e6), else the paper's `1.00e-04` form."""
    if x == 0:
        return "0"
    x = round(x, sig - 1 - math.floor(math.log10(abs(x))))
    e = math.floor(math.log10(abs(x)))  # after rounding, which may carry into the next decade
    return f"{x:.{max(0, sig - 1 - e)}f}" if -3 <= e < 6 else f"{x:.{sig - 1}e}"


def _num(x: float, sig: int = 3) -> tuple[str, float]:
    """A value as the question states it (text) and as that text's value: answers use the latter."""
    text = _fmt(x, sig)
    return text, float(text)


def _draw(rng: random.Random, lo: float, hi: float, sig: int = 3) -> tuple[str, float]:
    return _num(math.exp(rng.uniform(math.log(lo), math.log(hi))), sig)  # log-uniform: every scale


def _pick(rng: random.Random, templates: list[str], **values: Any) -> str:
    return rng.choice(templates).format(**values)


# Each skill returns (question, solution steps, exact answer, unit). A step reads
# "<symbol> = <formula> = <substitution> = <result> <unit>", the substitution in calculator syntax
# (so `calculator.calc_solution_segments` can replay it with the tool); the last step's result is
# the final answer. Results are computed from the values shown, so every step checks by hand.


def _quantity(rng, steps, symbol, base, alt, p=0.3):
    """A value in unit `base = (unit, lo, hi)`, or with probability `p` stated in `alt = (unit,
    factor to base, lo, hi)` with the conversion as a solution step (`I = 250 mA = 0.250 A`).
    Returns (text as stated, text in the base unit, value in the base unit, whether alt was used)."""
    if rng.random() >= p:
        text, value = _draw(rng, *base[1:])
        return text, text, value, False
    shown, value = _draw(rng, *alt[2:])
    text, value = _num(value * alt[1])
    steps.append(f"{symbol} = {shown} {alt[0]} = {text} {base[0]}")
    return shown, text, value, True


def _ohm_voltage(rng):
    (rt, r), steps = _draw(rng, 2, 1000), []
    shown, it, i, milli = _quantity(rng, steps, "I", ("A", 0.1, 10), ("mA", 1e-3, 5, 900))
    tpl = (
        [
            "A current of {i} mA flows through a {r} Ω resistor. What is the voltage across it in volts?",
            "A {r} ohm resistor carries {i} mA. Find the potential difference across it in volts.",
        ]
        if milli
        else [
            "A current of {i} A flows through a {r} Ω resistor. What is the voltage across the resistor?",
            "A {r} Ω resistor carries a current of {i} A. Find the potential difference across it.",
            "What voltage is needed to drive a current of {i} A through a resistance of {r} ohms?",
        ]
    )
    steps.append(f"V = I*R = {it}*{rt} = {_fmt(i * r, 4)} V")
    return _pick(rng, tpl, i=shown, r=rt), steps, i * r, "V"


def _ohm_current(rng):
    (vt, v), steps = _draw(rng, 1.5, 240), []
    shown, rt, r, kilo = _quantity(rng, steps, "R", ("Ω", 2, 1000), ("kΩ", 1e3, 1, 50))
    tpl = (
        ["A {v} V supply is connected across a resistor of {r} kΩ. What current flows, in amperes?"]
        if kilo
        else [
            "A {v} V battery is connected across a {r} Ω resistor. What current flows?",
            "What current flows through a {r} ohm resistor when the voltage across it is {v} V?",
            "A potential difference of {v} V is applied across a resistance of {r} Ω. Find the current.",
        ]
    )
    steps.append(f"I = V/R = {vt}/{rt} = {_fmt(v / r, 4)} A")
    return _pick(rng, tpl, v=vt, r=shown), steps, v / r, "A"


def _electric_power(rng):
    (vt, v), (it, i), (rt, r) = _draw(rng, 1.5, 240), _draw(rng, 0.05, 12), _draw(rng, 2, 1000)
    form = rng.randrange(3)
    if form == 0:
        p, step = v * i, f"P = V*I = {vt}*{it}"
        tpl = [
            "A device draws {i} A from a {v} V supply. What power does it consume?",
            "What is the electrical power of an appliance that takes {i} A at {v} V?",
        ]
    elif form == 1:
        p, step = i * i * r, f"P = I^2*R = {it}^2*{rt}"
        tpl = [
            "A current of {i} A flows through a {r} Ω resistor. What power is dissipated in it?",
            "How much power does a {r} ohm resistor dissipate when it carries {i} A?",
        ]
    else:
        p, step = v * v / r, f"P = V^2/R = {vt}^2/{rt}"
        tpl = [
            "A {r} Ω heater is connected to a supply of {v} V. What power does it dissipate?",
            "A {v} V source is connected across a {r} ohm load. Find the power delivered to the load.",
        ]
    return _pick(rng, tpl, v=vt, i=it, r=rt), [f"{step} = {_fmt(p, 4)} W"], p, "W"


_SUBSTANCES = [
    ("water", 4186),
    ("aluminium", 897),
    ("copper", 385),
    ("iron", 449),
    ("lead", 129),
    ("ethanol", 2440),
    ("glass", 840),
    ("silver", 235),
    ("granite", 790),
]


def _specific_heat(rng):
    (name, c), (mt, m), (dtt, dt) = rng.choice(_SUBSTANCES), _draw(rng, 0.1, 5), _draw(rng, 2, 60)
    form = rng.randrange(3)
    if form == 2:  # solve for c: the heat is stated, the substance is not
        qt, heat = _num(m * c * dt)
        q = _pick(
            rng,
            [
                "A {m} kg sample absorbs {q} J of heat and its temperature rises by {dt} K. "
                "What is its specific heat capacity in J/(kg·K)?",
                "Heating {m} kg of an unknown material by {dt} K takes {q} J. Find its specific heat in J/(kg·K).",
            ],
            m=mt,
            q=qt,
            dt=dtt,
        )
        ans = heat / (m * dt)
        return q, [f"c = Q/(m*ΔT) = {qt}/({mt}*{dtt}) = {_fmt(ans, 4)} J/(kg·K)"], ans, "J/(kg·K)"
    steps, t1t, t2t = [], "", ""
    if form == 1:  # the rise is given as two temperatures
        t1t, t1 = _draw(rng, 5, 40)
        t2t, t2 = _num(t1 + dt)
        dtt, dt = _num(t2 - t1, 4)
        steps.append(f"ΔT = {t2t} - {t1t} = {dtt} K")
    tpl = (
        [
            "How much heat is needed to raise the temperature of {m} kg of {s} by {dt} K? (c = {c} J/(kg·K))",
            "{m} kg of {s} (specific heat {c} J/(kg·K)) warms by {dt} K. How much heat did it absorb, in joules?",
        ]
        if form == 0
        else ["{m} kg of {s} (c = {c} J/(kg·K)) is heated from {t1} °C to {t2} °C. How much heat does it absorb?"]
    )
    q = _pick(rng, tpl, m=mt, s=name, c=c, dt=dtt, t1=t1t, t2=t2t)
    steps.append(f"Q = m*c*ΔT = {mt}*{c}*{dtt} = {_fmt(m * c * dt, 4)} J")
    return q, steps, m * c * dt, "J"


_COMPOUNDS = [
    ("NaCl", 58.44),
    ("NaOH", 40.00),
    ("KCl", 74.55),
    ("glucose", 180.16),
    ("H2SO4", 98.08),
    ("CuSO4", 159.61),
    ("KNO3", 101.10),
    ("CaCl2", 110.98),
    ("Na2CO3", 105.99),
    ("NH4Cl", 53.49),
]


def _molarity(rng):
    (name, mm), (vt, v) = rng.choice(_COMPOUNDS), _draw(rng, 0.1, 2)
    mmt = f"{mm:.2f}"
    conc = math.exp(rng.uniform(math.log(0.01), math.log(3)))
    steps, form = [], rng.randrange(4)
    if form == 0:
        (nt, n), mt = _num(conc * v), ""
        tpl = ["{n} mol of {s} is dissolved to make {v} L of solution. What is the molar concentration?"]
    else:
        mt, m = _num(conc * v * mm)
        if form == 1:
            tpl = [
                "{m} g of {s} (molar mass {mm} g/mol) is dissolved in water to make {vml} mL of solution. "
                "What is the molarity?"
            ]
            steps.append(f"V = {_fmt(v * 1000)} mL = {vt} L")
        else:
            tpl = [
                "{m} g of solute (molar mass {mm} g/mol) is dissolved to make {v} L of solution. What is the molarity?",
                "What is the molarity of a solution made by dissolving {m} g of {s} (molar mass {mm} g/mol) "
                "in enough water for {v} L?",
            ]
        n, nt = m / mm, _fmt(m / mm, 4)
        steps.append(f"n = m/M = {mt}/{mmt} = {nt} mol")
    steps.append(f"c = n/V = {nt}/{vt} = {_fmt(float(nt) / v, 4)} M")
    return _pick(rng, tpl, n=nt, m=mt, s=name, mm=mmt, v=vt, vml=_fmt(v * 1000)), steps, n / v, "M"


def _ph(rng):
    form = rng.randrange(4)
    # A stated [H+] or [OH-] may be anything; a strong acid or base is only named where its own
    # ions dominate water's (>= 1e-5 M), else pH = -log10(c) would be physically wrong.
    lo = 1e-12 if form in (0, 2) else 1e-5
    ct = f"{math.exp(rng.uniform(math.log(lo), math.log(0.1))):.1e}"
    p = -math.log10(float(ct))
    q = _pick(
        rng,
        [
            ["A solution has [H+] = {c} M. What is the pH?", "What is the pH of a solution with [H+] = {c} M?"],
            ["A {c} M solution of HCl (a strong acid, fully dissociated) is prepared. What is its pH?"],
            ["At 25 °C a solution has [OH-] = {c} M. What is the pH?"],
            ["A {c} M solution of NaOH (a strong base) is prepared at 25 °C. What is its pH?"],
        ][form],
        c=ct,
    )
    if form < 2:
        return q, [f"pH = -log10([H+]) = -log10({ct}) = {p:.3f}"], p, ""
    return (
        q,
        [f"pOH = -log10([OH-]) = -log10({ct}) = {p:.3f}", f"pH = 14 - pOH = 14 - {p:.3f} = {14 - round(p, 3):.3f}"],
        14 - p,
        "",
    )


def _kinetic_energy(rng):
    (vt, v), steps = _draw(rng, 0.5, 40), []
    if rng.random() < 0.3:  # a car, its speed in km/h
        (mt, m), (kt, k) = _draw(rng, 600, 3000), _draw(rng, 10, 130)
        q = _pick(rng, ["A {m} kg car travels at {k} km/h. What is its kinetic energy in joules?"], m=mt, k=kt)
        vt, v = _fmt(k / 3.6, 4), k / 3.6
        steps.append(f"v = {kt}/3.6 = {vt} m/s")
    else:
        shown, mt, m, grams = _quantity(rng, steps, "m", ("kg", 0.5, 2000), ("g", 1e-3, 5, 900), p=0.4)
        q = _pick(
            rng,
            ["A {m} g ball is thrown at {v} m/s. What is its kinetic energy in joules?"]
            if grams
            else [
                "A {m} kg object moves at {v} m/s. What is its kinetic energy?",
                "What is the kinetic energy of a {m} kg cart travelling at {v} m/s?",
            ],
            m=shown,
            v=vt,
        )
    steps.append(f"KE = 0.5*m*v^2 = 0.5*{mt}*{vt}^2 = {_fmt(0.5 * m * float(vt) ** 2, 4)} J")
    return q, steps, 0.5 * m * v * v, "J"


def _density(rng):
    rho = math.exp(rng.uniform(math.log(500), math.log(20000)))  # cork-ish to gold-ish, kg/m^3
    form, steps, at = rng.randrange(3), [], ""
    if form == 0:
        (vt, v), unit = _draw(rng, 1e-4, 0.05), "kg/m^3"
        mt, m = _num(rho * v)
        tpl = [
            "A block of mass {m} kg has a volume of {v} m^3. What is its density in kg/m^3?",
            "What is the density, in kg/m^3, of an object with mass {m} kg and volume {v} m^3?",
        ]
    else:
        unit = "g/cm^3"
        if form == 1:
            (vt, v), tpl = _draw(rng, 1, 500), ["A {m} g sample occupies {v} cm^3. What is its density in g/cm^3?"]
        else:
            at, a = _draw(rng, 1, 8)
            v, vt = a**3, _fmt(a**3, 4)
            tpl = ["A solid cube with edges of {a} cm has a mass of {m} g. What is its density in g/cm^3?"]
            steps.append(f"V = a^3 = {at}^3 = {vt} cm^3")
        mt, m = _num(rho / 1000 * v)
    steps.append(f"ρ = m/V = {mt}/{vt} = {_fmt(m / float(vt), 4)} {unit}")
    return _pick(rng, tpl, m=mt, v=vt, a=at), steps, m / v, unit


def _engineering_stress(rng):
    sigma = math.exp(rng.uniform(math.log(5), math.log(1200)))  # MPa: polymers to strong steels
    steps, dt = [], ""
    if rng.random() < 0.35:
        dt, d = _draw(rng, 2, 40)
        area, at = math.pi * d * d / 4, _fmt(math.pi * d * d / 4, 4)
        steps.append(f"A0 = pi*d^2/4 = pi*{dt}^2/4 = {at} mm^2")
        tpl = ["A rod of diameter {d} mm carries a tensile load of {f} kN. What is the engineering stress in MPa?"]
    else:
        (at, area), tpl = (
            _draw(rng, 5, 2000),
            [
                "A tensile load of {f} kN is applied to a specimen with an original cross-sectional area of {a} mm^2. "
                "What is the engineering stress in MPa?",
                "A bar with cross-section {a} mm^2 is pulled with a force of {f} kN. Find the engineering stress in MPa.",
            ],
        )
    ft, f = _num(sigma * area / 1000)
    fn = _fmt(f * 1000)
    steps += [f"F = {ft} kN = {fn} N", f"σ = F/A0 = {fn}/{at} = {_fmt(float(fn) / float(at), 4)} MPa"]
    return _pick(rng, tpl, d=dt, f=ft, a=at), steps, f * 1000 / area, "MPa"


_SOURCES = [("Cu Kα", 0.1541), ("Mo Kα", 0.0711), ("Co Kα", 0.1789), ("Cr Kα", 0.2290)]


def _bragg_diffraction(rng):
    (src, lam), (tht, th) = rng.choice(_SOURCES), _draw(rng, 8, 70)
    form = rng.randrange(4)
    if form == 3:  # solve for the angle
        dt, d = _num(lam / (2 * math.sin(math.radians(th))))
        ans = math.degrees(math.asin(lam / (2 * d)))
        q = (
            f"{src} X-rays (λ = {lam} nm) are diffracted by planes with spacing d = {dt} nm. "
            "At what angle θ, in degrees, is the first-order Bragg reflection?"
        )
        return q, [f"θ = asin(λ/(2*d)) = degrees(asin({lam}/(2*{dt}))) = {_fmt(ans, 4)} deg"], ans, "deg"
    if form == 2:  # solve for the wavelength
        dt, d = _draw(rng, 0.1, 0.5)
        ans = 2 * d * math.sin(math.radians(th))
        q = (
            f"A crystal with interplanar spacing d = {dt} nm gives a first-order Bragg reflection at θ = {tht}°. "
            "What is the X-ray wavelength in nm?"
        )
        return q, [f"λ = 2*d*sin(θ) = 2*{dt}*sin({tht}°) = {_fmt(ans, 4)} nm"], ans, "nm"
    unit, lt = ("Å", _fmt(lam * 10, 4)) if form == 1 else ("nm", str(lam))
    ans = float(lt) / (2 * math.sin(math.radians(th)))
    q = _pick(
        rng,
        [
            "{src} radiation (λ = {lam} {u}) gives a first-order Bragg reflection at θ = {th}°. "
            "What is the interplanar spacing d in {u}?",
            "X-rays of wavelength {lam} {u} are reflected in first order at a Bragg angle of {th}°. "
            "Find the lattice plane spacing in {u}.",
        ],
        src=src,
        lam=lt,
        u=unit,
        th=tht,
    )
    return q, [f"d = λ/(2*sin(θ)) = {lt}/(2*sin({tht}°)) = {_fmt(ans, 4)} {unit}"], ans, unit


_GENERATORS = {s: globals()[f"_{s}"] for s in SKILLS}


def _key(skill: str, question: str) -> str:
    """The identity of a problem: its skill and the numbers it states (phrasing does not matter)."""
    return skill + ":" + ",".join(re.findall(r"[0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?", question))


def split_of(skill: str, question: str) -> str:
    """The one split a problem may ever belong to: a hash of its key, so that splits drawn with any
    seeds and sizes never share a question."""
    return SPLITS[int(hashlib.sha256(_key(skill, question).encode()).hexdigest(), 16) % len(SPLITS)]


def make_problem(skill: str, rng: random.Random, id: str = "") -> Problem:
    """One problem of `skill` drawn with `rng` (whatever its split)."""
    question, steps, answer, unit = _GENERATORS[skill](rng)
    solution = "; ".join(steps) + f". Final answer: {steps[-1].rsplit(' = ', 1)[1]}."
    return Problem(id, DOMAINS[skill], skill, question, solution, answer, unit, *TOLERANCES[skill])


def generate(split: str, n: int | None = None, seed: int = 0, skills: tuple[str, ...] = SKILLS) -> list[Problem]:
    """`n` distinct problems of `split` (default 200/200/100), skills balanced, deterministic in `seed`.

    >>> [p.id for p in generate("test", 2, seed=1)]
    ['stem-test-0000', 'stem-test-0001']
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    n = SPLIT_SIZES[split] if n is None else n
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"stem:{split}:{seed}")
    order = [skills[i % len(skills)] for i in range(n)]
    rng.shuffle(order)
    seen: set[str] = set()
    out = []
    for i, skill in enumerate(order):
        for _ in range(1000):
            p = make_problem(skill, rng, f"stem-{split}-{i:04d}")
            key = _key(skill, p.question)
            if key not in seen and split_of(skill, p.question) == split:
                break
        else:
            raise ValueError(f"could not draw {n} distinct {split} problems of {skill}: the value space is exhausted")
        seen.add(key)
        out.append(p)
    return out
