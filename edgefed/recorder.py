"""Per-round metrics: metrics.jsonl as rounds complete, a console table, summary.json and curves.png."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

MB = 1e6
# The metrics that are measured times on this machine, so differ between otherwise identical runs.
TIMING_KEYS = ("round_s", "wall_s", "slowest_client_s", "client_train_s", "aggregate_s")
SIM_NOTE = (
    "* sim s: simulated device clock from the clients' device profiles (edgefed/clock.py), not measured"
)


def header(masked_lm: bool) -> str:
    """The console table's header; pre-training runs show masked-token accuracy and the MLM loss."""
    accuracy, loss = ("mask acc", "mlm loss") if masked_lm else ("accuracy", "eval loss")
    return (
        f"{'round':>5}  {accuracy:>8}  {loss:>9}  {'train loss':>10}  "
        f"{'up MB':>8}  {'down MB':>8}  {'round s':>7}  {'wall s':>7}"
    )


class Recorder:
    def __init__(
        self,
        run_dir: Path,
        echo: Callable[[str], None] = print,
        resume_after: int | None = None,
        masked_lm: bool = False,
    ) -> None:
        """`resume_after`: keep the recorded rounds up to that one (a resumed run's checkpoint) and go on."""
        self.metrics_path = run_dir / "metrics.jsonl"
        self.echo = echo
        self.header = header(masked_lm)
        self.rounds: list[dict] = []
        if resume_after is not None:
            for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
                try:
                    metrics = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by the kill: after the checkpoint
                    break
                if metrics["round"] <= resume_after:
                    self.rounds.append(metrics)
            self.metrics_path.write_text("".join(json.dumps(m) + "\n" for m in self.rounds), encoding="utf-8")

    def record(self, metrics: dict) -> None:
        simulated = metrics.get("sim_s") is not None
        if not self.rounds:
            if simulated:
                self.echo(f"({SIM_NOTE})")
            self.echo(self.header + (f"  {'sim s*':>8}" if simulated else ""))
        self.rounds.append(metrics)
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics) + "\n")
        train_loss = "-" if metrics["train_loss"] is None else f"{metrics['train_loss']:.4f}"
        self.echo(
            f"{metrics['round']:>5}  {metrics['accuracy']:>8.4f}  {metrics['loss']:>9.4f}  {train_loss:>10}  "
            f"{metrics['bytes_up'] / MB:>8.3f}  {metrics['bytes_down'] / MB:>8.3f}  "
            f"{metrics['round_s']:>7.1f}  {metrics['wall_s']:>7.1f}"
            + (f"  {metrics['sim_s']:>8.1f}" if simulated else "")
        )


def time_to_target(rounds: list[dict], target: float | None) -> tuple[int | None, float | None, float | None]:
    """(round, wall seconds, simulated seconds) at which accuracy first reached the target."""
    if target is None:
        return None, None, None
    for metrics in rounds:
        if metrics["accuracy"] >= target:
            return metrics["round"], metrics["wall_s"], metrics.get("sim_s")
    return None, None, None


def plot_curves(rounds: list[dict], title: str, path: Path, masked_lm: bool = False) -> bool:
    """Accuracy (pre-training: the MLM loss) against wall time and against rounds. False when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    simulated = rounds[-1].get("sim_s") is not None
    panels = 3 if simulated else 2
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), sharey=True)
    key, label = ("loss", "evaluation MLM loss") if masked_lm else ("accuracy", "evaluation accuracy")
    accuracy = [metrics[key] for metrics in rounds]
    axes[0].plot([metrics["wall_s"] for metrics in rounds], accuracy, marker="o")
    axes[0].set_xlabel("wall-clock seconds (this machine)")
    axes[0].set_ylabel(label)
    axes[1].plot([metrics["round"] for metrics in rounds], accuracy, marker="o")
    axes[1].set_xlabel("round")
    if simulated:
        axes[2].plot([metrics["sim_s"] for metrics in rounds], accuracy, marker="o", color="tab:orange")
        axes[2].set_xlabel("SIMULATED device seconds (device profiles)")
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
