"""``kvserve chat`` (streaming, against a server or an engine in this process) and
``kvserve generate`` (offline completions in this process)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from rich.console import Console

console = Console()


def chat_http(base: str, messages: list[dict[str, str]], model: str | None,
               sampling: dict[str, Any], api_key: str | None) -> str:  # fmt: skip
    """Streams one answer from the server's chat endpoint to the terminal; returns it."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if model is None:
        model = httpx.get(f"{base}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    body = {"model": model, "messages": messages, "stream": True, **sampling}
    parts: list[str] = []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers,
                      timeout=300) as r:  # fmt: skip
        if r.status_code != 200:
            r.read()
            console.print(f"[red]error {r.status_code}:[/red] {r.text}")
            return ""
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                console.print(f"\n[red]error:[/red] {chunk['error']['message']}")
                break
            for choice in chunk.get("choices", []):
                piece = choice["delta"].get("content") or ""
                parts.append(piece)
                console.print(piece, end="", markup=False, highlight=False)
    console.print()
    return "".join(parts)


def _chat_local(engine: Any, messages: list[dict[str, str]], params: Any) -> str:
    """Streams one answer from an in-process engine (add_request + step)."""
    rid = engine.add_request(engine.apply_chat_template(messages), params)
    shown = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid:
                text = out.outputs[0].text
                console.print(text[len(shown) :], end="", markup=False, highlight=False)
                shown = text
    console.print()
    return shown


def cmd_chat(args: argparse.Namespace) -> int:
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature,
                "top_p": args.top_p, "seed": args.seed}  # fmt: skip
    if args.url:

        def answer(msgs: list[dict[str, str]]) -> str:
            return chat_http(args.url.rstrip("/"), msgs, None, sampling, args.api_key)
    else:
        from engine import LLM, SamplingParams

        llm = LLM(args.model, device=args.device,
                  **({"max_model_len": args.max_model_len} if args.max_model_len else {}))  # fmt: skip
        params = SamplingParams(**sampling)

        def answer(msgs: list[dict[str, str]]) -> str:
            return _chat_local(llm.engine, msgs, params)

    if args.text:
        return 0 if answer([{"role": "user", "content": " ".join(args.text)}]) else 1
    history: list[dict[str, str]] = []
    console.print("[dim]an empty line or Ctrl-D ends the conversation[/dim]")
    while True:
        try:
            line = console.input("[bold]you>[/bold] ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        console.print("[bold]kvserve>[/bold] ", end="")
        history.append({"role": "assistant", "content": answer(history)})
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams

    t0 = time.perf_counter()
    kw: dict[str, Any] = {"device": args.device}
    if args.max_model_len:
        kw["max_model_len"] = args.max_model_len
    llm = LLM(args.model, **kw)
    load_s = time.perf_counter() - t0
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=args.seed)  # fmt: skip
    t0 = time.perf_counter()
    outs = llm.generate(args.text, params)
    gen_s = time.perf_counter() - t0
    ntok = 0
    for out in outs:
        sample = out.outputs[0]
        ntok += len(sample.token_ids)
        console.print(f"[bold]{out.prompt}[/bold]", end="")
        console.print(sample.text, markup=False, highlight=False)
        console.print(
            f"[dim]({len(sample.token_ids)} tokens, finish: {sample.finish_reason})[/dim]"
        )
    console.print(f"[dim]loaded in {load_s:.1f} s; {ntok} tokens in {gen_s:.2f} s "
                  f"({ntok / gen_s:.1f} tok/s)[/dim]")  # fmt: skip
    return 0
