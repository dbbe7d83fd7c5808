"""Regenerates ``docs/benchmarks.md`` (and its plots) from ``bench/results/*.json``.

Opens with one table: the newest record of each workload family (``W2`` for ``W2``,
``W2-eager``, ...) per device, with its ratio to the floor and to the peer and a link
to the record. Then, per device kind ("CPU", "GPU") and device, the details of those
records (one table per workload), and a line per other variant with its link; the
history stays in ``bench/results``. Table and plot builders are
registered per workload id in ``TABLES`` and ``PLOTS``; records of the GPU suite
(``suite == "gpu"``) take theirs from ``bench/report_gpu.py``. A workload without a
builder gets a table of its ratios only. Run alone:
``python -m bench.report [--results DIR] [--doc PATH]``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, RESULTS_DIR

Record = dict[str, Any]
Table = tuple[list[str], list[list[str]]]
DOCS_PATH = REPO_ROOT / "docs" / "benchmarks.md"
SECTIONS = {"cpu": "CPU", "cuda": "GPU"}
NOTES = {
    "cpu": "Figures are one run on a shared {count}-core machine: absolute times are noisy; "
    "the claims are the ratios, ours and the peer measured in the same run.",
    "cuda": "Figures are one run on {count} × {name}; ratios compare ours and the peer from the same run.",
}


def load_latest(results_dir: Path = RESULTS_DIR) -> dict[tuple[str, str], Record]:
    """The newest record (by ``timestamp``) per (device slug, workload)."""
    latest: dict[tuple[str, str], Record] = {}
    for path in sorted(results_dir.glob("*.json")):
        rec = json.loads(path.read_text())
        rec["_path"] = path
        key = (rec["device"]["slug"], rec["workload"])
        if key not in latest or rec["timestamp"] > latest[key]["timestamp"]:
            latest[key] = rec
    return latest


# Workloads whose name has a ``-`` but that are workloads of their own, not variants.
OWN_FAMILIES = {"W5-paging"}


def family(workload: str) -> str:
    """A workload's family: its name before the first ``-`` (``W2-eager`` → ``W2``), or the
    whole name of a workload in ``OWN_FAMILIES`` and of its variants (``W5-paging-fp8``)."""
    for own in OWN_FAMILIES:
        if workload == own or workload.startswith(own + "-"):
            return own
    return workload.split("-")[0]


def headline(latest: dict[tuple[str, str], Record]) -> dict[tuple[str, str], Record]:
    """The newest record per (device, family), the family's own name first when it is as
    new as a variant (same date)."""
    out: dict[tuple[str, str], Record] = {}
    for (slug, wl), rec in latest.items():
        key = (slug, family(wl))
        have = out.get(key)
        rank = (rec["date"], wl == key[1], rec["timestamp"])
        if have is None or rank > (have["date"], have["workload"] == key[1], have["timestamp"]):
            out[key] = rec
    return out


def _pick(ratios: dict[str, Any], floor: bool) -> str:
    """The first ratio against the floor (``floor``), or the first other one."""
    for k, x in ratios.items():
        if ("floor" in k) == floor and isinstance(x, int | float):
            return f"`{k}` {fmt(x)}"
    return "-"


def summary(heads: dict[tuple[str, str], Record], doc_path: Path) -> list[str]:
    """The opening table: one row per (device, workload family)."""
    rows = []
    for (_, _), rec in sorted(heads.items(), key=lambda kv: (kv[1]["device"]["kind"], kv[0])):
        dev = rec["device"]
        path = Path(rec["_path"])
        rel = Path("..") / path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
        rows.append([f"{dev['name']} ×{dev['count']}", f"`{rec['workload']}`", rec["date"],
                     _pick(rec["ratios"], True), _pick(rec["ratios"], False),
                     f"[{path.name}]({rel.as_posix()})"])  # fmt: skip
    return markdown_table(["device", "workload", "date", "vs floor", "vs peer", "record"], rows)


def fmt(x: Any, digits: int = 3) -> str:
    """A figure with ``digits`` significant digits; ``-`` for missing or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, int | float):
        return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"
    return str(x)


def ms(x: float) -> str:
    return fmt(x * 1e3)


# --- tables ---------------------------------------------------------------------------------
def table_w1(rec: Record) -> Table:
    raw = rec["raw"]
    head = ["engine", "wall s", "output tok/s", "total tok/s", "wall / floor"]
    rows = [
        [name, fmt(raw[k]["wall_s"]), fmt(raw[k]["output_tok_s"]), fmt(raw[k]["total_tok_s"]),
         fmt(rec["ratios"][f"{k}_wall_over_floor"])]
        for k, name in (("ours", "kvserve"), ("peer", rec["peer"]))
    ]  # fmt: skip
    rows.append(["floor", fmt(raw["floor_s"]), "", "", "1"])
    return head, rows


def table_w2(rec: Record) -> Table:
    raw = rec["raw"]
    head = [
        "engine",
        "TTFT ms",
        "ITL median ms",
        "ITL p99 ms",
        "decode tok/s",
        "ITL median / floor",
    ]
    rows = [
        [name, ms(raw[k]["ttft_s"]), ms(raw[k]["itl"]["median"]), ms(raw[k]["itl"]["p99"]),
         fmt(raw[k]["decode_tok_s"]), fmt(rec["ratios"].get(f"{k}_itl_median_over_floor"))]
        for k, name in (("ours", "kvserve"), ("peer", rec["peer"])) if k in raw
    ]  # fmt: skip
    rows.append(
        ["floor (mean)", "", ms(raw["floor_itl_mean_s"]), "", fmt(1 / raw["floor_itl_mean_s"]), "1"]
    )
    return head, rows


def table_w3(rec: Record) -> Table:
    raw, r = rec["raw"], rec["ratios"]
    head = ["engine", "with KV cache s", "recomputing K/V s", "speedup from the cache"]
    rows = [
        [
            "kvserve",
            fmt(raw["ours_cache_s"]),
            fmt(raw["ours_recompute_s"]),
            fmt(r["ours_cache_speedup"]),
        ],
        [
            rec["peer"],
            fmt(raw["peer_cache_s"]),
            fmt(raw["peer_recompute_s"]),
            fmt(r["peer_cache_speedup"]),
        ],
    ]
    return head, rows


TITLES = {
    "FP8": "FP8 KV cache: agreement with the bf16 cache, capacity",
    "W1": "W1 offline mix",
    "W2": "W2 batch-1 latency",
    "W3": "W3 what the cache buys",
    "W4": "W4 prefill",
    "W5": "W5 capacity",
    "W5-paging": "W5-paging: sessions held, paged vs contiguous slots",
    "W9": "W9 ShareGPT offline throughput (1000 requests at once)",
    "W10": "W10 multi-turn conversations: the host-memory KV tier on vs off",
}
TABLES: dict[str, Callable[[Record], Table]] = {"W1": table_w1, "W2": table_w2, "W3": table_w3}


def markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def describe_config(cfg: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in cfg.items())


# --- plots ---------------------------------------------------------------------------------------
def plot_w2_itl(rec: Record, path: Path) -> None:
    """Per-token latency (ms) over the decode steps for ours, the peer and the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = rec["raw"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for key, label in (("ours", "kvserve"), ("peer", rec["peer"])):
        if key not in raw:
            continue
        ax.plot([x * 1e3 for x in raw[key]["itl_s"]], label=label, linewidth=1)
    ax.plot(
        [x * 1e3 for x in raw["floor_itl_s"]],
        label="floor (copy rate)",
        linestyle="--",
        color="grey",
    )
    ax.set_xlabel("decode step")
    ax.set_ylabel("inter-token latency (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"W2 batch-1 ITL, {rec['device']['name']} ({rec['date']}, {short_sha(rec)})")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS: dict[str, tuple[str, Callable[[Record, Path], None]]] = {"W2": ("w2-itl", plot_w2_itl)}


def short_sha(rec: Record) -> str:
    sha = rec["commit"].get("sha") or "unknown"
    return sha[:10] + ("+dirty" if rec["commit"].get("dirty") else "")


# --- the document ---------------------------------------------------------------------------------
def render(latest: dict[tuple[str, str], Record], img_dir: Path, doc_path: Path) -> str:
    """The markdown text; writes the plots under ``img_dir`` (linked relative to ``doc_path``)."""
    out = [
        "# Benchmarks",
        "",
        "Generated by `bench/report.py` from `bench/results/*.json` (the newest record per device "
        "and workload); never edit a number here by hand. The protocol is in BENCHMARKS.md. "
        "Ratios named `X_over_Y` are X / Y.",
    ]
    heads = headline(latest)
    out += ["", "## Latest, per device and workload", "", *summary(heads, doc_path)]
    shown = {id(r) for r in heads.values()}
    by_kind: dict[str, dict[str, list[Record]]] = {}
    for (slug, _), rec in sorted(heads.items()):
        by_kind.setdefault(rec["device"]["kind"], {}).setdefault(slug, []).append(rec)
    for kind, devices in sorted(by_kind.items()):
        out += ["", f"## {SECTIONS.get(kind, kind)}"]
        for recs in devices.values():
            dev = recs[0]["device"]
            out += [
                "",
                f"### {dev['name']} ({dev['count']} {'cores' if kind == 'cpu' else 'devices'})",
                "",
            ]
            out.append(NOTES.get(kind, "").format(**dev))
            for rec in sorted(recs, key=lambda r: str(r["workload"])):
                out += render_workload(rec, img_dir, doc_path)
            others = sorted((r for (s, _), r in latest.items()
                             if s == dev["slug"] and id(r) not in shown),
                            key=lambda r: str(r["workload"]))  # fmt: skip
            if others:
                out += ["", "#### Other runs (variants and tuning runs; their records)", ""]
                out += [f"- `{r['workload']}` ({r['date']}): `{Path(r['_path']).name}`"
                        for r in others]  # fmt: skip
    return "\n".join(out) + "\n"


def render_workload(rec: Record, img_dir: Path, doc_path: Path) -> list[str]:
    wl = rec["workload"]
    v = rec["versions"]
    c = rec["ceilings"]
    out = [
        "",
        f"#### {TITLES.get(wl, wl)}",
        "",
        f"{rec['date']}, commit `{short_sha(rec)}`, torch {v.get('torch')}, transformers "
        f"{v.get('transformers')}. Peer: {rec.get('peer', '-')}. Config: {describe_config(rec['config'])}. "
        + (
            f"Ceilings measured in the run: copy {fmt(c['copy_bytes_per_s'] / 1e9)} GB/s (read + write), "
            f"{c['dtype']} matmul {fmt(c['matmul_flop_per_s'] / 1e9)} GFLOP/s."
            if c
            else "No ceilings: this record is not a timing."
        ),
        "",
    ]
    if "peer_error" in rec:
        out += [f"The peer failed: `{rec['peer_error']}`", ""]
    tables, plots = builders(rec)
    builder = tables.get(wl)
    if builder is not None:
        out += markdown_table(*builder(rec))
        out.append("")
    out += markdown_table(
        ["ratio", "value"], [[f"`{k}`", fmt(x)] for k, x in rec["ratios"].items()]
    )
    if wl in plots:
        stem, plot = plots[wl]
        path = img_dir / f"{rec['device']['slug']}-{stem}.png"
        plot(rec, path)
        rel = path.relative_to(doc_path.parent) if path.is_relative_to(doc_path.parent) else path
        out += ["", f"![{TITLES.get(wl, wl)}]({rel.as_posix()})"]
    return out


def builders(
    rec: Record,
) -> tuple[
    dict[str, Callable[[Record], Table]], dict[str, tuple[str, Callable[[Record, Path], None]]]
]:
    """The table and plot builders of ``rec``'s suite."""
    if rec.get("suite") == "gpu":
        from bench import report_gpu  # imported here: it imports this module

        return report_gpu.TABLES, report_gpu.PLOTS
    return TABLES, PLOTS


def write_report(results_dir: Path = RESULTS_DIR, doc_path: Path = DOCS_PATH) -> Path:
    """Regenerates ``doc_path`` and its plots (in ``img/`` beside it) from ``results_dir``."""
    latest = load_latest(results_dir)
    text = render(latest, doc_path.parent / "img", doc_path)
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text(text)
    return doc_path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.report", description=(__doc__ or "").split("\n")[0]
    )
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="records to read (*.json)")
    p.add_argument("--doc", type=Path, default=DOCS_PATH, help="markdown to write (img/ beside it)")
    args = p.parse_args(argv)
    print(write_report(args.results, args.doc))


if __name__ == "__main__":
    main()
