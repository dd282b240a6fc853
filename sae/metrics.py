"""Training metrics: an append-only JSON-lines journal, optionally mirrored to wandb."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sae.io import atomic_write_text


class MetricsLog:
    """metrics.jsonl (one JSON object per line) plus wandb when `wandb_init` is given.

    A kill can tear only the last line; on resume the journal is rewritten atomically with just
    the complete lines from before the checkpoint, so every step appears exactly once.
    """

    def __init__(self, path: Path, wandb_init: dict[str, Any] | None = None) -> None:
        self.path, self.wandb_init = path, wandb_init
        self.fh: Any = None
        self.wandb: Any = None

    def open(self, resume_step: int) -> None:
        kept = []
        if resume_step > 0 and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("step", resume_step) < resume_step:
                    kept.append(line + "\n")
        atomic_write_text(self.path, "".join(kept))
        self.fh = open(self.path, "a")  # noqa: SIM115 - held open for the whole run, closed in close()
        if self.wandb_init is not None:
            import wandb

            self.wandb = wandb.init(**self.wandb_init, resume="allow")

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.fh.write("".join(json.dumps(r) + "\n" for r in rows))
        self.fh.flush()
        if self.wandb is not None:
            flat = {f"{r['sae']}/{k}": v for r in rows for k, v in r.items() if k not in ("sae", "step")}
            self.wandb.log(flat, step=rows[0]["step"])

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
        if self.wandb is not None:
            self.wandb.finish()
