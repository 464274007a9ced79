"""One client's round, the same code for the in-process engine and Flower:
load the starting point, train locally, return a :class:`ClientUpdate`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import TrainConfig
from ..core import ClientStart, ClientUpdate
from ..models import FedModel
from .dp_sgd import LocalDP, train_local_dp
from .train import TrainStats, train_local

__all__ = ["ClientData", "run_client"]


@dataclass
class ClientData:
    """A client's share of the tokenised training set."""

    client_id: str
    indices: np.ndarray
    rank: int
    label_counts: torch.Tensor | None = None  # sent only when the method asks for it


def run_client(
    fm: FedModel,
    start: ClientStart,
    client: ClientData,
    data,
    cfg: TrainConfig,
    seed: int,
    *,
    pad_token_id: int,
    send_label_counts: bool = False,
    progress=None,
    privacy: LocalDP | None = None,
) -> tuple[ClientUpdate, TrainStats]:
    fm.activate(client.rank, train_A=start.train_A, train_B=start.train_B)
    fm.load_adapters(start.adapters)
    if start.dense:
        fm.load_dense(start.dense)
    with fm.folded(start.base_delta):  # client-only frozen delta (HEXA's mixed ranks)
        if privacy is None:
            stats = train_local(fm, data, client.indices, cfg, seed, pad_token_id=pad_token_id, progress=progress)
        else:  # local DP-SGD (privacy.mode=local)
            stats = train_local_dp(fm, data, client.indices, cfg, seed, privacy, pad_token_id=pad_token_id, progress=progress)
    update = ClientUpdate(
        client_id=client.client_id,
        num_examples=int(len(client.indices)),
        adapters=fm.read_adapters(),
        dense=fm.read_dense(),
        label_counts=client.label_counts if send_label_counts else None,
    )
    return update, stats
