"""Anytime inference (`edgefed predict`): the deepest exit that fits a latency budget, or a confident one."""

import pytest

from edgefed.anytime import AnytimePredictor
from edgefed.cli import main
from edgefed.devices.costmodel import inference_seconds
from edgefed.errors import EdgefedError
from tests.test_run import tiny_run

PROFILE = "raspberry-pi-5-8gb"
TEXTS = ["a gripping , funny film", "dull and far too long", "the cast is fine"]


@pytest.fixture(scope="module")
def ee_run(tmp_path_factory, tiny_model_dir, small_data_dir):
    return tiny_run(
        tmp_path_factory.mktemp("anytime"), tiny_model_dir, small_data_dir, method="ee-adapter", rounds=1
    )


def test_deeper_exits_are_predicted_slower_and_the_budget_picks_the_deepest_that_fits(ee_run):
    everything = AnytimePredictor(ee_run, PROFILE)
    first, second = everything.latencies_ms[1], everything.latencies_ms[2]
    assert 0 < first < second
    assert first == pytest.approx(1e3 * inference_seconds(everything.shape, 1, 24, everything.profile))
    assert everything.depth == 2
    shallow = AnytimePredictor(ee_run, PROFILE, latency_ms=(first + second) / 2)
    predictions = list(shallow.predict(TEXTS))
    assert shallow.depth == 1 and [p.exit_layer for p in predictions] == [1, 1, 1]
    assert all(p.latency_ms == first and 0.5 <= p.probability <= 1 for p in predictions)
    # Exit 1's answer does not depend on whether block 2 runs.
    deep = list(everything.predict(TEXTS))
    assert all(p.exit_layer == 2 for p in deep)


def test_a_confidence_rule_stops_at_the_first_exit_that_sure(ee_run):
    predictor = AnytimePredictor(ee_run, PROFILE, confidence=1e-6)  # every exit is that sure
    assert [p.exit_layer for p in predictor.predict(TEXTS)] == [1, 1, 1]
    predictor = AnytimePredictor(ee_run, PROFILE, confidence=1.0)  # no exit of a tiny model is
    assert [p.exit_layer for p in predictor.predict(TEXTS)] == [2, 2, 2]


def test_the_command_reads_stdin_and_prints_a_line_per_text(ee_run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("\n".join(TEXTS) + "\n\n"))
    assert main(["predict", "--run", str(ee_run), "--profile", PROFILE, "--latency-ms", "1000"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 3 and all(line.split("\t")[0] in {"negative", "positive"} for line in lines)
    assert all(line.split("\t")[2] == "exit 2" and line.endswith("ms SIMULATED") for line in lines)
    assert "SIMULATED" in captured.err and "answering from exit 2" in captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profile", PROFILE, "--latency-ms", "1e-9"], "no exit fits"),
        (["--latency-ms", "5"], "needs the device"),
        (["--confidence", "1.5"], "confidence is a probability"),
        (["--input", "/no/such/file"], "/no/such/file"),
    ],
)
def test_bad_predict_requests_get_one_line_and_exit_2(ee_run, capsys, args, message):
    assert main(["predict", "--run", str(ee_run), *args]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1


def test_a_run_that_did_not_finish_is_refused(tmp_path):
    with pytest.raises(EdgefedError):
        AnytimePredictor(tmp_path)
