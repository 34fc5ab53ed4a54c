"""What `edgefed run` does with each completed round: keep it (checkpoint and metrics.jsonl, then the
console line), and stop at the target."""

from __future__ import annotations

from pathlib import Path

from edgefed.aggregators import Aggregator
from edgefed.federation.atomic import write_text_atomic
from edgefed.federation.checkpoint import Checkpoint, rng_state, save_checkpoint
from edgefed.federation.recorder import Recorder, metrics_text
from edgefed.split import SplitSide
from edgefed.transport.base import Transport
from edgefed.types import RoundMetrics, State


class RunPolicy:
    """After every round a checkpoint from which a killed server resumes exactly, metrics.jsonl and the
    console table; and, with `stop_at`, the end of the run at the first round that reaches it."""

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

    def keep(self, metrics: RoundMetrics, global_state: State) -> None:
        """The checkpoint holds metrics.jsonl as of its round, swapped in with it; the run directory's
        copy follows. A kill between the two leaves that copy a round behind, never ahead: a resumed
        run starts from the checkpoint's."""
        jsonl = metrics_text([*self.recorder.rounds, metrics])
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
                jsonl,
            ),
        )
        write_text_atomic(self.run_dir / "metrics.jsonl", jsonl)
        self.recorder.record(metrics)

    def should_stop(self, metrics: RoundMetrics) -> bool:
        return self.stop_at is not None and metrics.accuracy >= self.stop_at

    def stopped_before(self) -> bool:
        """Whether a recorded round already met the stop rule (a resumed run does not train past it)."""
        return any(self.should_stop(metrics) for metrics in self.recorder.rounds)
