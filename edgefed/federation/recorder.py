"""Per-round metrics as rounds complete: the console table, and the text of metrics.jsonl (written with
the checkpoint, edgefed/federation/policy.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from edgefed.families import CurveMetrics
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
    """The rounds of a metrics.jsonl."""
    return parse_metrics(path.read_text(encoding="utf-8"))


def parse_metrics(text: str) -> list[RoundMetrics]:
    """The rounds of metrics.jsonl's text, up to a line cut short."""
    rounds = []
    for line in text.splitlines():
        try:
            rounds.append(RoundMetrics.from_json(json.loads(line)))
        except json.JSONDecodeError:
            break
    return rounds


def metrics_text(rounds: list[RoundMetrics]) -> str:
    """metrics.jsonl: a line per round."""
    return "".join(json.dumps(metrics.to_json()) + "\n" for metrics in rounds)


class Recorder:
    def __init__(
        self, echo: Callable[[str], None], metrics: CurveMetrics, rounds: list[RoundMetrics] | None = None
    ) -> None:
        """`rounds`: those a resumed run kept (its checkpoint's); the run goes on after them."""
        self.echo = echo
        self.header = header(metrics)
        self.rounds: list[RoundMetrics] = list(rounds or [])

    def record(self, metrics: RoundMetrics) -> None:
        """Keep a round's metrics and print its line of the console table."""
        simulated = metrics.sim_s is not None
        if not self.rounds:
            if simulated:
                self.echo(f"({SIM_NOTE})")
            self.echo(self.header + (f"  {'sim s*':>8}" if simulated else ""))
        self.rounds.append(metrics)
        train_loss = "-" if metrics.train_loss is None else f"{metrics.train_loss:.4f}"
        self.echo(
            f"{metrics.round:>5}  {metrics.accuracy:>8.4f}  {metrics.loss:>9.4f}  {train_loss:>10}  "
            f"{metrics.bytes_up / MB:>8.3f}  {metrics.bytes_down / MB:>8.3f}  "
            f"{metrics.round_s:>7.1f}  {metrics.wall_s:>7.1f}"
            + (f"  {metrics.sim_s:>8.1f}" if simulated else "")
        )
