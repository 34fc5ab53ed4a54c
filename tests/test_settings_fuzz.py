"""Any value of any setting, as a flag of `edgefed run`, `server` or `client`, in a TOML config file or
in the environment, either runs or is refused in one line: never a traceback, never a hang (issue 33).

Hypothesis draws the values: integers huge, negative and zero; floats NaN, ±inf, -0.0, 1e308 and
subnormal; text with control characters, line breaks, NUL and a command line's non-UTF-8 bytes; lists,
tables and raw TOML; garbage bytes, a folder or nothing as the file. `main` runs for real up to the step
that would start the work (the federation's `run` and `serve`, Flower's `simulate`, the client's
`GrpcClient`), which stands aside and raises `Accepted` with what it was given: everything before it,
parsing, the layers and every component's checks, is what is fuzzed. What is accepted must be sane on
its own terms (finite, positive and within its caps, a real port) and read back from its own config.toml
as the same configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, example, given, settings
from hypothesis import strategies as st

from edgefed.aggregators import AGGREGATORS
from edgefed.cli import main
from edgefed.cli.client import MAX_THREADS
from edgefed.cli.client import SETTINGS as CLIENT_SETTINGS
from edgefed.codecs.base import CODECS
from edgefed.components import config_from_text
from edgefed.config import (
    FIELDS,
    PRESETS,
    SETTINGS_FIELDS,
    SETTINGS_TYPES,
    TRANSPORTS,
    TYPES,
    RunConfig,
    ServerSettings,
    config_text,
)
from edgefed.data.partition import parse_partition
from edgefed.devices.fleet import FLEET_STRATEGIES
from edgefed.devices.profiles import profile_names
from edgefed.errors import EdgefedError
from edgefed.methods import METHODS
from edgefed.methods.settings import SPLIT_CODECS, SPLIT_STRATEGIES
from edgefed.runtimes import RUNTIMES
from edgefed.settings import MAX_CLIENTS, MAX_COUNT, MAX_INT, MIN_INT, key_of, shown
from edgefed.tasks.pseudo import PSEUDO_LABELS
from edgefed.toml_io import toml_key, toml_scalar

# A few seconds an example: a hang fails; the first import of a runtime (warmed below) does not.
FUZZ = settings(
    max_examples=200,
    deadline=timedelta(seconds=5),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Accepted(Exception):
    """What the step that would start the work was given: the arguments of `run`, `serve`, `simulate`
    or `GrpcClient`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__("accepted")
        self.args_given, self.kwargs_given = args, kwargs


def stand_aside(*args: Any, **kwargs: Any) -> None:
    raise Accepted(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class Raw:
    """A value written into the TOML file as it is: not TOML, or TOML no writer makes."""

    text: str


# Paths the values may name, made in each test's folder: a file of garbage bytes (as data or as a
# profile), a folder (also one named like a profile file) and nothing.
PLACES = ("@garbage.toml", "@garbage.tsv", "@folder.toml", "@folder", "@missing")


@pytest.fixture(scope="module", autouse=True)
def warm_runtimes() -> None:
    """Import every client runtime once, so that no example's deadline pays for it."""
    for name in RUNTIMES.names():
        with contextlib.suppress(EdgefedError):
            RUNTIMES.create(name).require()


@pytest.fixture
def places(tmp_path: Path) -> Callable[[str], str]:
    """Replace PLACES in a text with real paths in tmp_path."""
    for name in ("garbage.toml", "garbage.tsv"):
        (tmp_path / name).write_bytes(b"\xff\xfe\x00rounds = \x80\n")
    (tmp_path / "folder.toml").mkdir()
    (tmp_path / "folder").mkdir()

    def place(text: str) -> str:
        for token in PLACES:
            text = text.replace(token, str(tmp_path / token[1:]))
        return text

    return place


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> None:
    """The steps that would train, serve or connect raise Accepted instead; and, for speed, the
    parser is built once and the installed runtimes' entry points read once (each is half of a call)."""
    from edgefed import cli, runtimes
    from edgefed.federation import runner
    from edgefed.transport import grpc_client

    monkeypatch.setattr(cli, "build_parser", functools.cache(cli.build_parser))
    monkeypatch.setattr(runtimes, "entry_points", functools.cache(runtimes.entry_points))
    monkeypatch.setattr(runner, "run", stand_aside)
    monkeypatch.setattr(runner, "serve", stand_aside)
    monkeypatch.setattr(grpc_client, "GrpcClient", stand_aside)
    flower = types.ModuleType("edgefed.flower.app")
    flower.simulate = stand_aside  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "edgefed.flower.app", flower)


def tally(what: str) -> None:
    """Count an outcome for `pytest --hypothesis-show-statistics`."""
    if currently_in_test_context():
        event(what)


def outcome(argv: list[str], environ: dict[str, str] | None = None) -> Accepted | None:
    """`edgefed ARGV`: Accepted where it got as far as starting the work; None where it refused in one
    line (an EdgefedError, exit status 2), or argparse did (usage, then one line, exit status 2). Any
    other exception propagates: the test fails with its traceback."""
    errors = io.StringIO()
    environment = {name: value for name, value in os.environ.items() if not name.startswith("EDGEFED_")}
    with (
        mock.patch.object(os, "environ", {**environment, **(environ or {})}),
        contextlib.redirect_stderr(errors),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        try:
            status = main(argv)
        except Accepted as accepted:
            tally("accepted")
            return accepted
        except SystemExit as exit:  # argparse: its usage, then its one line of error
            assert exit.code == 2, errors.getvalue()
            lines = [line for line in errors.getvalue().splitlines() if not re.match(r"usage: | |$", line)]
            assert len(lines) == 1 and re.match(r"edgefed( \w+)?: error: ", lines[0]), errors.getvalue()
            tally("refused by argparse")
            return None
    lines = errors.getvalue().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("edgefed: error: "), errors.getvalue()
    reason = re.sub(r"^\S*(run|client)\.toml: ", "", lines[0].removeprefix("edgefed: error: "))
    tally("refused: " + " ".join(re.sub(r"[^a-z-]", " ", reason).split()[:2]))
    return None


TRICKY = ("", " ", "\x00", "\n", "a\nb", "\r", "\t", "\x7f", "\x85", "\u2028", "é", "²", "١٢٣", "-1")
TRICKY += ("nan", "inf", "-inf", "1e999", "-0.0", "0x10", "1_000", ",", " , ", "a,,b", "×", "@", "'")
TRICKY += ('"', "\\")


def evenly(*strategies: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """One of `strategies`, each as often (one_of favours some branches); name one twice to weigh it."""
    return st.sampled_from(strategies).flatmap(lambda strategy: strategy)


def text(*, command_line: bool = False) -> st.SearchStrategy[str]:
    """Any text, with the tricky ones often; on a command line also the surrogates that a file name's
    non-UTF-8 bytes become (which no TOML file holds)."""
    tricky = st.sampled_from(TRICKY)
    parts = [tricky, st.text(max_size=24), st.sampled_from(PLACES)]
    if command_line:
        parts.append(
            st.binary(min_size=1, max_size=8).map(lambda raw: raw.decode("utf-8", "surrogateescape"))
        )
    return st.one_of(*parts)


# Anything else on the command line: an unknown flag, a stray word (never the help, which exits 0).
JUNK = text(command_line=True).filter(lambda word: not word.startswith(("-h", "--h")))
INTEGERS = st.one_of(
    st.integers(-3, 70_000),
    st.integers(),
    st.sampled_from((MAX_CLIENTS, MAX_CLIENTS + 1, MAX_COUNT, MAX_COUNT + 1, 1023, 1024, 4 << 20, 4097)),
    st.sampled_from((65535, 65536, MAX_INT, MAX_INT + 1, MIN_INT - 1, 2**64, 10**400, -(10**400))),
)
FLOATS = st.one_of(
    st.floats(),  # NaN, ±inf, -0.0, subnormals and the extremes among the others
    st.floats(0, 1),
    st.sampled_from((math.nan, math.inf, -math.inf, -0.0, 5e-324, 2.2250738585072014e-308, 1e308)),
    st.sampled_from(
        (1.7976931348623157e308, 0.5, 0.49999999999999994, 1.0000000000000002, 3600.0000000000005)
    ),
)
PATHS = ["@garbage.tsv", "@folder", "@missing", "all-MiniLM-L6-v2"]
# The values a key's component takes, and some it nearly takes: the fuzz gets past the first check.
NAMES: dict[str, list[str]] = {
    "preset": list(PRESETS),
    "method": METHODS.names(),
    "aggregator": AGGREGATORS.names(),
    "codec": [
        *CODECS.names(),
        "topk:0.1",
        "topk:0",
        "topk:nan",
        "topk:1e-320",
        "topk:" + "9" * 400,
        "int8:2",
    ],
    "partition": [
        *("iid", "iid:1", "dirichlet:0.5", "dirichlet:0", "dirichlet:nan", "dirichlet:1e-320"),
        *("dirichlet:inf", "dirichlet:" + "9" * 400, "dirichlet:-1"),
    ],
    "pseudo_labels": list(PSEUDO_LABELS),
    "transport": list(TRANSPORTS),
    "fleet_strategy": list(FLEET_STRATEGIES),
    "split_strategy": list(SPLIT_STRATEGIES),
    "split_codec": list(SPLIT_CODECS),
    "client_runtime": RUNTIMES.names(),
    "target_modules": ["query", "value", "key", "dense"],
    "freeze": ["embeddings", "layers:0", "layers:0-1", "layers:3-1", "layers:x", "layers:" + "9" * 5000],
    "profiles": [
        *profile_names(),
        *("2×laptop-x86-cpu", "raspberry-pi-5-8gb@3", "0×laptop-x86-cpu", "1000×jetson-orin-nano-8gb"),
        *("laptop-x86-cpu@0", "laptop-x86-cpu@²", "²×laptop-x86-cpu", "9" * 5000 + "×laptop-x86-cpu"),
        *("@garbage.toml", "@folder.toml", "@missing.toml"),
    ],
    **{name: PATHS for name in ("data", "model", "out", "tasks", "eval_tasks")},
}
RUN_KEYS = sorted([*FIELDS, *SETTINGS_FIELDS])
KINDS = {**TYPES, **SETTINGS_TYPES}


def typed(name: str, *, command_line: bool) -> st.SearchStrategy[Any]:
    """Values of the key's own type (or near it), edge cases first."""
    kinds = set(typing.get_args(KINDS[name])) or {KINDS[name]}
    words = text(command_line=command_line)
    named = st.one_of(st.sampled_from(NAMES[name]), words) if name in NAMES else words
    if any(typing.get_origin(kind) is tuple for kind in kinds):
        return st.lists(named, max_size=4)
    if bool in kinds:
        return st.booleans()
    if int in kinds:
        return INTEGERS
    if float in kinds:
        return st.one_of(FLOATS, INTEGERS)
    return named


TOML_VALUES = st.recursive(
    st.one_of(st.booleans(), INTEGERS, FLOATS, text()),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text(), inner, max_size=2)),
    max_leaves=6,
)
RAW_TOML = st.sampled_from(
    [
        *("9" * 5000, "0x" + "f" * 5000, "[" * 5000 + "]" * 5000, "{a=" * 2000 + "1" + "}" * 2000),
        *("1979-05-27", "nan", "-inf", "1e999", "0o777", "0b2", "+0", "-0", "1__0", "'", "[1,"),
        *('"\\u0000"', '"\\ud800"'),
    ]
)


def run_values(*, command_line: bool) -> st.SearchStrategy[dict[str, Any]]:
    """Up to 5 run keys with values, after a method and an aggregator (whose settings then apply)."""
    other = text(command_line=command_line) if command_line else st.one_of(TOML_VALUES, RAW_TOML.map(Raw))

    def pair(name: str) -> st.SearchStrategy[tuple[str, Any]]:
        return st.tuples(st.just(name), st.one_of(typed(name, command_line=command_line), other))

    components = st.fixed_dictionaries(
        {},
        optional={
            "method": st.sampled_from(METHODS.names()),
            "aggregator": st.sampled_from(AGGREGATORS.names()),
        },
    )
    pairs = st.lists(st.sampled_from(RUN_KEYS).flatmap(pair), max_size=5, unique_by=lambda item: item[0])
    return st.builds(lambda first, rest: {**first, **dict(rest)}, components, pairs)


def flag(key: str, value: Any, place: Callable[[str], str]) -> list[str]:
    """`--key=value` as a user types it (a list comma-separated, a boolean its --key or --no-key)."""
    if isinstance(value, bool):
        return [f"--{key}" if value else f"--no-{key}"]
    if isinstance(value, list):
        value = ",".join(map(str, value))
    return [f"--{key}={place(repr(value) if isinstance(value, float) else str(value))}"]


def toml_line(key: str, value: Any, place: Callable[[str], str]) -> str:
    """`key = value` as the project's TOML writer writes it (a Raw value as it is)."""
    if isinstance(value, Raw):
        return f"{toml_key(key)} = {value.text}\n"
    if isinstance(value, str):
        value = place(value)
    elif isinstance(value, list):
        value = [place(item) if isinstance(item, str) else item for item in value]
    return f"{toml_key(key)} = {toml_scalar(value)}\n"


def written(value: Any) -> bool:
    """Whether a TOML file can hold the value (a command line's non-UTF-8 bytes it cannot)."""
    try:
        toml_scalar(value).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def assert_sane(config: RunConfig) -> None:
    """What any accepted configuration holds, restated apart from the checks that accepted it."""
    values = {name: getattr(config, name) for name in FIELDS}
    for component in (config.method_settings, config.aggregator_settings):
        assert component is not None
        values.update(component.values())
    for name, value in values.items():
        if isinstance(value, float):
            assert math.isfinite(value), name
        elif isinstance(value, int) and not isinstance(value, bool):
            assert MIN_INT <= value <= MAX_INT, name  # TOML's 64-bit integers: config.toml records it
        for item in value if isinstance(value, tuple) else [value] if isinstance(value, str) else []:
            assert "\x00" not in item and item.strip(), name  # no blank name, in a list or not
            item.encode("utf-8")  # config.toml is UTF-8
    assert 1 <= config.clients <= MAX_CLIENTS
    assert config.min_clients is None or 1 <= config.min_clients <= config.clients
    assert (config.local_steps is None) != (config.local_epochs is None)
    for name in ("rounds", "batch_size", "shots", "unlabeled_pool", "local_steps", "local_epochs", "rank"):
        assert values.get(name) is None or 0 < values[name] <= MAX_COUNT, name
    for name in ("lr", "round_deadline_s", "budget_s", "max_update_norm", "pseudo_weight", "alpha"):
        assert values.get(name) is None or values[name] > 0, name
    for name in ("energy_temperature", "train_limit", "eval_limit", "max_client_examples"):
        assert values[name] is None or values[name] > 0, name
    for name in ("sample_fraction", "max_client_share", "target_accuracy"):
        assert values[name] is None or 0 < values[name] <= 1, name
    assert 0 <= values.get("trim_fraction", 0) < 0.5
    assert config.max_grad_norm >= 0 and config.seed >= 0
    assert 1024 <= config.chunk_bytes <= 4 << 20 and 8 <= config.max_seq_len <= 4096
    assert config.transport in TRANSPORTS and config.preset in PRESETS
    assert config.method in METHODS.names() and config.aggregator in AGGREGATORS.names()
    alpha = parse_partition(config.partition)[1]
    assert alpha is None or 0 < alpha < math.inf
    # Its config.toml (written at the start of a run, read on --resume and by joining clients) reads
    # back as the same configuration, but for where the run goes, which it does not record.
    assert config_from_text(config_text(config), "config.toml") == dataclasses.replace(config, out=None)


def assert_address(address: str) -> None:
    """HOST:PORT, a host gRPC can encode and a port from 0 to 65535."""
    assert re.fullmatch(r"[!-~]+:[0-9]{1,5}", address) and int(address.rpartition(":")[2]) <= 65535


def assert_sane_server(accepted: Accepted) -> None:
    """What `serve` is given, when accepted: a real address, settings in their ranges, a sane run."""
    config, address = accepted.args_given
    assert_address(address)
    server = accepted.kwargs_given["settings"]
    assert math.isfinite(server.heartbeat_s) and 0 < server.heartbeat_s <= 3600
    assert math.isfinite(server.stream_idle_s) and server.stream_idle_s >= 1
    assert 0 <= server.split_port <= 65535
    assert_sane(config)


@FUZZ
@given(values=run_values(command_line=True), extra=st.lists(st.one_of(st.just("--resume"), JUNK), max_size=2))
@example(values={"seed": -1}, extra=[])  # numpy refuses it when the data is partitioned
@example(values={"seed": 2**64}, extra=[])  # torch.manual_seed overflows
@example(values={"partition": "dirichlet:" + "9" * 400}, extra=[])  # alpha = inf
@example(values={"profiles": "laptop-x86-cpu@²"}, extra=[])  # isdigit, then int(): a ValueError
@example(values={"profiles": "9" * 5000 + "×laptop-x86-cpu"}, extra=[])  # int() of 5,000 digits
@example(values={"profiles": f"{MAX_CLIENTS}×laptop-x86-cpu"}, extra=[])  # 100,000 loads: 20 s
@example(values={"profiles": "@garbage.toml"}, extra=[])  # a UnicodeDecodeError
@example(values={"method": "lora\nqlora"}, extra=[])  # quoted in the error: two lines
@example(values={"data": "\udcffdata.tsv"}, extra=[])  # accepted, but config.toml cannot hold it
@example(values={"target_modules": "query, "}, extra=[])  # an empty module name
@example(values={"method": "lora", "rank": 10**18}, extra=[])  # no cap on the rank
@example(values={"out": ""}, extra=[])  # the run would go to the working folder
@example(values={"profiles": "9" * 400}, extra=[])  # a name too long for a path: an OSError
@example(values={}, extra=["--batch_size=a\nb"])  # argparse quotes an unknown flag on two lines
def test_any_run_flag_starts_the_run_or_is_refused_in_one_line(
    values: dict[str, Any], extra: list[str], places: Callable[[str], str], stand_ins: None
) -> None:
    argv = ["run", *(arg for name, value in values.items() for arg in flag(key_of(name), value, places))]
    accepted = outcome([*argv, *extra])
    if accepted is not None:
        assert_sane(accepted.args_given[0])


@settings(FUZZ, max_examples=300)
@given(
    lines=st.builds(
        lambda values, unknown: [*values.items(), *unknown],
        run_values(command_line=False),
        evenly(st.just([]), st.just([]), st.just([]), st.lists(st.tuples(text(), TOML_VALUES), max_size=1)),
    ),
    dashed=st.booleans(),
)
@example(lines=[("lr", 10**400)], dashed=True)  # float() overflows
@example(lines=[("rounds", Raw("9" * 5000))], dashed=True)  # tomllib's int() of 5,000 digits
@example(lines=[("rounds", Raw("0x" + "f" * 5000))], dashed=True)  # then the error's f"{value:,}"
@example(lines=[("rounds", Raw("[" * 5000 + "]" * 5000))], dashed=True)  # a RecursionError
@example(lines=[("seed", 2**64)], dashed=True)  # past TOML's 64 bits: torch.manual_seed overflows
@example(lines=[("out", "runs/a\x00b")], dashed=True)  # a NUL in a path, accepted
@example(lines=[("tasks", ["@folder", " "])], dashed=True)  # an empty task name, accepted
@example(lines=[("rounds\nclients", 1)], dashed=True)  # an unknown key, quoted on two lines
@example(lines=[("preset", ["smoke"])], dashed=True)  # `preset not in PRESETS`: a TypeError
def test_any_config_file_value_starts_the_run_or_is_refused_in_one_line(
    lines: list[tuple[str, Any]], dashed: bool, places: Callable[[str], str], stand_ins: None, tmp_path: Path
) -> None:
    path = tmp_path / "run.toml"
    keys = [key_of(name) if dashed else name for name, _ in lines]
    path.write_text(
        "".join(toml_line(key, value, places) for key, (_, value) in zip(keys, lines, strict=True)), "utf-8"
    )
    accepted = outcome(["run", "--config", str(path)])
    if accepted is not None:
        assert_sane(accepted.args_given[0])


KEY_LINES = st.lists(st.tuples(st.sampled_from(RUN_KEYS).map(key_of), st.text(max_size=12)), max_size=4).map(
    lambda pairs: "".join(f"{key} = {value}\n" for key, value in pairs)
)


@settings(FUZZ, max_examples=150)
@given(
    content=st.one_of(
        st.binary(max_size=200),
        st.tuples(KEY_LINES, st.sampled_from(["utf-8", "utf-16", "latin-1", "cp1252"])).map(
            lambda text_codec: text_codec[0].encode(text_codec[1], "replace")
        ),
        st.sampled_from([b"rounds = 3\n\xff", b"\x00", b"rounds = 3\x00\n", b"\xef\xbb\xbfrounds = 3\n"]),
    )
)
def test_any_bytes_as_the_config_file_start_the_run_or_are_refused_in_one_line(
    content: bytes, stand_ins: None, tmp_path: Path
) -> None:
    path = tmp_path / "run.toml"
    path.write_bytes(content)
    accepted = outcome(["run", "--config", str(path)])
    if accepted is not None:
        assert_sane(accepted.args_given[0])


# Every key meets each of these, beside what hypothesis draws: a value a check lets through is found
# whatever the odds of drawing that key with that value.
EDGES: tuple[Any, ...] = (math.nan, math.inf, -math.inf, -0.0, 0, -1, 1, 5e-324, 1e308, 65536)
EDGES += (MAX_COUNT + 1, MAX_INT + 1, 10**400, True, False, "", " ", "\n", "\x00", "x, ", [], ["query", ""])
EDGES += ({"a": 1}, 2**64, "a\nb")


def takers(name: str) -> list[dict[str, str]]:
    """A method or aggregator for each settings class that holds the key `name` (the run's own keys:
    the default ones)."""
    found: dict[type, dict[str, str]] = {}
    for kind, registry in (("method", METHODS), ("aggregator", AGGREGATORS)):
        for component in registry.names():
            settings_type = registry.settings_type(component)
            if name in settings_type.fields():
                found.setdefault(settings_type, {kind: component})
    return list(found.values()) or [{}]


@pytest.mark.parametrize("name", RUN_KEYS)
def test_every_edge_value_of_a_run_key_starts_the_run_or_is_refused_in_one_line(
    name: str, places: Callable[[str], str], stand_ins: None, tmp_path: Path
) -> None:
    path = tmp_path / "run.toml"
    for values in ({**taker, name: value} for taker in takers(name) for value in [*EDGES, "\udcff"]):
        value = values[name]
        try:
            if not isinstance(value, dict):  # a flag has no table
                accepted = outcome(
                    ["run", *(arg for key, item in values.items() for arg in flag(key_of(key), item, places))]
                )
                if accepted is not None:
                    assert_sane(accepted.args_given[0])
            if written(value):
                path.write_text(
                    "".join(toml_line(key, item, places) for key, item in values.items()), "utf-8"
                )
                accepted = outcome(["run", "--config", str(path)])
                if accepted is not None:
                    assert_sane(accepted.args_given[0])
        except BaseException as error:
            raise AssertionError(f"{key_of(name)} = {shown(value)}") from error


@pytest.mark.parametrize("name", list(ServerSettings.fields()))
def test_every_edge_value_of_a_server_setting_serves_or_is_refused_in_one_line(
    name: str, stand_ins: None
) -> None:
    for value in EDGES:
        if isinstance(value, dict):
            continue
        accepted = outcome(["server", "--address=127.0.0.1:0", *flag(key_of(name), value, str)])
        if accepted is not None:
            assert_sane_server(accepted)


@pytest.mark.parametrize("where", ["@folder", "@folder.toml", "@missing", "@garbage.toml", "\x00"])
def test_a_config_file_that_is_no_file_is_refused_in_one_line(
    where: str, places: Callable[[str], str], stand_ins: None
) -> None:
    assert outcome(["run", "--config", places(where)]) is None
    assert outcome(["run", "--resume", f"--out={places(where)}"]) is None  # reads OUT/config.toml


HOST_EDGES = ("127.0.0.1", "0.0.0.0", "[::1]", "localhost", "", " ", "\udcff", "a\x00b", "ü", "a:b", "\n")
PORT_EDGES = ("0", "1", "65535", "65536", "99999", "100000", "-1", "", "²", "١٢٣", "9" * 5000, "0x50", " 1")
PORT_EDGES += ("+1", "1_0", "00080")
PORTS = st.one_of(st.sampled_from(PORT_EDGES), st.integers(-2, 70_000).map(str), text(command_line=True))
HOSTS = st.one_of(st.sampled_from(HOST_EDGES), text(command_line=True))
VALID_ADDRESSES = st.sampled_from(["127.0.0.1:0", "0.0.0.0:50051", "[::1]:65535", "localhost:1"])
# Half of them valid, so that the settings after the address are reached.
ADDRESSES = evenly(
    VALID_ADDRESSES,
    VALID_ADDRESSES,
    st.builds(lambda host, port: f"{host}:{port}", HOSTS, PORTS),
    text(command_line=True),
)


def server_flags() -> st.SearchStrategy[list[str]]:
    kinds = typing.get_type_hints(ServerSettings)

    def values(name: str) -> st.SearchStrategy[Any]:
        typed_values = INTEGERS if kinds[name] is int else st.one_of(FLOATS, INTEGERS)
        return st.tuples(st.just(name), st.one_of(typed_values, text(command_line=True)))

    names = st.sampled_from(list(ServerSettings.fields()))
    pairs = st.lists(names.flatmap(values), max_size=3, unique_by=lambda item: item[0])
    return pairs.map(lambda items: [arg for name, value in items for arg in flag(key_of(name), value, str)])


@FUZZ
@given(address=ADDRESSES, settings_flags=server_flags(), values=run_values(command_line=True))
@example(address="127.0.0.1:²", settings_flags=[], values={})  # isdigit, then int(): a ValueError
@example(address="127.0.0.1:" + "9" * 5000, settings_flags=[], values={})  # int() of 5,000 digits
@example(address="\udcff:50051", settings_flags=[], values={})  # gRPC cannot encode the host
def test_any_server_setting_and_address_serve_or_are_refused_in_one_line(
    address: str,
    settings_flags: list[str],
    values: dict[str, Any],
    places: Callable[[str], str],
    stand_ins: None,
) -> None:
    run_flags = [
        arg
        for name, value in values.items()
        if name != "transport"
        for arg in flag(key_of(name), value, places)
    ]
    accepted = outcome(["server", f"--address={address}", *settings_flags, *run_flags])
    if accepted is None:
        return
    assert accepted.args_given[1] == address
    assert_sane_server(accepted)


CLIENT_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "server": ADDRESSES,
    "threads": st.one_of(INTEGERS, text(command_line=True)),
    "retry-s": st.one_of(FLOATS, st.sampled_from(["forever", "FOREVER", " inf", "-inf", "nan"])),
    "runtime": st.one_of(st.sampled_from([*RUNTIMES.names(), "onnx"]), text(command_line=True)),
    **{name: st.sampled_from(PATHS) for name in ("data", "token-file", "tls-ca", "tls-cert", "tls-key")},
}


def client_values() -> st.SearchStrategy[list[tuple[str, str, Any]]]:
    """(setting, where it comes from: flag, environment or file, value) for some client settings."""

    def value(setting: str) -> st.SearchStrategy[Any]:
        any_value = st.one_of(text(command_line=True), TOML_VALUES)
        return st.one_of(CLIENT_VALUES.get(setting, any_value), any_value)

    names = st.sampled_from([setting.name for setting in CLIENT_SETTINGS])
    sources = st.sampled_from(["flag", "environment", "file"])
    triple = names.flatmap(lambda name: st.tuples(st.just(name), sources, value(name)))
    required = st.tuples(  # most often given, so that the others are reached
        st.tuples(st.just("server"), sources, CLIENT_VALUES["server"]),
        st.tuples(st.just("data"), sources, CLIENT_VALUES["data"]),
    )
    others = st.lists(triple, max_size=5, unique_by=lambda item: item[0])
    return st.builds(
        lambda given, rest: [*(item for item in given if item[0] not in {name for name, *_ in rest}), *rest],
        evenly(required, required, required, st.just(())),
        others,
    )


@FUZZ
@given(values=client_values())
@example(values=[("server", "flag", "s:1"), ("data", "flag", "d"), ("threads", "flag", 0)])  # torch refuses
@example(values=[("server", "flag", "\udcff:1"), ("data", "flag", "d")])  # gRPC cannot encode it
@example(values=[("server", "file", "s:1"), ("data", "file", "d"), ("token-file", "file", "t\x00")])
@example(values=[("server", "file", "s:1"), ("data", "file", "d"), ("tls-ca", "file", "ca\x00")])
def test_any_client_setting_connects_or_is_refused_in_one_line(
    values: list[tuple[str, str, Any]], places: Callable[[str], str], stand_ins: None, tmp_path: Path
) -> None:
    run_client(values, places, tmp_path)


def run_client(values: list[tuple[str, str, Any]], place: Callable[[str], str], folder: Path) -> None:
    """`edgefed client` with each (setting, source, value) as a flag, a variable or a line of its file."""
    argv, environ, lines = ["client"], {}, []
    for name, source, value in values:
        if source == "file" and not written(value):  # a TOML file is UTF-8: this one comes from the flag
            source = "flag"
        if source == "flag" and not isinstance(value, dict):
            argv += flag(name, value, place)
        elif source == "environment":
            text_value = repr(value) if isinstance(value, float) else str(value)
            environ[f"EDGEFED_{name.upper().replace('-', '_')}"] = place(text_value)
        else:
            lines.append(toml_line(name, value, place))
    if lines:
        (folder / "client.toml").write_text("".join(lines), encoding="utf-8")
        argv.append(f"--config={folder / 'client.toml'}")
    accepted = outcome(argv, environ)
    if accepted is None:
        return
    assert_sane_client(accepted)


def assert_sane_client(accepted: Accepted) -> None:
    """What `GrpcClient` is given, when accepted: a real address, settings in their ranges."""
    server, _, _ = accepted.args_given
    assert_address(server)
    settings_given = accepted.kwargs_given
    assert settings_given["threads"] is None or 1 <= settings_given["threads"] <= MAX_THREADS
    assert settings_given["retry_s"] > 0  # NaN is not
    assert settings_given["runtime"] in RUNTIMES.device_names()


@pytest.mark.parametrize("setting", CLIENT_SETTINGS, ids=lambda setting: setting.name)
def test_every_edge_value_of_a_client_setting_connects_or_is_refused_in_one_line(
    setting: Any, places: Callable[[str], str], stand_ins: None, tmp_path: Path
) -> None:
    required = {"server": "127.0.0.1:50051", "data": "d.tsv"}
    for value in EDGES:
        for source in ("flag", "environment", "file"):
            values = [(name, source, given) for name, given in {**required, setting.name: value}.items()]
            try:
                run_client(values, places, tmp_path)
            except BaseException as error:
                raise AssertionError(f"{setting.name} = {shown(value)} ({source})") from error


def test_every_edge_address_serves_or_connects_or_is_refused_in_one_line(stand_ins: None) -> None:
    for address in [f"{host}:{port}" for host in HOST_EDGES for port in PORT_EDGES] + [*HOST_EDGES]:
        try:
            accepted = outcome(["server", f"--address={address}"])
            if accepted is not None:
                assert_sane_server(accepted)
            accepted = outcome(["client", f"--server={address}", "--data=d.tsv"])
            if accepted is not None:
                assert_sane_client(accepted)
        except BaseException as error:
            raise AssertionError(f"address {shown(address)}") from error
