"""The planner: what each client trains, given its device profile, the model and the run's settings.

A plan fixes the frozen layers (the bottom layers a client does not train; backward stops above
them), the adapter layers (those it trains), the rank of the low-rank factors it sends, the
early-exit depth (the layers it runs; early-exit methods only), its batch size and sequence length.
The planner predicts each candidate's step time and peak memory with the cost model
(edgefed/devices/costmodel.py) and picks, among the candidates that fit the device's memory and the time
budget, the one closest to what the run asks for, in this order of importance:

    sequence length > batch size > exit depth > trained layers > rank

(truncating inputs loses information outright; a smaller batch changes the optimisation; a shallower
exit or more frozen layers keep the model's function and train less of it; a lower rank only shrinks
what goes up the link, because the other components' gradients are masked, not skipped).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from edgefed.devices.costmodel import (
    ModelShape,
    Workload,
    peak_memory_bytes,
    sent_parameters,
    step_bytes,
    step_flops,
    step_launches,
    step_seconds,
)
from edgefed.devices.profiles import GB, DeviceProfile
from edgefed.errors import EdgefedError
from edgefed.toml_io import parse_toml, toml_scalar

MIN_SEQ_LEN = 16


@dataclass(frozen=True)
class Plan:
    """One client's plan and what the cost model predicts for it on the client's profile."""

    profile: str
    frozen_layers: int
    exit_layer: int  # layers 0 .. exit_layer-1 run; adapter layers are frozen_layers .. exit_layer-1
    rank: int
    batch_size: int
    seq_len: int
    local_steps: int
    step_s: float  # predicted, on the profile
    round_s: float  # predicted: local steps plus the round's transfers over the profile's link
    peak_gb: float  # predicted peak training memory, the framework's own footprint included
    reasons: tuple[str, ...] = ()

    @property
    def workload(self) -> Workload:
        return Workload(self.frozen_layers, self.exit_layer, self.rank, self.batch_size, self.seq_len)


@dataclass(frozen=True)
class Request:
    """What the run asks every client to do; the planner departs from it only where it must."""

    rank: int
    batch_size: int
    seq_len: int
    local_steps: int
    bytes_per_sent_value: float = 4.0  # the codec's bytes per element of a delta
    budget_s: float | None = None  # a round's local training plus transfers, at most
    memory_gb: float | None = None  # at most this much, besides the profile's usable memory


def plan_for(
    shape: ModelShape,
    profile: DeviceProfile,
    request: Request,
    early_exits: bool,
    max_exit: int | None = None,
) -> Plan:
    """The best plan that fits (exiting after at most `max_exit` blocks, when given); EdgefedError
    naming the tightest limit when none does."""
    limit_gb = memory_limit_gb(profile, request)
    asked = Workload(0, shape.layers, request.rank, request.batch_size, request.seq_len)
    best, best_key = None, None
    for work in candidates(shape, request, early_exits, max_exit or shape.layers):
        peak_gb = predicted_peak_gb(shape, work, profile)
        round_s = predicted_round_s(shape, work, profile, request)
        if peak_gb > limit_gb or (request.budget_s is not None and round_s > request.budget_s):
            continue
        key = (
            work.seq_len,
            work.batch_size,
            work.exit_layer,
            work.exit_layer - work.frozen_layers,
            work.rank,
        )
        if best_key is None or key > best_key:
            best, best_key = work, key
    if best is None:
        smallest = Workload(shape.layers - 1, shape.layers, 1, 1, MIN_SEQ_LEN)
        if early_exits:
            smallest = replace(smallest, frozen_layers=0, exit_layer=1)
        raise EdgefedError(
            f"no plan fits {profile.name}: even {describe(smallest)} needs "
            f"{predicted_peak_gb(shape, smallest, profile):.2f} GB (limit {limit_gb:.2f} GB) and "
            f"{predicted_round_s(shape, smallest, profile, request):.2f} s per round "
            f"(budget {'none' if request.budget_s is None else f'{request.budget_s:g} s'})"
        )
    return make_plan(shape, profile, request, best, explain(shape, profile, request, asked, best, limit_gb))


def plan_as_asked(shape: ModelShape, profile: DeviceProfile, request: Request, exit_layer: int) -> Plan:
    """The run's own settings on this device, whatever the budget (what a fleet without a planner
    runs); EdgefedError when the device cannot hold them."""
    work = Workload(0, exit_layer, request.rank, request.batch_size, request.seq_len)
    limit_gb = memory_limit_gb(profile, request)
    peak_gb = predicted_peak_gb(shape, work, profile)
    if peak_gb > limit_gb:
        raise EdgefedError(
            f"{profile.name} cannot hold the run's settings ({describe(work)}): {peak_gb:.2f} GB predicted, "
            f"{limit_gb:.2f} GB usable; plan the fleet (planned) or lower batch-size or max-seq-len"
        )
    round_s = predicted_round_s(shape, work, profile, request)
    budget = "" if request.budget_s is None else f" (budget {request.budget_s:g} s)"
    return make_plan(
        shape, profile, request, work, [f"the run's settings, unplanned: {round_s:.2f} s per round{budget}"]
    )


def memory_limit_gb(profile: DeviceProfile, request: Request) -> float:
    return profile.usable_gb if request.memory_gb is None else min(profile.usable_gb, request.memory_gb)


def make_plan(
    shape: ModelShape, profile: DeviceProfile, request: Request, work: Workload, reasons: list[str]
) -> Plan:
    return Plan(
        profile=profile.name,
        frozen_layers=work.frozen_layers,
        exit_layer=work.exit_layer,
        rank=work.rank,
        batch_size=work.batch_size,
        seq_len=work.seq_len,
        local_steps=request.local_steps,
        step_s=step_seconds(shape, work, profile),
        round_s=predicted_round_s(shape, work, profile, request),
        peak_gb=predicted_peak_gb(shape, work, profile),
        reasons=tuple(reasons),
    )


def candidates(shape: ModelShape, request: Request, early_exits: bool, max_exit: int):
    ranks = halvings(request.rank, 1) if any(shape.rank_trainable) else [request.rank]
    exits = range(1, max_exit + 1) if early_exits else [shape.layers]
    for seq_len in halvings(request.seq_len, min(MIN_SEQ_LEN, request.seq_len)):
        for batch_size in halvings(request.batch_size, 1):
            for exit_layer in exits:
                for frozen in range(exit_layer):
                    for rank in ranks:
                        yield Workload(frozen, exit_layer, rank, batch_size, seq_len)


def halvings(start: int, floor: int) -> list[int]:
    values = [start]
    while values[-1] // 2 >= floor:
        values.append(values[-1] // 2)
    return values


def predicted_peak_gb(shape: ModelShape, work: Workload, profile: DeviceProfile) -> float:
    return peak_memory_bytes(shape, work, profile.accelerator) / GB + profile.runtime_gb


def round_bytes(shape: ModelShape, work: Workload, request: Request) -> tuple[int, int]:
    """(down, up): the global state the client runs on, and its encoded delta (estimates)."""
    received = shape.head_trainable + shape.embedding_trainable
    received += sum(shape.trainable[i] + shape.rank_trainable[i] for i in range(work.exit_layer))
    return 4 * received, math.ceil(request.bytes_per_sent_value * sent_parameters(shape, work))


def predicted_round_s(shape: ModelShape, work: Workload, profile: DeviceProfile, request: Request) -> float:
    down, up = round_bytes(shape, work, request)
    return request.local_steps * step_seconds(shape, work, profile) + profile.transfer_s(down, up)


def describe(work: Workload) -> str:
    return (
        f"{work.frozen_layers} frozen layers, exit {work.exit_layer}, rank {work.rank}, "
        f"batch {work.batch_size}, length {work.seq_len}"
    )


def explain(
    shape: ModelShape,
    profile: DeviceProfile,
    request: Request,
    asked: Workload,
    chosen: Workload,
    limit_gb: float,
) -> list[str]:
    """Why the plan is what it is: the run's request against the limits, then each departure."""
    asked_gb = predicted_peak_gb(shape, asked, profile)
    asked_s = predicted_round_s(shape, asked, profile, request)
    budget = "no time budget" if request.budget_s is None else f"a budget of {request.budget_s:g} s"
    fits = f"{asked_gb:.2f} GB of {limit_gb:.2f} GB usable and {asked_s:.2f} s per round against {budget}"
    if chosen == asked:
        return [f"the run's settings fit: {fits}"]
    lines = [f"the run's settings do not fit: {fits}"]
    if chosen.seq_len != asked.seq_len:
        lines.append(f"sequence length {asked.seq_len} -> {chosen.seq_len}: nothing fits at full length")
    if chosen.batch_size != asked.batch_size:
        lines.append(f"batch {asked.batch_size} -> {chosen.batch_size}: nothing fits at a larger batch")
    if chosen.exit_layer != asked.exit_layer:
        lines.append(
            f"exit after layer {chosen.exit_layer} of {shape.layers}: deeper exits do not fit; "
            "layers beyond it do not run"
        )
    if chosen.frozen_layers and shape.backward_through_blocks:
        lines.append(
            f"layers 0-{chosen.frozen_layers - 1} frozen: backward stops at layer {chosen.frozen_layers}, "
            "saving their backward compute and saved activations"
        )
    elif chosen.frozen_layers:
        lines.append(
            f"layers 0-{chosen.frozen_layers - 1} frozen: their added modules do not train (backward never "
            "runs through the blocks), saving their backward compute and optimizer steps"
        )
    if chosen.rank != asked.rank:
        lines.append(
            f"rank {asked.rank} -> {chosen.rank}: sends the leading {chosen.rank} components of each "
            "factor pair, the link being what remains too slow"
        )
    flops = step_flops(shape, chosen) / profile.flops_per_s
    traffic = step_bytes(shape, chosen) / profile.bytes_per_s
    launches = step_launches(shape, chosen) * profile.launch_us * 1e-6
    total = flops + traffic + launches
    lines.append(
        f"a step is {100 * flops / total:.0f} % GEMM time, {100 * traffic / total:.0f} % memory traffic, "
        f"{100 * launches / total:.0f} % launch overhead on {profile.name}"
    )
    return lines


def plan_record(plan: Plan) -> dict:
    """A plan as metrics.jsonl and summary.json hold it."""
    return dict(asdict(plan), reasons=list(plan.reasons))


def plan_text(plan: Plan) -> str:
    """A plan as TOML (it travels to a gRPC client in its Join reply)."""
    return "".join(f"{name} = {toml_scalar(value)}\n" for name, value in asdict(plan).items())


def plan_from_text(text: str) -> Plan:
    return plan_from_record(parse_toml(text, "the server's plan"), "the server sent an unreadable plan")


def plan_from_record(record: dict, what: str = "an unreadable plan") -> Plan:
    """A plan from `plan_record`'s dict (metrics.jsonl) or its TOML (a Join reply)."""
    try:
        values = {field.name: record[field.name] for field in fields(Plan)}
    except KeyError as error:
        raise EdgefedError(f"{what} (no {error})") from None
    values["reasons"] = tuple(values["reasons"])
    return Plan(**values)


def format_plan(plan: Plan, shape: ModelShape, model: str, method: str) -> str:
    """`edgefed plan`'s report."""
    last = plan.exit_layer - 1
    adapter = f"{plan.frozen_layers}-{last}" if plan.frozen_layers <= last else "none"
    frozen = f"0-{plan.frozen_layers - 1}" if plan.frozen_layers else "none"
    exit_line = (
        f"after layer {plan.exit_layer} of {shape.layers}"
        if plan.exit_layer < shape.layers
        else f"none (all {shape.layers} layers run)"
    )
    rows = [
        ("frozen layers", f"{frozen} (no backward through them)" if plan.frozen_layers else "none"),
        ("adapter layers", adapter),
        ("rank", str(plan.rank)),
        ("early exit", exit_line),
        ("batch size", str(plan.batch_size)),
        ("sequence length", str(plan.seq_len)),
        ("step time", f"{plan.step_s:.4f} s predicted"),
        ("round time", f"{plan.round_s:.2f} s predicted ({plan.local_steps} local steps and the transfers)"),
        ("peak memory", f"{plan.peak_gb:.2f} GB predicted (framework included)"),
    ]
    lines = [f"plan for {plan.profile}: {method} on {model} ({shape.layers} layers, hidden {shape.hidden})"]
    lines += [f"  {label:<16} {value}" for label, value in rows]
    lines.append("why:")
    lines += [f"  - {reason}" for reason in plan.reasons]
    lines.append(
        "(predictions come from the cost model in edgefed/devices/costmodel.py, not from a measurement)"
    )
    return "\n".join(lines)
