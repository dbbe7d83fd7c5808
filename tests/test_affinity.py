"""Prefix-cache affinity (cluster.placement.affinity): the API processes hash prompts
exactly as the engine hashes the blocks it caches, without torch (``engine.tokenizer``),
and ``rank`` prefers the replica holding the prefix only while its load stays within the
slack."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from cluster.placement.affinity import PromptHasher, leading_hits, prompt_prefix, rank, short
from engine import SamplingParams


def test_api_hashes_equal_what_the_engine_caches(smollm2_llm: Any, smollm2_dir: Any) -> None:
    """A chat and a text prompt run through the engine; the API's hasher, built from
    the engine's ``info``, finds every full block of both in the engine's cache."""
    eng = smollm2_llm.engine
    info = {"model_dir": str(eng.model_dir), "block_size": eng.args.block_size,
            "prefix_key": eng.prefix_key.hex()}  # fmt: skip
    hasher = PromptHasher(info)
    chat = {"messages": [{"role": "system", "content": "You are terse. " * 8},
                         {"role": "user", "content": "Name three rivers of Europe."}]}  # fmt: skip
    text = {"prompt": "The history of the printing press begins in the fifteenth century " * 6}
    params = SamplingParams(temperature=0, max_tokens=2)
    smollm2_llm.generate([eng.apply_chat_template(chat["messages"]), text["prompt"]], params)
    held = {short(h) for h in eng.prefix_hashes(4096)}
    for req in (chat, text):
        ids = hasher.token_ids(req)
        prefix = hasher.prefix(ids)
        assert len(prefix) == len(ids) // eng.args.block_size >= 2
        assert leading_hits(prefix, held) == len(prefix)
    assert hasher.token_ids({"prompt": [5, 6, 7]}) == [5, 6, 7]
    # Another key (another model directory) hashes differently: no false hits.
    other = prompt_prefix(hasher.token_ids(text), eng.args.block_size, b"another model")
    assert leading_hits(other, held) == 0


TORCH_FREE = """
import sys
from cluster.api.ingress import ApiIngress
from cluster.placement.affinity import PromptHasher
hasher = PromptHasher({"model_dir": sys.argv[1], "block_size": 16, "prefix_key": "00"})
print(hasher.token_ids({"messages": [{"role": "user", "content": "w5 w6"}]}))
print(hasher.token_ids({"prompt": "w7 w8 w9"}))
assert "torch" not in sys.modules and "transformers" not in sys.modules, "torch in the API"
print("torch-free")
"""


def test_the_api_tokenizes_like_the_engine_without_torch(tiny_dirs: dict[str, Any],
                                                         smollm2_llm: Any) -> None:  # fmt: skip
    """``engine.tokenizer`` gives the engine's ids for texts and chats (SmolLM2's
    template; a tiny model's), and a process that imports the API ingress and loads a
    tokenizer has no torch in ``sys.modules``."""
    import subprocess
    import sys

    from engine import LLM
    from engine.tokenizer import Tokenizer

    chats = [[{"role": "user", "content": "Name three rivers of Europe."}],
             [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}]]  # fmt: skip
    texts = ["The printing press, 1440.", "  spaces and\nnew lines ", "emoji 🙂 and 中文"]
    for eng in (smollm2_llm.engine, LLM(tiny_dirs["llama3"], device="cpu").engine):
        tok = Tokenizer(eng.model_dir)
        for text in texts:
            assert tok.encode(text) == eng.tokenize(text), text
        for chat in chats:
            assert tok.render_chat(chat) == eng.apply_chat_template(chat)
    done = subprocess.run([sys.executable, "-c", TORCH_FREE, str(tiny_dirs["llama3"])],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "torch-free" in done.stdout, done.stdout + done.stderr[-2000:]


def test_leading_hits_stop_at_the_first_miss() -> None:
    assert leading_hits([1, 2, 3, 4], {1, 2, 4}) == 2
    assert leading_hits([9, 1], {1}) == 0
    assert leading_hits([], {1}) == 0


def test_rank_prefers_the_prefix_within_the_slack() -> None:
    loads = {"a": 0, "b": 3, "c": 20}
    hit = {"a": 0, "b": 4, "c": 9}
    order = rank(list(loads), loads.__getitem__, hit.__getitem__, slack=8)
    assert order[0] == "b"  # c holds more but is 20 requests busier than a
    assert sorted(order) == ["a", "b", "c"]
    assert rank(list(loads), loads.__getitem__, lambda r: 0, slack=8)[0] == "a"
    assert rank(list(loads), loads.__getitem__, hit.__getitem__, slack=30)[0] == "c"


@given(st.dictionaries(st.sampled_from("abcdef"),
                       st.tuples(st.integers(0, 40), st.integers(0, 10)), min_size=1),
       st.floats(0, 16))  # fmt: skip
def test_rank_properties(reps: dict[str, tuple[int, int]], slack: float) -> None:
    def load(r: str) -> float:
        return float(reps[r][0])

    def hits(r: str) -> int:
        return reps[r][1]

    order = rank(list(reps), load, hits, slack)
    assert sorted(order) == sorted(reps)
    least = min(map(load, reps))
    first = order[0]
    assert load(first) <= least + slack
    near = [r for r in reps if load(r) <= least + slack]
    if any(hits(r) for r in near):
        assert hits(first) == max(hits(r) for r in near)
    else:
        assert load(first) == least
    rest = order[1:]
    assert [load(r) for r in rest] == sorted(load(r) for r in rest)
