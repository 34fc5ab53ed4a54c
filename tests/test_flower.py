"""A Flower app's configuration: `[tool.flwr.app.config]` keys are edgefed's options (the simulation
itself is in tests/test_transport.py's suite)."""

import sys

import pytest

from edgefed.errors import EdgefedError

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="Flower 1.42 needs Python 3.11")


def test_a_flower_app_config_sets_edgefed_options():
    from edgefed.flower.app import flower_run_config

    config = flower_run_config({"method": "lora", "local-steps": 3, "clients": 6, "codec": "int8"})
    assert (config.method, config.local_steps, config.clients, config.codec) == ("lora", 3, 6, "int8")
    assert flower_run_config({}).method == "federa", "unset keys keep edgefed's defaults"


@pytest.mark.parametrize(
    ("run_config", "message"),
    [
        ({"learning-rate": 0.1}, r"\[tool.flwr.app.config\]: unknown key 'learning-rate'; valid keys: "),
        ({"local-steps": "ten"}, "local-steps: expected an integer, got 'ten'"),
        ({"codec": "int3"}, "int3"),
    ],
)
def test_a_bad_flower_app_config_is_one_clear_error(run_config, message):
    from edgefed.flower.app import flower_run_config

    with pytest.raises(EdgefedError, match=message):
        flower_run_config(run_config)
