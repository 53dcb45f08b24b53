"""The STEM generator: oracle solutions verify, perturbed answers do not, splits never meet."""

import math
import random
import re

import pytest

from dostream.envs.stem import (
    DOMAINS,
    SKILLS,
    SPLIT_SIZES,
    SPLITS,
    TOLERANCES,
    Problem,
    generate,
    make_problem,
    split_of,
    verify,
)

FINAL = re.compile(r"Final answer: (-?[0-9][0-9.e+-]*)(?: (\S+))?\.$")


def test_skills_and_domains_are_the_design_ones():
    assert set(SKILLS) == {
        "ohm_voltage",
        "ohm_current",
        "electric_power",
        "density",
        "specific_heat",
        "molarity",
        "ph",
        "kinetic_energy",
        "engineering_stress",
        "bragg_diffraction",
    }
    assert set(DOMAINS.values()) == {"physics", "chemistry", "materials"}


@pytest.mark.parametrize("skill", SKILLS)
def test_oracle_solution_verifies_for_many_seeds(skill):
    for seed in range(60):
        p = make_problem(skill, random.Random(f"{skill}:{seed}"), f"p{seed}")
        v = verify(p, p.solution)
        assert v.correct, (p.question, p.solution, p.answer, v)
        m = FINAL.search(p.solution)
        assert m, f"solution must end with 'Final answer: <number> <unit>.': {p.solution!r}"
        assert (m.group(2) or "") == p.unit, (p.solution, p.unit)


@pytest.mark.parametrize("skill", SKILLS)
def test_answer_perturbed_beyond_tolerance_is_incorrect(skill):
    for seed in range(30):
        p = make_problem(skill, random.Random(f"perturb:{skill}:{seed}"))
        tol = max(p.abs_tol, p.rel_tol * abs(p.answer))
        for sign in (1, -1):
            wrong = p.answer + sign * 2.5 * tol
            unit = f" {p.unit}" if p.unit else ""
            v = verify(p, f"{p.solution.rsplit('Final answer:', 1)[0]}Final answer: {wrong:.10g}{unit}.")
            assert not v.correct, (p.solution, wrong, v)
        # ...and a value just inside the tolerance still passes.
        assert verify(p, f"Final answer: {p.answer + 0.9 * tol:.12g}").correct


def test_tolerances_relative_except_ph():
    assert TOLERANCES["ph"] == (0.0, 0.01)
    assert all(TOLERANCES[s] == (0.01, 0.0) for s in SKILLS if s != "ph")


def test_rows_have_the_design_fields_and_sensible_values():
    rows = generate("sft", 300, seed=5)
    assert len({p.id for p in rows}) == 300
    for p in rows:
        d = p.to_json()
        assert list(d) == ["id", "domain", "skill", "question", "solution", "answer", "unit", "rel_tol", "abs_tol"]
        assert d["domain"] == DOMAINS[d["skill"]]
        assert isinstance(d["answer"], float) and math.isfinite(d["answer"])
        assert Problem.from_json(d) == p
        if p.skill == "ph":
            assert 0 < p.answer < 14 and p.unit == ""
        else:
            assert p.answer > 0 and p.unit
        if p.skill == "bragg_diffraction" and p.unit == "nm":
            assert 0.01 < p.answer < 2.0, p.question  # interplanar spacings and X-ray wavelengths


def test_skills_are_balanced_and_phrasings_vary():
    rows = generate("agent", 200, seed=0)
    counts = {s: sum(p.skill == s for p in rows) for s in SKILLS}
    assert set(counts.values()) == {20}
    for skill in SKILLS:
        openings = {" ".join(p.question.split()[:3]) for p in generate("sft", 400, seed=1) if p.skill == skill}
        assert len(openings) >= 2, f"{skill}: one phrasing only"


def test_default_sizes_and_determinism():
    for split in SPLITS:
        assert len(generate(split)) == SPLIT_SIZES[split]
    assert generate("test", 50, seed=7) == generate("test", 50, seed=7)
    assert generate("test", 50, seed=7) != generate("test", 50, seed=8)
    assert generate("test", 0) == []
    with pytest.raises(ValueError, match="unknown split"):
        generate("train", 3)


def test_splits_are_disjoint_even_across_seeds():
    questions = {split: {p.question for seed in (0, 1) for p in generate(split, seed=seed)} for split in SPLITS}
    assert not questions["sft"] & questions["agent"]
    assert not questions["sft"] & questions["test"]
    assert not questions["agent"] & questions["test"]
    for split in SPLITS:
        assert all(split_of(p.skill, p.question) == split for p in generate(split, 100, seed=3))
        assert len({p.question for p in generate(split)}) == SPLIT_SIZES[split]  # no repeats inside a split


def test_oracle_solutions_follow_the_paper_style():
    for p in generate("sft", 50, seed=2):
        first = p.solution.split(";")[0]
        assert first.count(" = ") >= 2, f"formula, substitution and result expected: {p.solution!r}"
        assert p.solution.endswith(".")
