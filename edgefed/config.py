"""Run configuration: defaults < preset < TOML file < command-line flags, all with the same keys."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefed.errors import EdgefedError
from edgefed.toml_io import parse_toml, toml_scalar
from edgefed.types import AdapterSpec
from edgefed.wire.framing import CHUNK_BYTES
from edgefed.wire.streams import STREAM_IDLE_S

if TYPE_CHECKING:  # torch stays unimported until a run needs it
    from edgefed.tasks import DataSettings, Task


def option(default: Any, help: str, metavar: str | None = None) -> Any:
    """A RunConfig field: its default and its help text in one place (`edgefed run --help` is built
    from them, and `(default …)` is added to the help of every field with a default other than None)."""
    return field(default=default, metadata={"help": help, "metavar": metavar})


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
    # The methods' hyperparameters default to AdapterSpec's (edgefed/types.py).
    target_modules: tuple[str, ...] = option(
        AdapterSpec.target_modules, "comma-separated module names that LoRA/FeDeRA adapt"
    )
    rank: int = option(AdapterSpec.rank, "LoRA/FeDeRA rank, adapter bottleneck width")
    alpha: float = option(AdapterSpec.alpha, "LoRA/FeDeRA alpha; scale = alpha / rank")
    lr: float | None = option(None, "learning rate (default: the method's own)")
    max_grad_norm: float = option(1.0, "clip each local gradient's L2 norm to this; 0: no clipping")
    freeze: tuple[str, ...] = option(
        AdapterSpec.freeze,
        "ffdapt: what stays frozen, comma-separated: embeddings, layers:<i>, layers:<i>-<j>",
    )
    split_strategy: str = option(
        "sequential",
        "fedbert: sequential (clients take turns on one body) or parallel (a body copy per client, "
        "averaged each round)",
    )
    split_codec: str = option("fp16", "fedbert: activations and gradients travel as none, fp16, bf16 or int8")
    batch_size: int = option(16, "local batch size")
    max_seq_len: int = option(64, "tokens per example after truncation")
    train_limit: int | None = option(None, "use only the first N training examples")
    eval_limit: int | None = option(None, "evaluate on the first N evaluation examples")
    target_accuracy: float | None = option(
        None, "report rounds and time to this accuracy (a fraction, e.g. 0.85)"
    )
    stop_at_target: bool = option(False, "end the run at the first round that reaches target-accuracy")
    fused_kernels: bool = option(
        True, "LoRA/FeDeRA layers run edgefed's fused Triton kernel on CUDA (off for comparison)"
    )
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
        None, "refuse client updates with a larger L2 norm (default: no bound)"
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

    def lr_for(self, default_lr: float) -> float:
        """The learning rate: the run's, else the method's own (`Method.default_lr`)."""
        return self.lr if self.lr is not None else default_lr

    def adapter_spec(self, new_modules: tuple[str, ...]) -> AdapterSpec:
        """The methods' hyperparameters for the run's model, whose checkpoint lacked `new_modules`: they
        train as its head (none new: its family's own head), and peft calls it as its family says."""
        family = self.task().model_family
        head_modules = tuple(new_modules) or family.head_modules
        return AdapterSpec(
            self.rank, self.alpha, self.target_modules, head_modules, self.freeze, family.peft_task_type
        )

    def sharing(self) -> str:
        """How the clients' data is drawn, in words: the partition, or the tasks and shots."""
        return f"{len(self.tasks)} tasks, {self.shots} shots per class" if self.tasks else self.partition

    def data_settings(self) -> DataSettings:
        from edgefed.tasks import DataSettings

        return DataSettings(
            self.data,
            self.seed,
            self.clients,
            self.partition,
            self.train_limit,
            self.eval_limit,
            self.tasks,
            self.eval_tasks,
            self.shots,
            self.holdout_shots,
            self.unlabeled_pool,
        )

    def task(self) -> Task:
        """What the run trains for: the method's task, or few-shot multi-task with `tasks`."""
        from edgefed.methods import METHODS
        from edgefed.tasks import TASKS

        return TASKS.create("multitask" if self.tasks else METHODS.create(self.method).task)


@dataclass(frozen=True)
class ServerSettings:
    """How `edgefed server` serves a run: settings of the server process, not of what the run computes
    (so not in config.toml); its flags are built from these fields as the run's are from RunConfig's."""

    heartbeat_s: float = option(1.0, "client heartbeat interval; 3 missed = dropped")
    stream_idle_s: float = option(
        STREAM_IDLE_S, "cancel a client's stream that moves no message for this long"
    )
    split_port: int = option(0, "port of FedBERT's Split service, on the --address host (0: any free port)")


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
    "target_modules": "query,value",
    "profiles": "2×jetson-agx-orin-64gb-maxn+raspberry-pi-5-8gb",
    "freeze": "embeddings,layers:0-1",
    "tasks": "data/mr,data/trec",
    "eval_tasks": "data/cr",
    "client_runtime": "torch,ort",
}
FIELDS = {field.name: field for field in fields(RunConfig)}
TYPES = typing.get_type_hints(RunConfig)
# Keys not written to config.toml: where a run goes is not part of what it computes.
NOT_RECORDED = ("out",)


def key_of(name: str) -> str:
    """The TOML key and flag name of a field: `local_steps` -> `local-steps`."""
    return name.replace("_", "-")


def resolve_config(file_path: str | None, flags: dict[str, Any]) -> RunConfig:
    """Merge the layers and validate the result; every problem is an EdgefedError naming the key."""
    file_values = read_config_file(file_path) if file_path else {}
    preset = flags.get("preset") or file_values.get("preset") or "demo"
    if preset not in PRESETS:
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
    config = RunConfig(**{name: coerce(name, value) for name, value in merged.items()})
    validate(config)
    return config


def config_from_text(text: str, origin: str) -> RunConfig:
    """A resolved configuration as `config_text` wrote it (a run's config.toml, a server's Join reply)."""
    values = config_values(text, origin)
    if values.get("local_epochs") is not None:
        values["local_steps"] = None
    config = RunConfig(**{name: coerce(name, value) for name, value in values.items()})
    validate(config)
    return config


def read_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return config_values(handle.read().decode("utf-8"), path)
    except FileNotFoundError:
        raise EdgefedError(f"{path}: no such config file") from None


def config_values(text: str, origin: str) -> dict[str, Any]:
    """The keys of a TOML text (a file, or the configuration a server sends its clients)."""
    return named_values(parse_toml(text, origin), origin)


def named_values(raw: dict[str, Any], origin: str) -> dict[str, Any]:
    """Option keys (`local-steps`) → field names (`local_steps`); an unknown key is a clear error."""
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            valid = ", ".join(key_of(name) for name in FIELDS)
            raise EdgefedError(f"{origin}: unknown key '{key}'; valid keys: {valid}")
        values[name] = value
    return values


def coerce(name: str, value: Any) -> Any:
    """Check a value's type against the field (TOML and flags both land here)."""
    if value is None:
        return None
    kinds = set(typing.get_args(TYPES[name])) or {TYPES[name]}
    if name in LIST_EXAMPLES:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(item, str) and item for item in items):
            raise EdgefedError(f"{key_of(name)}: expected names like '{LIST_EXAMPLES[name]}'")
        if name == "profiles":
            from edgefed.devices.profiles import parse_fleet

            return parse_fleet(items)
        return tuple(item.strip() for item in items)
    if bool in kinds:
        if not isinstance(value, bool):
            raise EdgefedError(f"{key_of(name)}: expected true or false, got {value!r}")
        return value
    if int in kinds:
        if isinstance(value, bool) or not isinstance(value, int):
            raise EdgefedError(f"{key_of(name)}: expected an integer, got {value!r}")
        return value
    if float in kinds:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise EdgefedError(f"{key_of(name)}: expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise EdgefedError(f"{key_of(name)}: expected a string, got {value!r}")
    return value


def validate(config: RunConfig) -> None:
    """The run's own settings here; each component it names (method, aggregator, codec, task, runtimes,
    the fleet's profiles) checks the settings it reads."""
    from edgefed.aggregators import AGGREGATORS
    from edgefed.codecs import make_codec
    from edgefed.data import parse_partition
    from edgefed.methods import METHODS

    method = METHODS.create(config.method)
    method.check(config)
    if config.max_grad_norm < 0:
        raise EdgefedError(f"max-grad-norm must be 0 (no clipping) or positive, got {config.max_grad_norm}")
    AGGREGATORS.create(config.aggregator).check(config)
    make_codec(config.codec)
    parse_partition(config.partition)
    positive = {
        "clients": config.clients,
        "rounds": config.rounds,
        "rank": config.rank,
        "alpha": config.alpha,
        "batch_size": config.batch_size,
        "local_steps": config.local_steps,
        "local_epochs": config.local_epochs,
        "lr": config.lr,
        "train_limit": config.train_limit,
        "eval_limit": config.eval_limit,
        "min_clients": config.min_clients,
        "round_deadline_s": config.round_deadline_s,
        "max_update_norm": config.max_update_norm,
        "max_client_examples": config.max_client_examples,
        "budget_s": config.budget_s,
        "shots": config.shots,
        "unlabeled_pool": config.unlabeled_pool,
        "pseudo_weight": config.pseudo_weight,
        "energy_temperature": config.energy_temperature,
    }
    for name, value in positive.items():
        if value is not None and value <= 0:
            raise EdgefedError(f"{key_of(name)} must be positive, got {value}")
    if config.profiles:
        from edgefed.devices.fleet import check_fleet_settings

        check_fleet_settings(config.profiles, config.fleet_strategy, config.budget_s)
    config.task().check(config)
    if config.transport not in TRANSPORTS:
        raise EdgefedError(f"unknown transport '{config.transport}'; choose one of: {', '.join(TRANSPORTS)}")
    from edgefed.runtimes import check_runtimes

    check_runtimes(config, method.task)
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
    """The run's configuration as a joining client gets it: the server's data files are named, not
    located (a client reads its own data; where the server keeps its copy is nothing it needs). The
    model stays as the run names it: a client without `--model` loads it from there."""

    def name(path: str) -> str:
        return Path(path).name

    return dataclasses.replace(
        config,
        data=None if config.data is None else name(config.data),
        tasks=tuple(map(name, config.tasks)),
        eval_tasks=tuple(map(name, config.eval_tasks)),
    )


def config_text(config: RunConfig) -> str:
    lines = ["# Resolved configuration of this run: edgefed run --config config.toml"]
    if config.pseudo_labels != "none":
        lines.append(
            "# Pseudo labels: each client labels its own unlabelled pool with the broadcast global model, "
            "on the device; its inputs never leave it."
        )
    for name, value in dataclasses.asdict(config).items():
        if value is None or name in NOT_RECORDED:
            continue
        lines.append(f"{key_of(name)} = {toml_scalar(value)}")
    return "\n".join(lines) + "\n"
