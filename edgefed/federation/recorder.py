"""Per-round metrics as rounds complete: metrics.jsonl, and the console table."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from edgefed.families import CurveMetrics
from edgefed.federation.atomic import write_text_atomic
from edgefed.types import RoundMetrics

MB = 1e6
SIM_NOTE = (
    "* sim s: simulated device clock from the clients' device profiles (edgefed/devices/clock.py), "
    "not measured"
)


def header(metrics: CurveMetrics) -> str:
    """The console table's header, its evaluation columns named as the model's family names them."""
    return (
        f"{'round':>5}  {metrics.accuracy:>8}  {metrics.loss:>9}  {'train loss':>10}  "
        f"{'up MB':>8}  {'down MB':>8}  {'round s':>7}  {'wall s':>7}"
    )


def read_metrics(path: Path) -> list[RoundMetrics]:
    """The rounds of a metrics.jsonl, up to a line cut short (a run killed while writing it)."""
    rounds = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rounds.append(RoundMetrics.from_json(json.loads(line)))
        except json.JSONDecodeError:
            break
    return rounds


class Recorder:
    def __init__(
        self,
        run_dir: Path,
        echo: Callable[[str], None],
        resume_after: int | None,
        metrics: CurveMetrics,
    ) -> None:
        """`resume_after`: keep the recorded rounds up to that one (a resumed run's checkpoint) and go on."""
        self.metrics_path = run_dir / "metrics.jsonl"
        self.echo = echo
        self.header = header(metrics)
        self.rounds: list[RoundMetrics] = []
        if resume_after is not None:  # rounds after the checkpoint are run again
            self.rounds = [m for m in read_metrics(self.metrics_path) if m.round <= resume_after]
            write_text_atomic(self.metrics_path, "".join(json.dumps(m.to_json()) + "\n" for m in self.rounds))

    def record(self, metrics: RoundMetrics) -> None:
        simulated = metrics.sim_s is not None
        if not self.rounds:
            if simulated:
                self.echo(f"({SIM_NOTE})")
            self.echo(self.header + (f"  {'sim s*':>8}" if simulated else ""))
        self.rounds.append(metrics)
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics.to_json()) + "\n")
        train_loss = "-" if metrics.train_loss is None else f"{metrics.train_loss:.4f}"
        self.echo(
            f"{metrics.round:>5}  {metrics.accuracy:>8.4f}  {metrics.loss:>9.4f}  {train_loss:>10}  "
            f"{metrics.bytes_up / MB:>8.3f}  {metrics.bytes_down / MB:>8.3f}  "
            f"{metrics.round_s:>7.1f}  {metrics.wall_s:>7.1f}"
            + (f"  {metrics.sim_s:>8.1f}" if simulated else "")
        )
