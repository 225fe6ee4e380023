"""Loss and eval curves from a run's ``metrics.jsonl``, drawn to a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from softlabels.schemas.errors import UserError

from softlabels.common.plot import pyplot, save_png


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """``(train rows, eval rows)`` of a metrics file."""
    train, evals = [], []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise UserError(f"metrics file {path}: cannot be read ({e.strerror or e})") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        (evals if "eval" in row else train).append(row)
    return train, evals


def plot_metrics(path: str | Path, png: str | Path) -> None:
    """Training loss per step, and held-out CE / KL / top-1 at each eval."""
    plt = pyplot(str(png))
    train, evals = read_metrics(path)
    if not train and not evals:
        raise UserError(f"metrics file {path} holds no rows")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    axes[0].set(xlabel="step", ylabel="training loss", title="training loss")
    steps = [r["step"] for r in evals]
    for key, ax in (("ce", axes[1]), ("kl", axes[1]), ("top1", axes[2])):
        ax.plot(steps, [r["eval"][key] for r in evals], marker="o", label=key)
    axes[1].set(xlabel="step", ylabel="nats", title="held-out CE (true tokens) and KL to teacher")
    axes[1].legend()
    axes[2].set(xlabel="step", ylabel="share of positions", title="top-1 agreement with the teacher")
    save_png(fig, str(png))
