"""What a run writes besides checkpoints: metrics.jsonl and curves.png (console lines: console.py)."""
from __future__ import annotations

import json
import os


class MetricWriter:
  """Appends one JSON object per line to `<workdir>/metrics.jsonl` and redraws `curves.png`."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.plot_path = os.path.join(workdir, "curves.png")

  def truncate_after(self, step: int):
    """Drops lines logged after `step` (written by a run that died before its next checkpoint)."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(self.path, "w") as f:
      f.writelines(rows)

  def write(self, step: int, metrics: dict):
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")

  def read(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def plot(self):
    """Loss and accuracy against step (one accuracy curve per evaluated grid)."""
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    rows = self.read()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("train/loss", ax_loss), ("eval/loss", ax_loss)):
      pts = [(r["step"], r[key]) for r in rows if key in r]
      if pts:
        ax.plot(*zip(*pts), label=key, marker="." if key.startswith("eval") else None)
    acc_keys = sorted({k for r in rows for k in r if k.startswith("eval/accuracy")})
    for key in acc_keys:
      pts = [(r["step"], r[key]) for r in rows if key in r]
      ax_acc.plot(*zip(*pts), marker="o", label=key)
    ax_loss.set(xlabel="step", ylabel="loss", yscale="log")
    ax_acc.set(xlabel="step", ylabel="accuracy")
    for ax in (ax_loss, ax_acc):
      ax.grid(alpha=0.3)
      if ax.has_data():
        ax.legend()
    fig.tight_layout()
    fig.savefig(self.plot_path, dpi=100)
    plt.close(fig)
