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


def test_a_supernode_without_a_slot_or_data_is_one_clear_error(tmp_path):
    from flwr.app import Context, RecordDict

    from edgefed.config import RunConfig
    from edgefed.flower.client import Run, encoded_data, node_slot

    def context(**node_config) -> Context:
        return Context(run_id=1, node_id=2, node_config=node_config, state=RecordDict(), run_config={})

    with pytest.raises(EdgefedError, match="a SuperNode needs --node-config 'slot=<client index>'"):
        node_slot(context(data="x.tsv"))
    run = Run(RunConfig(), 2, ("classifier",), "f", tokenizer=None)
    with pytest.raises(EdgefedError, match="this SuperNode has no data"):
        encoded_data(run, 0, context(slot=0), None)


@pytest.mark.parametrize(
    "reason",
    [
        "<class 'edgefed.errors.EdgefedError'>:<'this SuperNode has no data: start it with --node-config'>",
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() (pid=7)\n"
        '  File "ray_actor.py", line 65, in run\nflwr.clientapp.client_app.ClientAppException: \n'
        "Exception ClientAppException occurred. Message: this SuperNode has no data: start it with "
        "--node-config\n'>",
    ],
)
def test_the_server_reports_what_a_node_raised_in_one_line(reason):
    from edgefed.flower.transport import client_error

    assert client_error(reason) == "this SuperNode has no data: start it with --node-config"


def test_a_reply_whose_arrays_are_not_edgefed_tensors_is_refused():
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    from edgefed.codecs import make_codec
    from edgefed.flower.records import REPORT, TENSOR_STYPE, UPDATE, checked_reply
    from edgefed.wire.framing import Expected, WireError

    report = MetricRecord({"num_examples": 4, "train_loss": 0.5, "steps": 1, "train_s": 0.1})
    expected = Expected("run", 1, {"w": ((2,), "float32")})
    for stype, message in ((TENSOR_STYPE, "not a StatePayload"), ("numpy.ndarray", "must be of stype")):
        garbage = Array(dtype="float32", shape=(2,), stype=stype, data=b"\xff\xfe not a tensor")
        content = RecordDict({UPDATE: ArrayRecord({"w": garbage}), REPORT: report})
        with pytest.raises(WireError, match=message):
            checked_reply(content, make_codec("none"), expected)
