import dataclasses

import pytest

from edgefed.config import RunConfig, resolve_config, write_config
from edgefed.errors import EdgefedError


def toml(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_defaults_are_the_demo():
    config = resolve_config(None, {})
    assert (config.method, config.clients, config.partition, config.preset) == (
        "federa",
        4,
        "dirichlet:0.5",
        "demo",
    )


def test_flags_override_the_file_which_overrides_the_preset(tmp_path):
    path = toml(tmp_path, 'preset = "smoke"\nrounds = 5\nmethod = "lora"\n')
    from_file = resolve_config(path, {})
    assert (from_file.rounds, from_file.method, from_file.max_seq_len) == (5, "lora", 32)  # 32 from smoke
    from_flags = resolve_config(path, {"rounds": 7, "max_seq_len": 48})
    assert (from_flags.rounds, from_flags.method, from_flags.max_seq_len) == (7, "lora", 48)


def test_dashed_and_underscored_keys_are_the_same(tmp_path):
    assert resolve_config(toml(tmp_path, "local-steps = 3\nbatch_size = 4\n"), {}).local_steps == 3


def test_local_epochs_replace_local_steps_layer_by_layer(tmp_path):
    path = toml(tmp_path, "local-epochs = 2\n")
    assert (resolve_config(path, {}).local_steps, resolve_config(path, {}).local_epochs) == (None, 2.0)
    overridden = resolve_config(path, {"local_steps": 5})
    assert (overridden.local_steps, overridden.local_epochs) == (5, None)
    with pytest.raises(EdgefedError, match="not both"):
        resolve_config(None, {"local_steps": 5, "local_epochs": 1.0})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("roundz = 3\n", "unknown key 'roundz'; valid keys: preset, method"),
        ('rounds = "three"\n', "rounds: expected an integer, got 'three'"),
        (
            'method = "qlora"\n',
            "unknown method 'qlora'; choose one of: adapter, bitfit, ee-adapter, fdapt, fedbert, federa, "
            "ffdapt, fft, lora",
        ),
        (
            'aggregator = "krum"\n',
            "unknown aggregator 'krum'; choose one of: adaptive, fedavg, hetero, median, product, "
            "trimmed-mean",
        ),
        ('partition = "dirichlet:-1"\n', "positive alpha"),
        ("sample-fraction = 1.5\n", "sample-fraction must be in (0, 1]"),
        ("target-accuracy = 85\n", "target-accuracy is a fraction"),
        ("stop-at-target = true\n", "stop-at-target needs target-accuracy"),
        ("clients = 0\n", "clients must be positive"),
        ('preset = "huge"\n', "unknown preset 'huge'; choose one of: demo, smoke"),
        ("rounds = [\n", "invalid TOML"),
    ],
)
def test_bad_config_values_are_named(tmp_path, text, message):
    with pytest.raises(EdgefedError) as error:
        resolve_config(toml(tmp_path, text), {})
    assert message in str(error.value)


def test_written_config_resolves_to_the_same_run(tmp_path):
    config = resolve_config(
        None,
        {
            "method": "lora",
            "local_epochs": 1.5,
            "target_modules": "query,key,value",
            "lr": 0.001,
            "out": "somewhere",
        },
    )
    write_config(config, tmp_path / "config.toml")
    again = resolve_config(str(tmp_path / "config.toml"), {})
    assert again == dataclasses.replace(config, out=None)
    assert isinstance(again, RunConfig) and again.target_modules == ("query", "key", "value")
