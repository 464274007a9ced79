"""One client's round, the same code for the in-process engine and Flower:
load the starting point, train locally, return a :class:`ClientUpdate`."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..config import TrainConfig
from ..core import Adapter, ClientStart, ClientUpdate
from ..core.adapter import in_frame, rebuilt_from_cores
from ..core.bandwidth import transport_update
from ..core.methods.hetlora import self_prune, tail_norm
from ..core.state import SelfPruning
from ..models import FedModel
from ..models.lora import adapter_name
from .dp_sgd import LocalDP, train_local_dp
from .evaluate import evaluate
from .train import TrainStats, train_local

__all__ = ["ClientData", "held_out_stats", "run_client", "score_received"]


@dataclass
class ClientData:
    """A client's share of the tokenised training set."""

    client_id: str
    indices: np.ndarray
    rank: int
    label_counts: torch.Tensor | None = None  # sent only when the method asks for it
    held_out: np.ndarray | None = None  # fed.personal_eval: examples of its own it never trains on, to evaluate its model


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
    local: dict | None = None,
    task=None,
    eval_batch_size: int = 64,
    transport: torch.dtype = torch.float32,
    score_received: bool = False,
) -> tuple[ClientUpdate, TrainStats]:
    """Train from ``start`` and return the update. ``local`` is the client's own storage between
    rounds (``start.keep_local``: FedSA-LoRA's B and head stay there and are never sent; the
    update carries the start's values for them). With ``client.held_out`` the client evaluates
    the model it trained on examples of its own it never trained on (``stats.personal``) and,
    with ``score_received`` (``fed.received_eval``), the model it received, before training
    (``stats.received``). The update is rounded to ``transport`` (``fed.transport``), as it travels."""
    keep = set(start.keep_local)
    _load_start(fm, start, client, local)
    with fm.folded(start.base_delta), fm.B_in_span(start.train_core):  # client-only frozen delta (HEXA); Fed-SB's r×r core
        received = _score_held_out(fm, client, data, task, eval_batch_size, pad_token_id) if score_received else None
        if privacy is None:
            regulariser = _tail_penalty(fm, start.prune) if start.prune else None
            stats = train_local(fm, data, client.indices, cfg, seed, pad_token_id=pad_token_id, progress=progress, regulariser=regulariser)
        else:  # local DP-SGD (privacy.mode=local)
            stats = train_local_dp(fm, data, client.indices, cfg, seed, privacy, pad_token_id=pad_token_id, progress=progress)
        stats.personal = _score_held_out(fm, client, data, task, eval_batch_size, pad_token_id)
        stats.received = received
        stats.personal_n = len(client.held_out) if stats.personal else 0
        trained, trained_dense = fm.read_adapters(), fm.read_dense()
    if keep and local is not None:
        if "B" in keep:
            local["B"] = {m: a.B for m, a in trained.items()}
            trained = {m: Adapter(start.adapters[m].B.clone(), a.A, a.scale) for m, a in trained.items()}  # B stays here
        if "dense" in keep:
            local["dense"] = trained_dense
            trained_dense = {k: t.clone() for k, t in start.dense.items()}
    if start.prune:  # HetLoRA: drop the tail if the regulariser shrank it over the round
        trained = self_prune(dict(start.adapters), trained, start.prune)
    cores = {m: in_frame(start.adapters[m].B, a.B) for m, a in trained.items()} if start.train_core else {}
    update = ClientUpdate(
        client_id=client.client_id,
        num_examples=int(len(client.indices)),
        adapters=trained,
        dense=trained_dense,
        label_counts=client.label_counts if send_label_counts else None,
        cores=cores,
    )
    update = transport_update(update, transport)
    if cores:  # what the server holds: B rebuilt from the C that travelled, A as sent
        update = replace(update, adapters=rebuilt_from_cores(start.adapters, update.cores))
    return update, stats


def score_received(
    fm: FedModel, start: ClientStart, client: ClientData, data, task, *, eval_batch_size: int, pad_token_id: int, local: dict | None = None
) -> dict[str, float]:
    """The model ``start`` gives this client (the global model after the last round, at its rank,
    on the base the server folded), scored on its held-out examples without training: the final
    round's federated evaluation (``fed.received_eval``). ``{}`` for a client that holds none."""
    _load_start(fm, start, client, local)
    with fm.folded(start.base_delta), fm.B_in_span(start.train_core):
        return _score_held_out(fm, client, data, task, eval_batch_size, pad_token_id) or {}


def held_out_stats(scores: dict[str, float], client: ClientData) -> dict[str, float]:
    """``score_received``'s scores as a client reports them (``received_*``, with ``personal_n``)."""
    if not scores:
        return {}
    return {f"received_{k}": v for k, v in scores.items()} | {"personal_n": len(client.held_out)}


def _load_start(fm: FedModel, start: ClientStart, client: ClientData, local: dict | None) -> None:
    """Put ``start`` into the shared model at the client's rank (with its own B and head from
    earlier rounds where ``start.keep_local`` says it keeps them)."""
    keep = set(start.keep_local)
    adapters, dense = dict(start.adapters), dict(start.dense)
    if keep and local:  # its own B and head from earlier rounds
        if "B" in keep:
            adapters = {m: Adapter(local["B"][m].clone(), a.A, a.scale) for m, a in adapters.items()}
        if "dense" in keep:
            dense = {k: t.clone() for k, t in local["dense"].items()}
    fm.ensure_rank(client.rank)
    fm.activate(client.rank, train_A=start.train_A, train_B=start.train_B)
    fm.load_adapters(adapters)
    if dense:
        fm.load_dense(dense)


def _score_held_out(fm: FedModel, client: ClientData, data, task, eval_batch_size: int, pad_token_id: int) -> dict[str, float] | None:
    """The model as it stands, on the client's held-out examples (``fed.personal_eval``); None without them."""
    if client.held_out is None or not len(client.held_out) or task is None:
        return None
    return evaluate(fm.peft, data, client.held_out, task, eval_batch_size, pad_token_id, fm.placement)


def _tail_penalty(fm: FedModel, pruning: SelfPruning):
    """λ·Σ_modules ‖B[:, r−t:]·A[r−t:]‖_F on the active adapter's parameters (HetLoRA's regulariser)."""
    name = adapter_name(fm.active_rank)
    pairs = [(layer.lora_B[name].weight, layer.lora_A[name].weight) for layer in fm.layers.values()]
    return lambda: pruning.strength * sum(tail_norm(B, A, pruning.gamma) for B, A in pairs)
