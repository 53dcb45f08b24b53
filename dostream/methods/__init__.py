"""Post-training methods of the seed paper's STEM comparison, one self-contained file each.

Every method starts from the same SFT-1 checkpoint (merged into the base weights, so each method
adds a fresh LoRA adapter and GRPO's reference policy is SFT-1 itself) and differs only in how it
turns the verifier's information into training signal:

* `sft1.py`         SFT-1: the clean teacher rows, loss on the oracle solution only.
* `rest.py`         ReST: K samples per prompt, keep verifier-passing ones (<= 1 per group) + replay.
* `grpo.py`         GRPO (Eq. 10-11 of the paper) and its DAPO variant (`dapo=True`).
* `oracle_sft.py`   SFT + oracle corrections: the stream's corrections as direct rows x -> y*.
* `stream_agents.py` the stream of frozen SFT-1 attempts and its two arms (observational, interventional).

`attempts.py` holds what the methods share about acting in the STEM environment (the env with or
without the calculator tool, solution streams, accuracy by skill); the acting itself is the one loop
in `dostream/envs/rollout.py` (batched, exact token ids), which the agent uses too.
`common.py` holds the one training call of the methods that add a fresh adapter on SFT-1
(ReST, oracle-SFT, the stream's arms); the policy-gradient core of GRPO/DAPO is the library's
`dostream/learning/policy_gradient.py`.
"""
