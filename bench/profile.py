"""Where the served processes spend their Python time under load: py-spy, sampled per
process while ``bench.router`` drives the served load.

``Profiler(groups, seconds, out_dir)`` attaches ``py-spy record --gil --nonblocking`` to
the main pid of every process group found (``CPUSampler.group``: Serve proxy, router,
engine replica) and writes one raw folded-stack file per process. ``summarize`` turns a
file into the frames holding the GIL most often: inclusive (the frame is anywhere on
the stack) and self (the frame is the top) shares of the samples. ``--gil`` keeps only
the samples of the thread that holds the GIL, so the shares say what serializes the
process's Python work.

Off when py-spy is missing or cannot attach (it needs ptrace); the bench runs without it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:12)`` → ``func (file.py)``: one entry per function."""
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    return f"{m.group(1)} ({Path(m.group(2)).name})"


def summarize(raw: Path, top: int = 25) -> dict[str, Any]:
    """The ``top`` frames by inclusive and by self share of the samples in one py-spy raw
    (folded) file; frames are functions (line numbers dropped)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        total += n
        for f in set(frames):
            inclusive[f] += n
        if frames:
            own[frames[-1]] += n

    def share(c: Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(100.0 * n / max(total, 1), 1)) for f, n in c.most_common(top)]

    return {"samples": total, "inclusive_pct": share(inclusive), "self_pct": share(own)}


class Profiler:
    """Records every process of the wanted groups for ``seconds``, starting ``delay_s``
    after ``start()``; ``join()`` waits and returns ``{group: summary}`` (and writes the
    raw files and ``profile.json`` under ``out_dir``)."""

    def __init__(
        self,
        group_of: Callable[[str], str | None],
        out_dir: Path,
        seconds: float = 10.0,
        delay_s: float = 3.0,
        groups: tuple[str, ...] = ("serve-proxy", "replica-router", "replica-engine"),
    ) -> None:
        self.group_of = group_of
        self.out_dir = Path(out_dir)
        self.seconds = seconds
        self.delay_s = delay_s
        self.groups = groups
        self.exe = shutil.which("py-spy") or shutil.which(
            "py-spy", path=str(Path(sys.executable).parent)
        )
        self.error: str | None = None if self.exe else "py-spy not found"
        self._files: dict[str, list[Path]] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _targets(self) -> list[tuple[int, str]]:
        import psutil

        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            g = self.group_of(" ".join(p.info["cmdline"] or []))
            if g in self.groups:
                found.append((p.pid, g))
        return found

    def _run(self) -> None:
        assert self.exe is not None
        time.sleep(self.delay_s)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        procs = []
        for pid, g in self._targets():
            out = self.out_dir / f"{g}-{pid}.txt"
            cmd = [self.exe, "record", "-p", str(pid), "-d", str(int(self.seconds)), "-r", "100",
                   "-f", "raw", "--gil", "--nonblocking", "-o", str(out)]  # fmt: skip
            procs.append((g, out, subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.PIPE)))  # fmt: skip
        for g, out, proc in procs:
            _, err = proc.communicate(timeout=self.seconds + 60)
            if proc.returncode == 0 and out.exists():
                self._files.setdefault(g, []).append(out)
            else:
                self.error = (err or b"").decode(errors="replace").strip()[-300:]

    def start(self) -> Profiler:
        if self.exe:
            self._thread.start()
        return self

    def join(self) -> dict[str, Any]:
        if not self.exe:
            return {"error": self.error}
        self._thread.join()
        result: dict[str, Any] = {
            g: [summarize(f) | {"file": f.name} for f in files] for g, files in self._files.items()
        }
        if self.error:
            result["error"] = self.error
        (self.out_dir / "profile.json").write_text(json.dumps(result, indent=1))
        return result
