"""Torch-free tokenization and chat templates, for processes that must not import torch
(the API replicas: ``cluster.api``). ``transformers.AutoTokenizer`` imports torch; this
reads the same files of an HF model directory (``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja``) with ``tokenizers`` and ``jinja2``
and gives the engine's token ids (``engine.llm_engine.tokenize`` / ``render_chat``):

    tok = Tokenizer(model_dir)
    ids = tok.encode(tok.render_chat(messages))   # == the engine's ids for that chat

The chat template is rendered as transformers renders it: a sandboxed jinja2
environment with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension,
``raise_exception`` and ``strftime_now``, and the special tokens as variables.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
           "mask_token")  # fmt: skip


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": ..., "lstrip": ...}
        return str(value.get("content"))
    return None if value is None else str(value)


class Tokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        """``OSError`` when the directory has no ``tokenizer.json``."""
        from tokenizers import Tokenizer as Fast

        path = Path(model_dir)
        if not (path / "tokenizer.json").is_file():
            raise OSError(f"no tokenizer.json in {path}")
        self._fast = Fast.from_file(str(path / "tokenizer.json"))
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.special = {k: t for k in SPECIAL if (t := _token_text(config.get(k))) is not None}
        template_file = path / "chat_template.jinja"
        template = config.get("chat_template")
        if template_file.is_file():
            template = template_file.read_text()
        self.chat_template: str | None = template if isinstance(template, str) else None
        self._compiled: Any = None

    def encode(self, text: str) -> list[int]:
        """``text``'s token ids with the special tokens the engine's tokenizer adds."""
        return list(self._fast.encode(text, add_special_tokens=True).ids)

    def render_chat(self, messages: Sequence[dict[str, Any]]) -> str:
        """A conversation as the prompt text (ready for the assistant's turn);
        ``ValueError`` when the model has no chat template."""
        if not self.chat_template:
            raise ValueError("this model has no chat template")
        if self._compiled is None:
            self._compiled = _environment().from_string(self.chat_template)
        return str(self._compiled.render(messages=list(messages), add_generation_prompt=True,
                                         **self.special))  # fmt: skip


def _environment() -> Any:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])  # fmt: skip
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent,
                                                                   ensure_ascii=False)  # fmt: skip
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env
