"""What a run shows while it trains: ``metrics.csv``, TensorBoard, a progress bar, the loss plot."""

from __future__ import annotations

import csv
from pathlib import Path


class MetricsLog:
    """``metrics.csv`` (appended across resumes, rows past the resumed step dropped) and TensorBoard.

    ``fields`` are the CSV columns (``step`` first); numeric values other than ``step`` and ``epoch``
    also go to TensorBoard under ``train/<field>``.
    """

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool, fields: list[str]) -> None:
        self.enabled = enabled
        self.fields = fields
        self.path = run_dir / "metrics.csv"
        if not enabled:
            return
        rows = []
        if resume_step and self.path.exists():
            with self.path.open() as fh:
                rows = [{k: r.get(k, "") for k in fields} for r in csv.DictReader(fh)
                        if int(r["step"]) <= resume_step]
        with self.path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.fields)
            writer.writeheader()
            writer.writerows(rows)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(run_dir / "tensorboard", purge_step=resume_step + 1 if resume_step else None)

    def log(self, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.fields).writerow(row)
        for key, value in row.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and value == value:
                self.tb.add_scalar(f"train/{key}", value, row["step"])

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.enabled:
            self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


def plot_loss_curve(metrics_csv: Path, out_png: Path, title: str = "loss") -> Path:
    """The loss (and any validation column) against the step, as a PNG beside the numbers."""
    from matplotlib.figure import Figure

    with metrics_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    steps = [int(r["step"]) for r in rows]
    losses = [float(r["loss"]) for r in rows]
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(steps, losses, lw=1.2, label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    val = {k: [(s, float(r[k])) for s, r in zip(steps, rows, strict=True) if r[k] not in ("", "nan")]
           for k in (rows[0] if rows else {}) if k.startswith("val_")}
    val = {k: pts for k, pts in val.items() if pts}
    if val:  # validation values on a second axis
        twin = ax.twinx()
        for key, pts in val.items():
            twin.plot(*zip(*pts, strict=True), marker="o", lw=1, color="tab:orange", label=key)
        twin.set_ylabel(", ".join(val))
        twin.legend(loc="upper right", fontsize="small")
    ax.set_title(f"{title} ({metrics_csv.parent.name})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    return out_png


def progress_bar(total: int, initial: int, enabled: bool, desc: str):  # noqa: ANN201 - tqdm
    """A tqdm bar (rate and ETA) over steps; disabled bars cost nothing."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not enabled,
                desc=desc)
