"""The ``kvserve`` command line.

``kvserve generate PROMPT...`` and ``kvserve chat MESSAGE`` run the engine offline on
the default model (or ``--model``); the serving commands arrive with the cluster.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from rich.console import Console


def _engine_kwargs(args: argparse.Namespace) -> dict[str, object]:
    kw: dict[str, object] = {"device": args.device}
    if args.max_model_len:
        kw["max_model_len"] = args.max_model_len
    return kw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvserve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine start-up")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("generate", "complete prompts"), ("chat", "answer one chat message")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("text", nargs="+", help="prompt(s) or the chat message")
        p.add_argument(
            "--model",
            default=None,
            help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)",
        )
        p.add_argument("--device", default="auto")
        p.add_argument("--max-tokens", type=int, default=64)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--max-model-len", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    from engine import LLM, SamplingParams

    console = Console()
    t0 = time.perf_counter()
    llm = LLM(args.model, **_engine_kwargs(args))  # type: ignore[arg-type]
    load_s = time.perf_counter() - t0
    try:
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            max_tokens=args.max_tokens,
            seed=args.seed,
        )
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    t0 = time.perf_counter()
    if args.cmd == "chat":
        outs = llm.chat([{"role": "user", "content": " ".join(args.text)}], params)
    else:
        outs = llm.generate(args.text, params)
    gen_s = time.perf_counter() - t0
    ntok = 0
    for out in outs:
        sample = out.outputs[0]
        ntok += len(sample.token_ids)
        if args.cmd == "generate":
            console.print(f"[bold]{out.prompt}[/bold]", end="")
        console.print(sample.text, markup=False, highlight=False)
        console.print(
            f"[dim]({len(sample.token_ids)} tokens, finish: {sample.finish_reason})[/dim]"
        )
    console.print(
        f"[dim]loaded in {load_s:.1f} s; {ntok} tokens in {gen_s:.2f} s ({ntok / gen_s:.1f} tok/s)[/dim]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
