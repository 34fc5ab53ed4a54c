"""Run configuration: defaults < preset < TOML file < command-line flags, all with the same keys.

`RunConfig` holds the run's own settings and composes its components' (each method's and
aggregator's `Settings`, edgefed/settings.py); this module merges the layers and checks the run's own
values. `edgefed.components` resolves a configuration: it builds the components the run names and
each checks its settings.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edgefed.aggregators.settings import AGGREGATOR_SETTINGS
from edgefed.errors import EdgefedError
from edgefed.methods.settings import METHOD_SETTINGS
from edgefed.settings import (
    MAX_CLIENTS,
    MAX_COUNT,
    Settings,
    check_at_most,
    check_positive,
    coerce,
    key_of,
    option,
)
from edgefed.toml_io import parse_toml, toml_scalar
from edgefed.wire.framing import CHUNK_BYTES
from edgefed.wire.streams import STREAM_IDLE_S


@dataclass(frozen=True)
class RunConfig:
    """Everything a federated run needs. The defaults are the demo."""

    preset: str = option(
        "demo",
        "demo, smoke (a small slice, two short rounds) or fewfedweight (with tasks: energy-weighted "
        "pseudo labels and performance-adaptive aggregation)",
    )
    method: str = option(
        "federa",
        "fine-tuning: fft, lora, federa, bitfit, adapter or ee-adapter (early exits); masked-LM "
        "pre-training: fdapt, ffdapt (part frozen) or fedbert (split learning)",
    )
    aggregator: str = option(
        "fedavg",
        "fedavg (A and B averaged apart), product (exact, in ΔW = B·A space), hetero (clients with "
        "different plans: each element averaged over the clients that trained it), adaptive (by held-out "
        "score, FewFedWeight), or for untrusted fleets median or trimmed-mean (each update clipped to the "
        "round's median norm)",
    )
    codec: str = option("none", "how client deltas travel: none, fp16, bf16, int8, int4 or topk:<fraction>")
    clients: int = option(4, "number of clients")
    rounds: int = option(16, "federated rounds")
    local_steps: int | None = option(5, "local optimizer steps per client per round")
    local_epochs: float | None = option(
        None, "local passes over the client's data per round, instead of local-steps"
    )
    sample_fraction: float = option(1.0, "share of clients sampled each round")
    partition: str = option("dirichlet:0.5", "iid or dirichlet:<alpha> label skew")
    data: str | None = option(
        None,
        "TSV/CSV/JSONL file (pre-training: also .txt, one document per line), or a folder with train.* "
        "and dev.* (default: the SST-2 sample shipped in the package)",
        "PATH",
    )
    tasks: tuple[str, ...] = option(
        (),
        "few-shot multi-task: task folders (train.*, test.* or dev.*, labels.txt), client k gets the "
        "(k mod T)-th; one model scores inputs against each task's label names",
        "DIR,DIR",
    )
    eval_tasks: tuple[str, ...] = option(
        (), "with tasks: task folders evaluated but given to no client (zero-shot transfer)", "DIR,DIR"
    )
    shots: int = option(16, "with tasks: labelled examples per class each client holds, drawn by the seed")
    holdout_shots: int = option(
        4, "with tasks: of each class's shots, this many are held out to score the client's model"
    )
    unlabeled_pool: int = option(
        256, "with tasks: unlabelled inputs of its task each client holds (pseudo-labelled on the device)"
    )
    pseudo_labels: str = option(
        "none",
        "with tasks: none, uniform (the broadcast global model labels each client's unlabelled pool on "
        "the device) or energy (those labels weighted by their energy score: FewFedWeight)",
    )
    pseudo_weight: float = option(1.0, "λ: the pseudo-label loss's weight beside the labelled loss")
    energy_temperature: float = option(1.0, "T of the energy score E = −T·logsumexp(logits/T)")
    model: str = option("all-MiniLM-L6-v2", "local model folder or a packaged model's name", "PATH_OR_NAME")
    lr: float | None = option(None, "learning rate (default: the method's own)")
    max_grad_norm: float = option(1.0, "clip each local gradient's L2 norm to this; 0: no clipping")
    batch_size: int = option(16, "local batch size")
    max_seq_len: int = option(64, "tokens per example after truncation")
    prompt_template: str = option(
        "{text}\n\nWhich one of these fits the text above: {labels}? Answer with one of them.",
        "decoder LMs: how a labelled text is posed as a prompt ({text}, and {labels}: the names from "
        "labels.txt); its answer is the label's name",
    )
    train_limit: int | None = option(None, "use only the first N training examples")
    eval_limit: int | None = option(None, "evaluate on the first N evaluation examples")
    target_accuracy: float | None = option(
        None, "report rounds and time to this accuracy (a fraction, e.g. 0.85)"
    )
    stop_at_target: bool = option(False, "end the run at the first round that reaches target-accuracy")
    transport: str = option(
        "inproc",
        "inproc (clients in this process), grpc (a server and one client process per client on "
        "127.0.0.1) or flower (Flower's Simulation Engine on Ray, one SuperNode per client); the same "
        "metrics for the same seed",
    )
    client_runtime: tuple[str, ...] = option(
        ("torch",),
        "what simulated clients train with: torch, ort (ONNX Runtime training artifacts the server makes "
        "once per run: lora and federa classifiers, pip install 'edgefed[ort,onnx]') or executorch (an "
        "ExecuTorch training program, in-process clients, 'edgefed[executorch]'); a list is taken in "
        "turn (torch,ort: every other client)",
    )
    min_clients: int | None = option(
        None, "connected clients a round needs, and updates it counts (default: all)"
    )
    round_deadline_s: float = option(600.0, "a sampled client that has not pushed by then is dropped")
    max_update_norm: float | None = option(
        None,
        "refuse client updates with a larger L2 norm (default: √(values sent) × 10, a per-value RMS of "
        "10: far above a fine-tuning step, far below overflow)",
    )
    max_client_examples: int = option(
        1_000_000, "refuse a client that declares more training examples (they weigh its update)"
    )
    max_client_share: float = option(
        1.0, "the largest share of a round's aggregation weight one client may hold (1: no bound)"
    )
    chunk_bytes: int = option(CHUNK_BYTES, "largest slice of a state in one gRPC message")
    profiles: tuple[str, ...] = option(
        (),
        "the clients' device profiles, assigned in turn (client k gets the k-th): a list like "
        "'2×jetson-agx-orin-64gb-maxn+2×raspberry-pi-5-8gb' (COUNT×NAME, NAME@EXIT caps an early-exit "
        "device's depth); each client trains its fleet strategy's plan and metrics gain the SIMULATED "
        "device clock sim_s",
    )
    fleet_strategy: str = option(
        "planned",
        "with profiles: planned (each device the planner's plan within budget-s), uniform (every device "
        "the run's settings, rounds wait for the slowest) or deadline (the run's settings; clients whose "
        "round exceeds budget-s are dropped)",
    )
    budget_s: float | None = option(
        None, "with profiles: a client's round (local steps and transfers) must fit in this (SIMULATED s)"
    )
    seed: int = option(0, "seed for partitioning, sampling, initialisation and batches")
    out: str | None = option(None, "run directory (default runs/<method>-<time>)", "DIR")
    # The components' own settings, set by their keys (edgefed/methods/settings.py,
    # edgefed/aggregators/settings.py); None: the component's defaults.
    method_settings: Settings | None = None
    aggregator_settings: Settings | None = None

    def lr_for(self, default_lr: float) -> float:
        """The learning rate: the run's, else the method's own (`Method.default_lr`)."""
        return self.lr if self.lr is not None else default_lr

    def sharing(self) -> str:
        """How the clients' data is drawn, in words: the partition, or the tasks and shots."""
        return f"{len(self.tasks)} tasks, {self.shots} shots per class" if self.tasks else self.partition


@dataclass(frozen=True)
class ServerSettings(Settings):
    """How `edgefed server` serves a run: settings of the server process, not of what the run computes
    (so not in config.toml); its flags are built from these fields as the run's are from RunConfig's."""

    heartbeat_s: float = option(1.0, "client heartbeat interval; 3 missed = dropped")
    stream_idle_s: float = option(
        STREAM_IDLE_S, "cancel a client's stream that moves no message for this long"
    )
    split_port: int = option(0, "port of FedBERT's Split service, on the --address host (0: any free port)")

    def check(self) -> None:
        check_positive(heartbeat_s=self.heartbeat_s, stream_idle_s=self.stream_idle_s)
        check_at_most(3600, heartbeat_s=self.heartbeat_s)
        if self.stream_idle_s < 1:  # its watcher wakes every quarter of it: less would spin a core
            raise EdgefedError(f"stream-idle-s must be at least 1 second, got {self.stream_idle_s}")
        if not 0 <= self.split_port <= 65535:
            raise EdgefedError(
                f"split-port must be a port from 0 to 65535 (0: any free port), got {self.split_port}"
            )


PRESETS: dict[str, dict[str, Any]] = {
    "demo": {},
    # A quick end-to-end check: a slice of the data, two short rounds.
    "smoke": {
        "rounds": 2,
        "local_steps": 3,
        "max_seq_len": 32,
        "train_limit": 400,
        "eval_limit": 200,
    },
    # FewFedWeight (arXiv 2212.08354) with an adapter method: energy-weighted pseudo labels and
    # performance-adaptive aggregation; give it --tasks.
    "fewfedweight": {"pseudo_labels": "energy", "aggregator": "adaptive"},
}

TRANSPORTS = ("inproc", "grpc", "flower")
# Fields that hold comma-separated names, with an example for errors.
LIST_EXAMPLES = {
    "profiles": "2×jetson-agx-orin-64gb-maxn+raspberry-pi-5-8gb",
    "tasks": "data/mr,data/trec",
    "eval_tasks": "data/cr",
    "client_runtime": "torch,ort",
}
COMPONENT_SETTINGS = ("method_settings", "aggregator_settings")
FIELDS = {field.name: field for field in fields(RunConfig) if field.name not in COMPONENT_SETTINGS}
TYPES = typing.get_type_hints(RunConfig)
# Keys not written to config.toml: where a run goes is not part of what it computes.
NOT_RECORDED = ("out",)


def settings_fields(catalog: tuple[type[Settings], ...]) -> dict[str, dataclasses.Field]:
    """The keys the components' settings declare: one meaning per key, so the classes that share
    one (`rank`) agree on its type, default and help."""
    declared: dict[str, dataclasses.Field] = {}
    for settings_type in catalog:
        for name, item in settings_type.fields().items():
            first = declared.setdefault(name, item)
            if name in FIELDS or (first.type, first.default, first.metadata) != (
                item.type,
                item.default,
                item.metadata,
            ):
                raise TypeError(f"{settings_type.__name__}.{name}: a key declared twice with two meanings")
    return declared


SETTINGS_CATALOG = METHOD_SETTINGS + AGGREGATOR_SETTINGS
SETTINGS_FIELDS = settings_fields(SETTINGS_CATALOG)
SETTINGS_TYPES = {name: kind for cls in SETTINGS_CATALOG for name, kind in typing.get_type_hints(cls).items()}


def merged_values(file_path: str | None, flags: dict[str, Any]) -> dict[str, Any]:
    """The layers (defaults < preset < file < flags) merged, by field name; values not yet checked."""
    file_values = read_config_file(file_path) if file_path else {}
    preset = flags.get("preset") or file_values.get("preset") or "demo"
    if not isinstance(preset, str) or preset not in PRESETS:  # a TOML list or table is no name either
        raise EdgefedError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    merged: dict[str, Any] = {}
    for layer, origin in (
        (PRESETS[preset], f"preset {preset}"),
        (file_values, str(file_path)),
        (flags, "flags"),
    ):
        if layer.get("local_steps") is not None and layer.get("local_epochs") is not None:
            raise EdgefedError(f"{origin}: set local-steps or local-epochs, not both")
        merged.update(layer)
        if layer.get("local_epochs") is not None:
            merged["local_steps"] = None
        elif layer.get("local_steps") is not None:
            merged["local_epochs"] = None
    merged["preset"] = preset
    return merged


def recorded_values(text: str, origin: str) -> dict[str, Any]:
    """The values of a resolved configuration as `config_text` wrote it (a run's config.toml, a
    server's Join reply)."""
    values = config_values(text, origin)
    if values.get("local_epochs") is not None:
        values["local_steps"] = None
    return values


def read_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return config_values(handle.read().decode("utf-8"), path)
    except FileNotFoundError:
        raise EdgefedError(f"{path}: no such config file") from None
    except (OSError, ValueError) as error:  # a folder, no permission, not UTF-8 text, a NUL in the path
        raise EdgefedError(f"{path}: cannot read it as a config file ({error})") from None


def config_values(text: str, origin: str) -> dict[str, Any]:
    """The keys of a TOML text (a file, or the configuration a server sends its clients)."""
    return named_values(parse_toml(text, origin), origin)


def named_values(raw: dict[str, Any], origin: str) -> dict[str, Any]:
    """Option keys (`local-steps`) → field names (`local_steps`); an unknown key is a clear error."""
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELDS and name not in SETTINGS_FIELDS:
            valid = ", ".join(key_of(name) for name in [*FIELDS, *SETTINGS_FIELDS])
            raise EdgefedError(f"{origin}: unknown key '{key}'; valid keys: {valid}")
        values[name] = value
    return values


def run_config(values: dict[str, Any]) -> RunConfig:
    """The run's own fields of `values` (field names) checked against their types; the components'
    keys are left to `edgefed.components`, which knows whose they are."""
    own = {name: coerce_field(name, value) for name, value in values.items() if name in FIELDS}
    return RunConfig(**own)


def coerce_field(name: str, value: Any) -> Any:
    """Check a value's type against the RunConfig field `name`."""
    value = coerce(name, TYPES[name], value, LIST_EXAMPLES.get(name))
    if name == "profiles" and value is not None:
        from edgefed.devices.profiles import parse_fleet  # torch-free; `2×NAME` expands here

        return parse_fleet(value)
    return value


def check_run(config: RunConfig) -> None:
    """The run's own settings; its components check theirs (`edgefed.components.validate`)."""
    if config.max_grad_norm < 0:
        raise EdgefedError(f"max-grad-norm must be 0 (no clipping) or positive, got {config.max_grad_norm}")
    check_positive(
        clients=config.clients,
        rounds=config.rounds,
        batch_size=config.batch_size,
        local_steps=config.local_steps,
        local_epochs=config.local_epochs,
        lr=config.lr,
        train_limit=config.train_limit,
        eval_limit=config.eval_limit,
        min_clients=config.min_clients,
        round_deadline_s=config.round_deadline_s,
        max_update_norm=config.max_update_norm,
        max_client_examples=config.max_client_examples,
        budget_s=config.budget_s,
        shots=config.shots,
        unlabeled_pool=config.unlabeled_pool,
        pseudo_weight=config.pseudo_weight,
        energy_temperature=config.energy_temperature,
    )
    check_at_most(MAX_CLIENTS, clients=config.clients, min_clients=config.min_clients)
    check_at_most(
        MAX_COUNT,
        rounds=config.rounds,
        local_steps=config.local_steps,
        local_epochs=config.local_epochs,
        batch_size=config.batch_size,
        shots=config.shots,
        unlabeled_pool=config.unlabeled_pool,
    )
    check_at_most(7 * 24 * 3600, round_deadline_s=config.round_deadline_s, budget_s=config.budget_s)
    if config.seed < 0:  # numpy's generators take no negative seed
        raise EdgefedError(f"seed must be 0 or positive, got {config.seed}")
    if config.transport not in TRANSPORTS:
        raise EdgefedError(f"unknown transport '{config.transport}'; choose one of: {', '.join(TRANSPORTS)}")
    if config.min_clients is not None and config.min_clients > config.clients:
        raise EdgefedError(f"min-clients {config.min_clients} exceeds clients {config.clients}")
    if not 1024 <= config.chunk_bytes <= 4 << 20:
        raise EdgefedError(f"chunk-bytes must be between 1024 and 4194304 (4 MiB), got {config.chunk_bytes}")
    if not 0 < config.max_client_share <= 1:
        raise EdgefedError(f"max-client-share must be in (0, 1], got {config.max_client_share}")
    if not 0 < config.sample_fraction <= 1:
        raise EdgefedError(f"sample-fraction must be in (0, 1], got {config.sample_fraction}")
    if not 8 <= config.max_seq_len <= 4096:
        raise EdgefedError(f"max-seq-len must be between 8 and 4096, got {config.max_seq_len}")
    if config.stop_at_target and config.target_accuracy is None:
        raise EdgefedError("stop-at-target needs target-accuracy")
    if config.target_accuracy is not None and not 0 < config.target_accuracy <= 1:
        raise EdgefedError(
            f"target-accuracy is a fraction in (0, 1] (0.85 for 85%), got {config.target_accuracy}"
        )


def write_config(config: RunConfig, path: Path) -> None:
    """config.toml: the resolved configuration, re-runnable with `edgefed run --config`."""
    path.write_text(config_text(config), encoding="utf-8")


def client_config(config: RunConfig) -> RunConfig:
    """The run's configuration as a joining client gets it: the server's files are named, not located
    (a client reads its own data and model; where the server keeps its copies is nothing a client may
    learn). A packaged model's name stays as it is; a model folder goes by its folder's name, which a
    client finds in its working folder or is given with `--model` (the weights' fingerprint, sent
    with it, says whether it is the same model)."""

    def name(path: str) -> str:
        return Path(path).name

    return dataclasses.replace(
        config,
        model=name(config.model),
        data=None if config.data is None else name(config.data),
        tasks=tuple(map(name, config.tasks)),
        eval_tasks=tuple(map(name, config.eval_tasks)),
    )


def config_text(config: RunConfig) -> str:
    """The configuration as TOML, one key per line: the run's own, then its components' settings."""
    lines = ["# Resolved configuration of this run: edgefed run --config config.toml"]
    if config.pseudo_labels != "none":
        lines.append(
            "# Pseudo labels: each client labels its own unlabelled pool with the broadcast global model, "
            "on the device; its inputs never leave it."
        )
    values = {name: getattr(config, name) for name in FIELDS if name not in NOT_RECORDED}
    for settings in (config.method_settings, config.aggregator_settings):
        values.update(settings.values() if settings is not None else {})
    for name, value in values.items():
        if value is not None:
            lines.append(f"{key_of(name)} = {toml_scalar(value)}")
    return "\n".join(lines) + "\n"
