"""What `drpo train` writes besides the weights: the report dict (train_report), its JSON and HTML page for the
checkpoint directory (report_files), and the TensorBoard scalars of every step (Board, rank 0 only).
"""

from __future__ import annotations

import os

from drpo_cli import __version__
from drpo_cli.base.errors import ConfigError
from drpo_cli.config import TrainConfig
from drpo_cli.model import distributed
from drpo_cli.reports.report_format import (
    TRAIN_REPORT_VERSION,
    clean_number,
    finite_or_null,
    train_report_json,
)

REPORT_NAME = "drpo_report.json"
PAGE_NAME = "report.html"


def report_files(report: dict) -> tuple[dict[str, str], list[str]]:
    """({name: text}, [what could not be made]) of the report and its page for the checkpoint directory.

    Each is made on its own; one that fails is left out and named, so that it never costs the weights.
    """
    from drpo_cli.reports.html_pages import train_page

    files, unwritten = {}, []
    for name, make in ((REPORT_NAME, train_report_json), (PAGE_NAME, train_page)):
        try:
            files[name] = make(report)
        except Exception as err:  # noqa: BLE001 - reported once the checkpoint is written
            unwritten.append(f"{name} ({distributed.one_line(err)})")
    return files, unwritten


def flat_metrics(summary: dict) -> dict[str, float | int | None]:
    """The namespaced scalar metrics of a Diagnostics summary (breakdowns and histograms left out)."""
    return {k: clean_number(v) for k, v in summary.items() if "/" in k and (v is None or isinstance(v, (int, float)))}


class Board:
    """TensorBoard scalars of every step at global step `base_step + step` (rank 0 only)."""

    def __init__(self, log_dir: str, base_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer, self.base = SummaryWriter(log_dir=log_dir), base_step

    def step(self, record: dict) -> None:
        at = self.base + record["step"]
        for name in ("loss", "grad_norm", "lr", "tokens"):
            if record[name] is not None:
                self.writer.add_scalar(f"train/{name}", record[name], at)
        for name, value in record["metrics"].items():
            if value is not None:
                self.writer.add_scalar(name, value, at)
        self.writer.flush()  # watchable while the run goes on

    def close(self, final_metrics: dict, last_step: int) -> None:
        """The closing audit's metrics (final weights vs μ) under `final/`, at the last step."""
        for name, value in final_metrics.items():
            if value is not None:
                self.writer.add_scalar(f"final/{name}", value, self.base + last_step)
        self.writer.close()


def tensorboard(cfg: TrainConfig, *, base_step: int) -> Board | None:
    if cfg.tensorboard is None or distributed.rank() != 0:
        return None
    try:
        return Board(cfg.tensorboard, base_step)
    except ImportError as err:
        raise ConfigError(f"--tensorboard needs the tensorboard package ({err}): pip install 'drpo[tensorboard]'") from None


def train_report(cfg: TrainConfig, *, preset: str | None, in_version: int | None, totals: dict, vocab_size: int,
                 trainable: int, out_dir, out_version: int, filters: dict, notes: list, steps: list[dict],
                 diverged: dict | None, final: dict, seconds: float) -> dict:
    """The train report (schemas/train-report-v1.json): the run's inputs, loss settings, filters, every step and
    the closing audit of the final weights, whose change since the first step is added here."""
    first = steps[0]["metrics"] if steps else {}
    final["change_from_first_step"] = {
        k: (None if v is None or first.get(k) is None else v - first[k])
        for k, v in final["metrics"].items() if not k.startswith("data/")  # data/* describe the rows, not π
    }
    report = {
        "report": "drpo-train", "report_version": TRAIN_REPORT_VERSION, "drpo_version": __version__,
        "config": cfg.to_dict(),
        "input": {"model": os.path.abspath(cfg.model), "policy_version": in_version,
                  "rollouts": [os.path.abspath(p) for p in cfg.rollouts], "rows": totals["rows"],
                  "tokens": totals["tokens"], "trained_tokens": totals["trained_tokens"],
                  "vocab_size": vocab_size, "adapter": cfg.adapter and os.path.abspath(cfg.adapter),
                  "trainable_parameters": trainable},
        "output": {"dir": str(out_dir), "policy_version": out_version},
        "loss": {"name": cfg.loss, "hparams": cfg.loss_hparams(), "anchor": cfg.anchor,
                 "is_correction": cfg.is_correction, "is_level": cfg.is_level, "agg": cfg.agg,
                 "reference_kl": ({"model": os.path.abspath(cfg.ref_model), "coef": cfg.resolved_kl_coef(),
                                   "estimator": cfg.kl_estimator} if cfg.ref_model else None),
                 "entropy_coef": cfg.entropy_coef, "correction": preset, "reject_mode": cfg.reject_mode,
                 "is_veto": cfg.is_veto, "is_batch_norm": cfg.is_batch_norm},
        "filters": filters,
        "notes": notes,
        "steps": steps,
        "skipped_steps": sum(s["skipped"] for s in steps),
        "diverged": diverged,
        "final": final,
        "seconds": seconds,
    }
    return finite_or_null(report)
