"""The in-process engine: every client simulated on one shared base model.

Per round t:
    S_t   = clients sampled with generator(seed, t)
    for i in S_t: start_i = aggregator.client_start(state, r_i)
                  update_i = run_client(fm, start_i, …)        (same code as Flower's ClientApp)
    state = aggregator.aggregate(state, updates)                 (the core; validates first)
    fold state.base_delta into the shared base weights, once
    evaluate W0 + aggregator.global_delta(state) on the dev set
    checkpoint atomically
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import ConfigError, config_to_dict
from ..core import Factored, ServerState
from ..core.serialize import state_from_dict, state_to_dict
from .checkpoint import load_checkpoint, save_checkpoint
from .client import run_client
from .evaluate import evaluate
from .experiment import Experiment
from .seeding import derive_seed, generator
from .train import planned_steps

__all__ = ["Simulator", "BYTES_PER_NUMBER"]

BYTES_PER_NUMBER = 4  # adapters and deltas travel as float32


class Simulator:
    def __init__(self, exp: Experiment, run_dir: Path, on_round=None):
        self.exp = exp
        self.cfg = exp.cfg
        self.run_dir = Path(run_dir)
        self.ckpt_path = self.run_dir / "checkpoint.pt"
        self.on_round = on_round  # callback(history) after each round's checkpoint
        self.rounds: list[dict[str, Any]] = []
        self.client_rows: list[dict[str, Any]] = []
        # Σ_t ΔW0_t: everything folded into the base so far, kept factored (and
        # compressed to its numerical rank) for the export on the pretrained base.
        self.folded: dict[str, Factored] = {}

    # ------------------------------------------------------------------ state
    def initial_state(self) -> ServerState:
        fm = self.exp.fm
        return self.exp.aggregator.init_state(fm.shapes, self.cfg.model.rank, fm.settings.spec, dense=fm.read_dense(), seed=self.cfg.seed)

    def resume_or_init(self) -> ServerState:
        if not self.ckpt_path.exists():
            return self.initial_state()
        ckpt = load_checkpoint(self.ckpt_path)
        if _result_keys(ckpt["config"]) != _result_keys(_plain(config_to_dict(self.cfg))):
            raise ConfigError(f"{self.run_dir} holds a run with a different configuration; choose another run name or output_dir")
        self.exp.fm.load_base_state(ckpt["base"])
        self.rounds, self.client_rows = ckpt["rounds"], ckpt["clients"]
        self.folded = {k: Factored(v["L"], v["R"]) for k, v in ckpt["folded"].items()}
        return state_from_dict(ckpt["state"])

    def checkpoint(self, state: ServerState) -> None:
        save_checkpoint(self.ckpt_path, {
            "config": _plain(config_to_dict(self.cfg)),
            "state": state_to_dict(state),
            "base": self.exp.fm.base_state(),
            "rounds": self.rounds,
            "clients": self.client_rows,
            "folded": {k: {"L": f.L, "R": f.R} for k, f in self.folded.items()},
        })

    # ----------------------------------------------------------------- rounds
    def sample(self, t: int) -> list[int]:
        k = len(self.exp.clients)
        m = max(1, round(self.cfg.fed.fraction * k))
        return sorted(torch.randperm(k, generator=generator(self.cfg.seed, t, "sample"))[:m].tolist())

    def run(self, state: ServerState | None = None) -> ServerState:
        """Rounds from ``state`` (default: the checkpoint, or round 0) up to ``fed.rounds``."""
        exp, cfg = self.exp, self.cfg
        state = self.resume_or_init() if state is None else state
        send_counts = exp.aggregator._needs_label_counts()
        bar = tqdm(total=cfg.fed.rounds, initial=state.round, desc="rounds", disable=not cfg.progress, leave=True)
        while state.round < cfg.fed.rounds:
            t = state.round
            sampled = self.sample(t)
            steps = sum(planned_steps(len(exp.clients[i].indices), cfg.train) for i in sampled)
            inner = tqdm(total=steps, desc=f"round {t + 1} local steps", disable=not cfg.progress, leave=False)
            broadcast = state.broadcast_numel()  # last round's base delta, which every client folds
            updates, t0 = [], time.perf_counter()
            for i in sampled:
                client = exp.clients[i]
                start = exp.aggregator.client_start(state, client.rank)
                update, stats = run_client(exp.fm, start, client, exp.train, cfg.train, derive_seed(cfg.seed, t, client.client_id),
                                           pad_token_id=exp.pad_token_id, send_label_counts=send_counts, progress=inner)
                updates.append(update)
                self.client_rows.append({
                    "round": t + 1, "client": client.client_id, "rank": client.rank, "examples": update.num_examples,
                    "train_loss": stats.loss, "steps": stats.steps,
                    "bytes_down": BYTES_PER_NUMBER * (start.numel() + broadcast), "bytes_up": BYTES_PER_NUMBER * update.numel(),
                })
            inner.close()
            t1 = time.perf_counter()
            state = exp.aggregator.aggregate(state, updates)
            t2 = time.perf_counter()
            exp.fm.fold(state.base_delta)
            self.accumulate_folded(state)
            t3 = time.perf_counter()
            row = {"round": t + 1, "clients": len(sampled), "train_loss": sum(r["train_loss"] * r["examples"] for r in self.client_rows[-len(sampled):]) / max(1, sum(u.num_examples for u in updates)),
                   "train_s": t1 - t0, "aggregate_s": t2 - t1, "fold_s": t3 - t2,
                   "bytes_down": sum(r["bytes_down"] for r in self.client_rows[-len(sampled):]),
                   "bytes_up": sum(r["bytes_up"] for r in self.client_rows[-len(sampled):])}
            row.update({k: v for k, v in state.info.items() if isinstance(v, (int, float))})
            if (t + 1) % cfg.fed.eval_every == 0 or t + 1 == cfg.fed.rounds:
                row.update(self.evaluate(state))
            self.rounds.append(row)
            self.checkpoint(state)
            if self.on_round is not None:
                self.on_round(self)
            bar.update(1)
            primary = row.get("eval_" + exp.task.primary_metric)
            if primary is not None:
                bar.set_postfix({exp.task.primary_metric: f"{primary:.4f}"})
        bar.close()
        return state

    def accumulate_folded(self, state: ServerState) -> None:
        for name, delta in state.base_delta.items():
            prev = self.folded.get(name)
            self.folded[name] = (delta if prev is None else prev + delta).compress()

    def total_delta(self, state: ServerState) -> dict[str, Factored]:
        """The global model's whole update on the pretrained base: Σ_t ΔW0_t + G."""
        out = {}
        for name, g in self.exp.aggregator.global_delta(state).items():
            out[name] = g + self.folded[name] if name in self.folded else g
        return out

    def evaluate(self, state: ServerState) -> dict[str, float]:
        exp = self.exp
        t0 = time.perf_counter()
        out: dict[str, float] = {}
        with exp.fm.global_view(exp.aggregator.global_delta(state), state.dense) as model:
            all_dev = torch.arange(len(exp.eval.labels)).numpy()
            for k, v in evaluate(model, exp.eval, all_dev, exp.task, self.cfg.train.eval_batch_size, exp.pad_token_id).items():
                out["eval_" + k] = v
            if self.cfg.fed.eval_clients:
                primary = exp.task.primary_metric
                for c in exp.clients:
                    m = evaluate(model, exp.train, c.indices, exp.task, self.cfg.train.eval_batch_size, exp.pad_token_id)
                    out[f"local_{primary}_{c.client_id}"] = m[primary]
        out["eval_s"] = time.perf_counter() - t0
        return out


# Settings that cannot change a run's results: a resume may differ in them.
_NOT_RESULTS = {("progress",), ("threads",), ("output_dir",), ("name",), ("train", "eval_batch_size")}


def _result_keys(cfg: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg.items()}
    for path in _NOT_RESULTS:
        node = out
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    return out


def _plain(d: Any) -> Any:
    """Config as plain builtins, comparable with what a checkpoint stores."""
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_plain(v) for v in d]
    return d
