"""fedlora's Flower ServerApp: ``fedlora run`` with Flower moving the bytes.

The run folder (config, metrics, checkpoints, plots, summary, peft adapter)
is written by the same ``run_experiment`` as the in-process engine, at
``output_dir`` as the ServerApp's process sees it (give an absolute path).
Only the engine differs: a roll-call maps partition ids to nodes, then
:class:`FedLoraStrategy` drives the rounds.

Bad input (a run config fedlora refuses, nodes that disagree with the run's
partitions, a missing model or data set) stops the run before its folder is
written, with one line ``fedlora: error: …`` in the log and the ServerApp's
process exiting non-zero (Flower marks the run failed; ``flwr run`` itself
exits 0 whatever the run's outcome).
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.app.exception import AppExitException
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.exit import ExitCode

from ..config import ConfigError
from ..core import ServerState
from ..core.errors import AggregationError
from ..data.errors import DataError
from ..engine.run import run_experiment
from ..engine.server import RoundFailed, Server
from ..models.hub import ModelError
from .roll_call import discover_nodes
from .run_config import config_from_run_config
from .strategy import FedLoraStrategy

__all__ = ["app", "discover_nodes", "flower_engine", "FedLoraRunError"]

log = logging.getLogger("fedlora")

app = ServerApp()

EXPECTED = (ConfigError, DataError, ModelError, AggregationError, RoundFailed, FileNotFoundError)


class FedLoraRunError(AppExitException):
    """A run fedlora refused or could not finish; its message is the one-line reason."""

    exit_code = ExitCode.SERVERAPP_EXCEPTION


def _show_fedlora_log() -> None:
    """fedlora's log lines (rounds, drops, nodes) in the run's log, which Flower streams to ``flwr run --stream``."""
    logger = logging.getLogger("fedlora")
    logger.setLevel(logging.INFO)
    if not any(getattr(h, "_fedlora", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-8s fedlora: %(message)s"))
        handler._fedlora = True
        logger.addHandler(handler)


@app.main()
def main(grid: Grid, context: Context) -> None:
    _show_fedlora_log()
    try:
        cfg = config_from_run_config(context.run_config)
        if cfg.fed.mode != "federated":
            raise ConfigError(f"fed.mode={cfg.fed.mode!r} trains in one process: use `fedlora run`, not Flower")
        nodes = discover_nodes(grid, cfg.partition.num_clients, timeout=cfg.fed.client_timeout, node_data=cfg.data.node_data)  # before any file is written
        summary = run_experiment(cfg, engine=flower_engine(grid, nodes))
    except EXPECTED as e:
        message = f"fedlora: error: {e}"
        log.error(message.removeprefix("fedlora: "))
        # No chained traceback: the line above is the whole story.
        raise FedLoraRunError(message).with_traceback(None) from None
    log.info("finished %s: final %s; run folder %s", summary["method"], summary["final"], cfg.output_dir)


def flower_engine(grid: Grid, nodes: dict[int, int] | None = None):
    """``run_experiment``'s engine: the rounds from ``state`` on, over ``grid``.
    ``nodes`` (partition → node) comes from a roll-call; without it one is held first."""

    def drive(server: Server, state: ServerState) -> ServerState:
        cfg = server.cfg
        held = nodes if nodes is not None else discover_nodes(grid, len(server.exp.clients), timeout=cfg.fed.client_timeout, node_data=cfg.data.node_data)
        strategy = FedLoraStrategy(server, state, held, folded=server.folded)
        strategy.start(grid)
        return strategy.state

    return drive
