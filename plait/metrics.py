"""Where a run's numbers go: `metrics.jsonl` (one JSON object per row), TensorBoard, and a loss-curve PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    """Training rows carry `step`, `loss`, `lr`, `grad_norm`, `tokens` (the step's, padding aside),
    `tokens_per_s`, ...; eval rows `step` and `eval_*`."""

    def __init__(self, output_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        """A fresh log, or with `resume_step` the existing one cut after that step, so a resumed run
        reads as one clean run."""
        self.path = output_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path, skip_partial=True) if r.get("step", 0) <= resume_step]
        self._file = open(self.path, "w")
        for row in kept:
            self._file.write(json.dumps(row) + "\n")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events a killed run logged after its last checkpoint
            purge = resume_step + 1 if resume_step is not None else None
            self._tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=purge)

    def log(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path, skip_partial: bool = False) -> list[dict]:
    """Rows of a metrics.jsonl; `skip_partial` drops a last line cut short by a killed process."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if not (skip_partial and i == len(lines) - 1):
                raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return rows


def plot_loss_curve(metrics_path: Path, png_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
