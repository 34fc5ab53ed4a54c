"""The end of a run: the trained result, summary.json, curves.png and the closing lines."""

from __future__ import annotations

import json
from pathlib import Path

from edgefed.devices.planner import plan_record
from edgefed.families import CurveMetrics
from edgefed.federation.atomic import replace_dir, staging_dir, write_text_atomic
from edgefed.methods import count_trainable
from edgefed.plotting import pyplot
from edgefed.setup import SUMMARY, RunSetup
from edgefed.transport.base import state_payload
from edgefed.types import RoundMetrics, RunSummary, TimeToTarget


def finish_run(
    setup: RunSetup, run_dir: Path, rounds: list[RoundMetrics], total_s: float, echo
) -> RunSummary:
    """The trained adapter, summary.json, curves.png and the closing lines."""
    config, global_model = setup.config, setup.global_model
    result_dir = run_dir / setup.method.result_dir
    staging = staging_dir(result_dir)
    setup.method.save(global_model.cpu(), setup.spec, setup.setup, staging)
    setup.tokenizer.save_pretrained(staging)
    replace_dir(staging, result_dir)
    target_round, target_wall, target_sim = time_to_target(rounds, config.target_accuracy)
    best = max(rounds, key=lambda metrics: metrics.accuracy)
    last = rounds[-1]
    summary = RunSummary(
        method=config.method,
        task=setup.task.name,
        aggregator=config.aggregator,
        codec=config.codec,
        transport=config.transport,
        model=config.model,
        clients=config.clients,
        rounds=config.rounds,
        train_source=setup.train.source,
        eval_source=setup.evaluation.source,
        train_examples=len(setup.train),
        eval_examples=len(setup.evaluation),
        num_labels=setup.num_labels,
        head_modules=list(setup.spec.head_modules),
        trainable_parameters=count_trainable(global_model),
        total_parameters=sum(p.numel() for p in global_model.parameters()),
        final_accuracy=last.accuracy,
        final_loss=last.loss,
        final_mlm_loss=last.mlm_loss,
        final_exit_accuracy=last.exit_accuracy,
        final_task_accuracy=last.task_accuracy,
        best_accuracy=best.accuracy,
        best_round=best.round,
        target_accuracy=config.target_accuracy,
        rounds_to_target=target_round,
        time_to_target_s=TimeToTarget(target_wall, target_sim),
        profiles=list(config.profiles),
        plans={
            str(index): plan_record(plan)
            for index in range(config.clients)
            if (plan := setup.fleet.plan(index)) is not None
        },
        sim_s=last.sim_s,
        energy_j=energy_by_source(rounds),
        bytes_up=sum(metrics.bytes_up for metrics in rounds),
        bytes_down=sum(metrics.bytes_down for metrics in rounds),
        split_bytes_up=sum(metrics.split_bytes_up or 0 for metrics in rounds),
        split_bytes_down=sum(metrics.split_bytes_down or 0 for metrics in rounds),
        setup_bytes_per_client=len(state_payload(setup.setup)),
        wall_s=last.wall_s,
        total_s=total_s,
        run_dir=str(run_dir),
        result_dir=str(result_dir),
    )
    write_text_atomic(run_dir / SUMMARY, json.dumps(summary.to_json(), indent=2) + "\n")
    title = f"{config.method} · {config.aggregator} · {config.clients} clients · {config.sharing()}"
    if not plot_curves(rounds, title, run_dir / "curves.png", setup.task.model_family.metrics):
        echo("edgefed: curves.png skipped (matplotlib is not installed: pip install 'edgefed[demo]')")
    echo(format_summary(summary))
    return summary


def format_summary(summary: RunSummary) -> str:
    if summary.final_mlm_loss is not None:
        lines = [
            f"final MLM loss {summary.final_mlm_loss:.4f} (masked-token accuracy "
            f"{summary.final_accuracy:.4f}), {summary.wall_s:.1f} s wall clock on this machine"
        ]
    else:
        lines = [
            f"final accuracy {summary.final_accuracy:.4f} (best {summary.best_accuracy:.4f} at round "
            f"{summary.best_round}), eval loss {summary.final_loss:.4f}, "
            f"{summary.wall_s:.1f} s wall clock on this machine"
        ]
    if summary.final_task_accuracy:
        tasks = ", ".join(f"{name} {value:.4f}" for name, value in summary.final_task_accuracy.items())
        lines.append(f"per task: {tasks}")
    if summary.target_accuracy is not None:
        target = summary.target_accuracy
        if summary.rounds_to_target is None:
            lines.append(f"target accuracy {target:.4f} not reached")
        else:
            lines.append(
                f"target accuracy {target:.4f} reached at round {summary.rounds_to_target} after "
                f"{summary.time_to_target_s.wall:.1f} s (wall clock)"
                + (
                    f", {summary.time_to_target_s.simulated:.1f} s on the SIMULATED device clock"
                    if summary.time_to_target_s.simulated is not None
                    else ""
                )
            )
    share = 100 * summary.trainable_parameters / summary.total_parameters
    traffic = (
        f"{summary.trainable_parameters:,} trainable parameters ({share:.2f} %); "
        f"{summary.bytes_up / 1e6:.2f} MB up, {summary.bytes_down / 1e6:.2f} MB down in all"
    )
    if summary.setup_bytes_per_client:
        traffic += (
            f" (down includes a one-off setup of {summary.setup_bytes_per_client / 1e6:.2f} MB per client)"
        )
    lines.append(traffic)
    if summary.split_bytes_up:
        lines.append(
            f"split activations and gradients: {summary.split_bytes_up / 1e6:.2f} MB up, "
            f"{summary.split_bytes_down / 1e6:.2f} MB down in all"
        )
    if summary.final_exit_accuracy:
        exits = ", ".join(f"{accuracy:.4f}" for accuracy in summary.final_exit_accuracy)
        lines.append(f"accuracy at each exit (layers 1..{len(summary.final_exit_accuracy)}): {exits}")
    if summary.sim_s is not None:
        profiles = ", ".join(summary.profiles)
        lines.append(f"{summary.sim_s:.1f} s on the SIMULATED device clock (profiles {profiles})")
    if summary.energy_j:
        parts = {
            "measured": "measured on the devices",
            "simulated": "SIMULATED at the profiles' power budgets",
        }
        lines.append(
            "energy over the clients' rounds: "
            + ", ".join(
                f"{joules / 1e3:.3f} kJ {parts[source]}" for source, joules in summary.energy_j.items()
            )
        )
    lines.append(f"run directory: {summary.run_dir}")
    if summary.task == "masked-lm":
        result = summary.result_dir
        lines.append(f"pre-trained model: {result} (fine-tune it: edgefed run --model {result})")
    return "\n".join(lines)


def energy_by_source(rounds: list[RoundMetrics]) -> dict[str, float]:
    """Joules over all clients and rounds, by where they come from (measured, simulated)."""
    totals: dict[str, float] = {}
    for metrics in rounds:
        for joules, source in zip(
            metrics.client_energy_j or [], metrics.client_energy_source or [], strict=True
        ):
            if source is not None:
                totals[source] = totals.get(source, 0.0) + joules
    return totals


def time_to_target(
    rounds: list[RoundMetrics], target: float | None
) -> tuple[int | None, float | None, float | None]:
    """(round, wall seconds, simulated seconds) at which accuracy first reached the target."""
    if target is None:
        return None, None, None
    for metrics in rounds:
        if metrics.accuracy >= target:
            return metrics.round, metrics.wall_s, metrics.sim_s
    return None, None, None


def plot_curves(rounds: list[RoundMetrics], title: str, path: Path, metrics: CurveMetrics) -> bool:
    """Accuracy (a language model: the evaluation loss) against wall time and against rounds. False
    when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    simulated = rounds[-1].sim_s is not None
    panels = 3 if simulated else 2
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), sharey=True)
    key, label = ("loss" if metrics.plots_loss else "accuracy"), metrics.curve_label
    accuracy = [getattr(metrics, key) for metrics in rounds]
    axes[0].plot([metrics.wall_s for metrics in rounds], accuracy, marker="o")
    axes[0].set_xlabel("wall-clock seconds (this machine)")
    axes[0].set_ylabel(label)
    axes[1].plot([metrics.round for metrics in rounds], accuracy, marker="o")
    axes[1].set_xlabel("round")
    if simulated:
        axes[2].plot([metrics.sim_s for metrics in rounds], accuracy, marker="o", color="tab:orange")
        axes[2].set_xlabel("SIMULATED device seconds (device profiles)")
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
