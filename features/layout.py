"""RunLayout: the one place that spells the paths inside a run directory (`runs/<name>/`).

Every stage below the pipeline takes the paths it needs as arguments; only the pipeline, the CLI and
the viewer ask a `RunLayout` where things are. Moving a file is a change here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STORE_FILE = "features.db"  # the feature store beside an SAE's files (also for SAEs outside a run)
SAE_CFG_FILE = "cfg.json"  # what marks a finished SAE directory (SAE-Lens's format)


def store_in(sae_dir: str | Path) -> Path:
    """The feature store of an SAE directory, inside a run or not."""
    return Path(sae_dir) / STORE_FILE


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run. `root` is `runs/<name>`; nothing is created until a stage writes."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def tokens(self) -> Path:
        return self.root / "tokens.safetensors"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoints" / "state.safetensors"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def saes_dir(self) -> Path:
        return self.root / "saes"

    def sae(self, sae_id: str) -> Path:
        return self.saes_dir / sae_id

    def store(self, sae_id: str) -> Path:
        return store_in(self.sae(sae_id))

    def eval_file(self, sae_id: str) -> Path:
        return self.sae(sae_id) / "eval.json"

    def trained_saes(self) -> list[Path]:
        """SAE directories of this run that finished (their cfg.json is written last)."""
        return sorted(p.parent for p in self.saes_dir.glob(f"*/{SAE_CFG_FILE}"))

    def report(self, sae_id: str) -> Path:
        """Per-SAE labeler report folder."""
        return self.root / "reports" / sae_id

    @property
    def run_report(self) -> Path:
        """Run-level results (directions across layers, lookup by layer)."""
        return self.root / "reports" / "run"

    def export(self, sae_id: str, fmt: str) -> Path:
        return self.root / "exports" / f"{sae_id}-{fmt}"

    @property
    def wandb_dir(self) -> Path:
        return self.root
