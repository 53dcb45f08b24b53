"""The engine interface (`serve/engine.py`): dostream's own batcher is an `Engine`, and
`--engine-arg` is checked when the config is made. vLLM itself: tests/serve/test_vllm_engine.py."""

from __future__ import annotations

import pytest

from dostream.serve.app import ServeConfig
from dostream.serve.batcher import Batcher, ModelSlot
from dostream.serve.engine import Engine


def test_the_batcher_is_an_engine(tok, tmp_path):
    from dostream.models import tiny_model
    from dostream.serve.store import ServeStore

    assert isinstance(Batcher(ModelSlot(tiny_model()), tok, ServeStore.open_dir(tmp_path)), Engine)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        ServeConfig(store=str(tmp_path), engine="vllm", engine_arg=("oops",))
    with pytest.raises(ValueError, match="only with --engine vllm"):
        ServeConfig(store=str(tmp_path), engine_arg=("enforce_eager=true",))
