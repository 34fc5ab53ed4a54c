"""The run's components, built from its configuration: the method and aggregator with their own
settings, the codec, the task and its data, the client runtimes and the fleet's profiles.

A configuration is resolved here (`resolve_config`): the layers merged (edgefed/config.py), each key
handed to the component that declares it, and every component asked to check what it reads. A key
that no chosen component declares is refused with the components that would take it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from edgefed.aggregators import AGGREGATORS, Aggregator
from edgefed.codecs import make_codec
from edgefed.config import (
    SETTINGS_FIELDS,
    RunConfig,
    check_run,
    key_of,
    merged_values,
    recorded_values,
    run_config,
)
from edgefed.data import parse_partition
from edgefed.devices.fleet import check_fleet_settings
from edgefed.errors import EdgefedError
from edgefed.methods import METHODS, Method
from edgefed.models import is_causal_lm
from edgefed.runtimes import check_runtimes
from edgefed.tasks import TASKS, DataSettings, Task
from edgefed.types import AdapterSpec


def resolve_config(file_path: str | None, flags: dict[str, Any]) -> RunConfig:
    """Defaults < preset < file < flags, merged and checked; every problem is an EdgefedError naming
    the key."""
    return composed(merged_values(file_path, flags))


def config_from_text(text: str, origin: str) -> RunConfig:
    """A resolved configuration as `config_text` wrote it (a run's config.toml, a server's Join reply)."""
    return composed(recorded_values(text, origin))


def composed(values: dict[str, Any]) -> RunConfig:
    """The run's configuration from field-named values: its own fields, and each component's settings
    from the keys it declares; then checked."""
    config = run_config(values)
    given = {name: value for name, value in values.items() if name in SETTINGS_FIELDS}
    slots = (("method", METHODS, config.method), ("aggregator", AGGREGATORS, config.aggregator))
    settings = {}
    for kind, registry, name in slots:
        settings_type = registry.settings_type(name)
        own = {key: given.pop(key) for key in list(given) if key in settings_type.fields()}
        settings[f"{kind}_settings"] = settings_type.from_values(own)
    config = dataclasses.replace(config, **settings)
    validate(config)  # first: a run its components refuse is the clearer error
    if given:
        raise EdgefedError(stray_key(next(iter(given)), config))
    return config


def taken(values: dict[str, Any]) -> dict[str, Any]:
    """`values` without the settings keys that their method and aggregator do not declare: a sweep's
    shared keys (a bench grid's `[run]`) apply to the runs whose components take them."""
    method = METHODS.settings_type(values.get("method", RunConfig.method)).fields()
    aggregator = AGGREGATORS.settings_type(values.get("aggregator", RunConfig.aggregator)).fields()
    return {
        name: value
        for name, value in values.items()
        if name not in SETTINGS_FIELDS or name in method or name in aggregator
    }


def stray_key(name: str, config: RunConfig) -> str:
    """Why a key the run's components do not declare is refused, naming those that do."""
    owners = [
        f"{kind} {component}"
        for kind, registry in (("method", METHODS), ("aggregator", AGGREGATORS))
        for component in registry.names()
        if name in registry.settings_type(component).fields()
    ]
    return (
        f"{key_of(name)} is a setting of {', '.join(owners)}; this run's method {config.method} and "
        f"aggregator {config.aggregator} take no {key_of(name)}"
    )


def validate(config: RunConfig) -> None:
    """The run's own settings, then each component it names checks what it reads."""
    check_run(config)
    method = method_of(config)
    method.check(config)
    aggregator_of(config).check(config)
    make_codec(config.codec)
    parse_partition(config.partition)
    if config.profiles:
        check_fleet_settings(config.profiles, config.fleet_strategy, config.budget_s)
    task_of(config).check(config)
    check_runtimes(config, method.task)


def method_of(config: RunConfig) -> Method:
    """The run's method, built with its settings."""
    return METHODS.create(config.method, config.method_settings)


def aggregator_of(config: RunConfig) -> Aggregator:
    """The run's aggregator, built with its settings."""
    return AGGREGATORS.create(config.aggregator, config.aggregator_settings)


# What a method's task becomes on a decoder LM: fine-tuning answers prompts.
DECODER_TASKS = {"classification": "instruction"}


def task_of(config: RunConfig) -> Task:
    """What the run trains for: the method's task (on a decoder LM, its decoder form), or few-shot
    multi-task with `tasks`."""
    if config.tasks:
        return TASKS.create("multitask")
    method = method_of(config)
    task = method.task
    if is_causal_lm(config.model):
        if task not in DECODER_TASKS or not method.trains_decoders:
            raise EdgefedError(
                f"{config.method} ({task}) does not train decoder LMs yet; use lora, federa, fft or bitfit"
            )
        return TASKS.create(DECODER_TASKS[task])
    return TASKS.create(task)


def data_settings(config: RunConfig) -> DataSettings:
    """What the task reads its data with."""
    return DataSettings(
        config.data,
        config.seed,
        config.clients,
        config.partition,
        config.train_limit,
        config.eval_limit,
        config.tasks,
        config.eval_tasks,
        config.shots,
        config.holdout_shots,
        config.unlabeled_pool,
        config.prompt_template,
    )


def adapter_spec(config: RunConfig, method: Method, new_modules: tuple[str, ...]) -> AdapterSpec:
    """What shapes the run's adapted model, whose checkpoint lacked `new_modules`: they train as its
    head (none new: its family's own head), and peft calls it as its family says."""
    family = task_of(config).model_family
    spec = method.adapter_spec(tuple(new_modules) or family.head_modules, family.peft_task_type)
    return spec if spec.target_modules else dataclasses.replace(spec, target_modules=family.target_modules)
