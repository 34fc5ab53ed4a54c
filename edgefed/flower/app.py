"""The Flower apps of an edgefed run. `simulate(config)` runs one on Flower's Simulation Engine (Ray),
one simulated SuperNode per client: `edgefed run --transport flower`. `serverapp` and `clientapp`
are the apps a Flower app's pyproject.toml names for `flwr run`, configured by its
`[tool.flwr.app.config]` keys, which are edgefed's options. Either way the ServerApp's loop is
`edgefed.federation.runner.federate` with a `FlowerTransport`, so the run directory, metrics,
checkpoints and summary are every edgefed run's."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from edgefed.components import resolve_config
from edgefed.config import RunConfig, named_values
from edgefed.errors import EdgefedError
from edgefed.federation.runner import federate
from edgefed.flower import client
from edgefed.flower.transport import JOIN_ACTION, OnFlower
from edgefed.types import RunSummary

Echo = Callable[[str], None]


def client_app() -> ClientApp:
    app = ClientApp()
    app.query(JOIN_ACTION)(client.join)
    app.train()(client.train)
    return app


def server_app(config: RunConfig, echo: Echo, outcome: dict, resume: bool = False) -> ServerApp:
    """A ServerApp that runs `config` as an edgefed federation; `outcome["summary"]` gets its summary."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        outcome["summary"] = federate_on(grid, config, echo, resume)

    return app


def federate_on(grid: Grid, config: RunConfig, echo: Echo = print, resume: bool = False) -> RunSummary:
    """The edgefed federation `config` describes, its rounds carried over Flower's `grid`."""

    return federate(dataclasses.replace(config, transport="flower"), OnFlower(grid), echo, resume)


def flower_run_config(run_config: dict) -> RunConfig:
    """An edgefed configuration from a Flower app's `[tool.flwr.app.config]` (and `flwr run
    --run-config`): the keys are edgefed's options (`local-steps = 10`, `profiles = "2×jetson-…"`)."""
    return resolve_config(None, named_values(dict(run_config), "[tool.flwr.app.config]"))


# The apps `flwr run` starts, named in a Flower app's pyproject.toml:
#   [tool.flwr.app.components]
#   serverapp = "edgefed.flower.app:serverapp"
#   clientapp = "edgefed.flower.app:clientapp"
serverapp = ServerApp()
clientapp = client_app()


@serverapp.main()
def run_from_flower(grid: Grid, context: Context) -> None:
    federate_on(grid, flower_run_config(context.run_config))


def simulate(config: RunConfig, echo: Echo = print, resume: bool = False) -> RunSummary:
    """The run on Flower's Simulation Engine: a Ray actor per core, one SuperNode per client."""
    from flwr.simulation import run_simulation

    outcome: dict = {}
    cpus = max(1, (os.cpu_count() or 1) // min(config.clients, os.cpu_count() or 1))
    # Flower's Ray backend sets PYTHONPATH to this process's sys.path for Ray's workers and leaves it
    # set: every subprocess started afterwards (pip, another venv's python) would see our packages.
    pythonpath = os.environ.get("PYTHONPATH")
    try:
        run_simulation(
            server_app(config, echo, outcome, resume),
            client_app(),
            num_supernodes=config.clients,
            backend_config={"client_resources": {"num_cpus": cpus, "num_gpus": 0.0}},
        )
    finally:
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath
    if "summary" not in outcome:
        raise EdgefedError("the Flower simulation ended without finishing the run (its log says why)")
    return outcome["summary"]
