"""Tables and the plot of the GPU suite's records (``suite == "gpu"``) for
``bench/report.py``, which looks them up here. Every builder copes with a record whose
peer failed (no ``raw["peer"]``, a ``peer_error`` instead)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bench.report import Record, Table, fmt, ms, plot_w2_itl, table_w2

ENGINES = (("ours", "kvserve"), ("peer", "HF"))


def table_w1(rec: Record) -> Table:
    raw, r = rec["raw"], rec["ratios"]
    head = ["engine", "wall s", "output tok/s", "total tok/s", "wall / floor"]
    rows = [
        [name, fmt(raw[k]["wall_s"]), fmt(raw[k]["output_tok_s"]), fmt(raw[k]["total_tok_s"]),
         fmt(r.get(f"{k}_wall_over_floor"))]
        for k, name in (("ours", "kvserve"), ("peer", rec["peer"])) if k in raw
    ]  # fmt: skip
    if "peer" in raw:
        p = raw["peer"]
        impl = str(p.get("attn_implementation")).replace("|", "\\|")  # a table cell
        rows[-1][0] += f" ({impl}; whole call {fmt(p.get('call_s'))} s)"
    f = raw["floor"]
    rows.append(
        [f"floor (prefill {fmt(f['prefill_s'])} s + decode {fmt(f['decode_s'])} s)",
         fmt(f["floor_s"]), "", "", "1"]
    )  # fmt: skip
    return head, rows


def table_w3(rec: Record) -> Table:
    raw, r = rec["raw"], rec["ratios"]
    cut = " (cut: a recompute run was estimated too long)" if raw.get("cut") else ""
    head = ["engine", "output tokens", "with KV cache s", "recomputing K/V s", "speedup"]
    rows = [
        [name, f"{raw['output_len_used']}{cut}", fmt(raw[f"{k}_cache_s"]),
         fmt(raw[f"{k}_recompute_s"]), fmt(r.get(f"{k}_cache_speedup"))]
        for k, name in ENGINES if f"{k}_recompute_s" in raw and f"{k}_cache_s" in raw
    ]  # fmt: skip
    return head, rows


def table_w4(rec: Record) -> Table:
    raw, r = rec["raw"], rec["ratios"]
    head = ["engine", "TTFT ms", "forward ms", "MFU"]
    rows = [["kvserve (one step)", ms(raw["ours"]["ttft_s"]), "", fmt(r["ours_mfu"])]]
    if "peer" in raw:
        p = raw["peer"]
        rows.append(["HF", ms(p["ttft_s"]), ms(p["forward_s"]), fmt(r.get("peer_forward_mfu"))])
    rows.append([f"floor ({fmt(raw['prefill_flops'] / 1e12)} TFLOP)", ms(raw["floor_s"]), "", "1"])
    return head, rows


def table_w5(rec: Record) -> Table:
    raw = rec["raw"]
    peak = raw["peak"]
    rows = [
        ["KV pool", f"{raw['num_blocks']} blocks x {raw['block_size']} tokens = "
                    f"{fmt(raw['kv_pool_bytes'] / 2**30)} GiB"],
        ["sessions planned (pool tokens / session tokens)", str(raw["planned_sessions"])],
        ["requests added", str(raw["requests_added"])],
        ["sessions admitted (most running at once)", str(raw["admitted_sessions"])],
        ["held + projected blocks / pool at that peak", fmt(raw["demand_at_peak"])],
        ["most tokens stored / pool tokens", fmt(raw["most_stored"])],
        ["blocks allocated / tokens stored at the peak",
         f"{peak['blocks_allocated']} / {peak['tokens_stored']}"],
        ["preemptions", str(raw["preemptions"])],
        ["KV wasted / allocated", fmt(raw["wasted_fraction"])],
        ["stopped by", f"{raw['stop_reason']} after {raw['steps']} steps ({fmt(raw['wall_s'])} s)"],
    ]  # fmt: skip
    return ["figure", "value"], rows


TABLES: dict[str, Callable[[Record], Table]] = {
    "W1": table_w1,
    "W2": table_w2,
    "W3": table_w3,
    "W4": table_w4,
    "W5": table_w5,
}
PLOTS: dict[str, tuple[str, Callable[[Record, Path], None]]] = {"W2": ("w2-itl", plot_w2_itl)}
