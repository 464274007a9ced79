"""The in-process engine: one base model, every client simulated in turn."""

from .client import ClientData, run_client
from .experiment import Experiment, build_experiment
from .run import run_experiment, run_name
from .server import Server
from .simulator import Simulator
from .train import train_local

__all__ = ["ClientData", "run_client", "Experiment", "build_experiment", "run_experiment", "run_name", "Server", "Simulator", "train_local"]
