"""Run by tests/test_multiprocess.py under `accelerate launch` (or alone): train the tiny model on
60 random rows, batch 4, and leave the adapter and metrics in OUT, and (main process) the
distributed type it ran under and how the trained parameters were held in OUT/state.json.
Usage: mp_train.py OUT GRAD_ACCUM"""

import json
import random
import sys
from pathlib import Path

from dostream.train import TrainConfig, train


def rows(n: int = 60, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(1, 1000) for _ in range(rng.randrange(6, 20))]
        out.append({"input_ids": ids, "labels": [t if rng.random() < 0.6 else -100 for t in ids]})
    return out


if __name__ == "__main__":
    from accelerate.state import PartialState

    out, accum = Path(sys.argv[1]), int(sys.argv[2])
    cfg = TrainConfig(
        model="tiny",
        view="interventional",
        batch_size=4,
        grad_accum=accum,
        epochs=1,
        lr=1e-2,
        precision="fp32",
        progress=False,
        save_every=1000,
        group_by_length=False,
        micro_batch_tokens=0,
    )
    result = train(rows(), cfg, out, pad_id=0)
    state = PartialState()
    kinds = sorted({type(p).__name__ for p in result.model.parameters()})
    if state.is_main_process:
        (out / "state.json").write_text(json.dumps({"distributed_type": str(state.distributed_type), "params": kinds}))
