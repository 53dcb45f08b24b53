"""The airline environment: tau2-bench's airline policy, withheld, graded by predicates written from it
(`dostream/envs/airline.py`)."""

from dostream.envs import airline
from dostream.envs.airline import POLICY, AirlineEnv, Situation, allowed, items, situations, split_of
from dostream.envs.base import Episode
from dostream.envs.registry import env_spec
from dostream.memory.distill import cases


def sit(
    request,
    membership="regular",
    cabin="economy",
    insurance=False,
    recent=False,
    cancelled=False,
    reason="change of plan",
):
    return Situation(request, membership, cabin, insurance, recent, cancelled, reason)


def test_predicates_follow_the_policy():
    # Cases read off policy.md by hand, one per clause.
    table = [
        (sit("modify", cabin="basic economy", membership="gold"), False),  # basic economy cannot be modified
        (sit("modify", cabin="economy"), True),
        (sit("cancel"), False),  # none of the four conditions
        (sit("cancel", recent=True), True),  # booked within the last 24 hrs
        (sit("cancel", cancelled=True), True),  # cancelled by airline
        (sit("cancel", cabin="business"), True),  # a business flight
        (sit("cancel", insurance=True, reason="health"), True),  # insured, a covered reason
        (sit("cancel", insurance=True, reason="change of plan"), False),  # insured, a reason it does not cover
        (sit("cancel", insurance=False, reason="weather"), False),
        (sit("compensate"), False),  # regular, no insurance, economy
        (sit("compensate", membership="silver"), True),
        (sit("compensate", insurance=True), True),
        (sit("compensate", cabin="business"), True),
        (sit("free_bag", cabin="basic economy"), False),  # regular: 0 free for basic economy
        (sit("free_bag", cabin="basic economy", membership="silver"), True),
        (sit("add_insurance", membership="gold", cabin="business"), False),
        (sit("remove_bag", membership="gold"), False),
    ]
    assert [allowed(s) for s, _ in table] == [want for _, want in table]


def test_the_world_answers_with_the_verdict_and_the_policy_line():
    env = AirlineEnv()
    ep = Episode(env, sit("compensate"))
    assert [s.author for s in ep.reset()] == ["context", "protocol", "user", "protocol"]
    assert "compensat" not in ep.segments[0].text  # the rules are withheld: the context names none
    r = ep.step("Yes, of course.\n")
    assert not r.info["success"] and r.segments[-1].author == "user"
    assert r.segments[-1].text == "No. " + POLICY["compensate"] + "\n"
    # what memory distils from the episode is that line: a correction, the world's own words
    [case] = cases(ep.to_stream())
    assert case.kind == "correction" and POLICY["compensate"] in case.text
    r = AirlineEnv()
    r.reset(sit("free_bag", membership="gold", cabin="basic economy"))
    assert r.step("Yes\n").segments[-1].text == (
        "Yes. If the booking user is a gold member: 2 free checked bag for each basic economy passenger.\n"
    )


def test_held_out_situations_are_never_acted_on_and_half_are_allowed():
    train, held = items("train", 200, 0), items("heldout", 200, 0)
    assert {split_of(s) for s in train} == {"train"} and {split_of(s) for s in held} == {"heldout"}
    assert not {s.id for s in train} & {s.id for s in held}
    assert 0.4 < sum(map(allowed, held)) / len(held) < 0.6
    assert {s.request for s in train} == set(airline.REQUESTS)
    assert len(situations()) == len({s.id for s in situations()})
    spec = env_spec("airline", 0)
    assert spec.items("train", 5, 1) == items("train", 5, 1) and isinstance(spec.make_env(), AirlineEnv)
