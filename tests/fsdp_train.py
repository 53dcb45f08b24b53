"""Run by tests/test_fsdp.py under `accelerate launch --config_file tests/fsdp_cpu.yaml` (or alone):
mp_train.py's run (the tiny model, 60 random rows, batch 4), then the distributed type it ran under
and how the trained model's parameters were held, in OUT/state.json. Usage: fsdp_train.py OUT GRAD_ACCUM"""

import json
import sys
from pathlib import Path

from mp_train import rows

from dostream.train import TrainConfig, train

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
