"""What `edgefed run` does with each completed round: record it, checkpoint it, and stop at the target."""

from __future__ import annotations

from pathlib import Path

from edgefed.aggregators import Aggregator
from edgefed.federation.checkpoint import Checkpoint, rng_state, save_checkpoint
from edgefed.federation.recorder import Recorder
from edgefed.split import SplitSide
from edgefed.transport.base import Transport
from edgefed.types import RoundMetrics, State


class RunPolicy:
    """metrics.jsonl and the console table; after every round a checkpoint from which a killed server
    resumes exactly; and, with `stop_at`, the end of the run at the first round that reaches it."""

    def __init__(
        self,
        recorder: Recorder,
        run_dir: Path,
        run_id: str,
        aggregator: Aggregator,
        transport: Transport,
        split: SplitSide | None,
        stop_at: float | None,
    ) -> None:
        self.recorder = recorder
        self.run_dir = run_dir
        self.run_id = run_id
        self.aggregator = aggregator
        self.transport = transport
        self.split = split
        self.stop_at = stop_at

    def record(self, metrics: RoundMetrics) -> None:
        self.recorder.record(metrics)

    def checkpoint(self, metrics: RoundMetrics, global_state: State) -> None:
        save_checkpoint(
            self.run_dir,
            Checkpoint(
                metrics.round,
                self.run_id,
                global_state,
                metrics.wall_s,
                self.aggregator.state_dict(),
                self.transport.roster(),
                rng_state(),
                metrics.sim_s,
                self.split.trainer.state_dict() if self.split else {},
            ),
        )

    def should_stop(self, metrics: RoundMetrics) -> bool:
        return self.stop_at is not None and metrics.accuracy >= self.stop_at

    def stopped_before(self) -> bool:
        """Whether a recorded round already met the stop rule (a resumed run does not train past it)."""
        return any(self.should_stop(metrics) for metrics in self.recorder.rounds)
