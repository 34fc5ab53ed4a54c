import dataclasses
import subprocess
import sys

import pytest

from edgefed.aggregators.settings import TrimSettings
from edgefed.components import aggregator_of, method_of, resolve_config
from edgefed.config import RunConfig, settings_fields, write_config
from edgefed.errors import EdgefedError
from edgefed.methods import METHODS
from edgefed.methods.settings import BottleneckSettings, LowRankSettings, SplitSettings
from edgefed.settings import Settings, option


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
        ("rank = 0\n", "rank must be positive, got 0"),
        ('method = "adapter"\nrank = 2.5\n', "rank: expected an integer, got 2.5"),
        ('method = "fedbert"\nsplit-codec = "int3"\n', "split codec 'int3' is not one of"),
        ('method = "ffdapt"\nfreeze = "layers:x"\n', "freeze 'layers:x': expected embeddings"),
        ('aggregator = "trimmed-mean"\ntrim-fraction = 0.5\n', "trim-fraction must be in [0, 0.5)"),
        ('codec = "topk:2"\n', "codec topk:2: the fraction must be in (0, 1]"),
        (
            'method = "bitfit"\nrank = 4\n',
            "rank is a setting of method adapter, method ee-adapter, method federa, method lora; this run's "
            "method bitfit and aggregator fedavg take no rank",
        ),
        ("trim-fraction = 0.1\n", "trim-fraction is a setting of aggregator trimmed-mean"),
        # NaN and Inf pass `<= 0` and every bound they meet: no float setting takes them.
        ("max-update-norm = nan\n", "max-update-norm: expected a finite number, got nan"),
        ("lr = nan\n", "lr: expected a finite number"),
        ("round-deadline-s = inf\n", "round-deadline-s: expected a finite number"),
        ("max-client-share = nan\n", "max-client-share: expected a finite number"),
        ("local-steps = 10000000000\n", "local-steps must be at most 1,000,000"),
        (
            "local-steps = 100000000000000000000\n",
            "local-steps: expected an integer within TOML's 64-bit range",
        ),
        ("clients = 1000000\n", "clients must be at most 100,000"),
        ("round-deadline-s = 1e9\n", "round-deadline-s must be at most 604,800"),
        ('profiles = "99999999999×raspberry-pi-5-8gb"\n', "count must be at least 1 and at most 100,000"),
        ('profiles = "60000×raspberry-pi-5-8gb+60000×raspberry-pi-5-8gb"\n', "at most 100,000"),
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
    assert isinstance(again, RunConfig) and again.method_settings.target_modules == ("query", "key", "value")


def test_each_component_is_built_with_its_own_settings(tmp_path):
    """Keys go to the component that declares them; Registry.create hands them over; config.toml records
    the run's own keys and its components' settings, no other component's."""
    config = resolve_config(
        None, {"method": "adapter", "rank": 3, "aggregator": "trimmed-mean", "trim_fraction": 0.25}
    )
    assert config.method_settings == BottleneckSettings(rank=3)
    assert config.aggregator_settings == TrimSettings(trim_fraction=0.25)
    assert method_of(config).settings.rank == 3
    assert aggregator_of(config).settings.trim_fraction == 0.25
    assert METHODS.create("lora").settings == LowRankSettings()  # no settings: the defaults
    write_config(config, tmp_path / "config.toml")
    keys = {line.split(" = ")[0] for line in (tmp_path / "config.toml").read_text().splitlines()[1:]}
    assert {"rank", "trim-fraction"} <= keys and not {"alpha", "target-modules", "freeze"} & keys
    assert resolve_config(str(tmp_path / "config.toml"), {}) == config


def test_a_component_refuses_settings_of_another_type():
    with pytest.raises(TypeError, match="LoRA takes LowRankSettings"):
        METHODS.create("lora", SplitSettings())


def test_a_key_has_one_meaning_across_the_components():
    @dataclasses.dataclass(frozen=True)
    class Wider(Settings):
        rank: int = option(16, "another rank")

    assert settings_fields((LowRankSettings, BottleneckSettings))["rank"].default == 8
    with pytest.raises(TypeError, match="a key declared twice with two meanings"):
        settings_fields((LowRankSettings, Wider))


def test_the_command_line_builds_its_flags_without_torch():
    """Every component's settings are flags of `edgefed run`, declared in modules that import no torch."""
    code = "import sys, edgefed.cli; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("content", [None, b"rounds = 3\n\xff\xfe\n"])
def test_a_config_file_that_cannot_be_read_is_one_line(tmp_path, content):
    path = tmp_path / "run.toml"
    path.mkdir() if content is None else path.write_bytes(content)
    with pytest.raises(EdgefedError, match="cannot read it as a config file"):
        resolve_config(str(path), {})
