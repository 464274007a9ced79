"""The server side of a round, shared by both engines (in-process and Flower):
everything except moving bytes to and from clients.

Round t (1-based), for the sampled set S_t:

    plan:    S_t = clients sampled with generator(seed, t−1);
             job_i = (client i, start_i = aggregator.client_start(state, r_i), seed_i)
    (an engine trains the jobs: in turn on one shared model, or on Flower ClientApps)
    finish:  drop the clients that failed; state = aggregator.aggregate(state, updates)
             (weights renormalise over the clients that finished: exact methods stay exact);
             fold state.base_delta into the server's base weights, once;
             evaluate W0 + Σ folded + aggregator.global_delta(state) on the dev set;
             checkpoint atomically.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, RunConfig, config_to_dict
from ..core import ClientStart, ClientUpdate, Factored, ServerState
from ..core.bandwidth import TRANSPORTS, transport_start, transport_state, truncate_base_delta
from ..core.errors import RoundFailed, UpdateError
from ..core.privacy import effective_update_norm, private_aggregate
from ..core.serialize import state_from_dict, state_to_dict
from ..data.prompts import prompt_metrics
from ..models.device import resolve_placement
from .checkpoint import load_checkpoint, save_checkpoint
from .client import ClientData
from .dp_sgd import sample_rate
from .evaluate import evaluate, generate_answers, label_word_scores
from .experiment import Experiment
from .seeding import derive_seed, generator, secret_generator
from .train import planned_steps

__all__ = ["Server", "ClientJob", "ClientResult", "RoundFailed", "BYTES_PER_NUMBER"]

log = logging.getLogger("fedlora")


def privacy_generator(cfg, t: int) -> torch.Generator:
    """The DP noise of round t: from the run's seed (reproducible, and a resume replays it), or,
    with privacy.secure_noise, from the operating system's entropy (what a deployment needs:
    noise anyone can regenerate from the config protects nobody)."""
    if cfg.privacy.secure_noise:
        return secret_generator()
    return generator(cfg.seed, t, "dp-noise")


HELD_OUT = ("personal_", "received_")  # scores on a client's held-out examples (fed.personal_eval, fed.received_eval)


def held_out_means(rows: list[dict], prefixes: tuple[str, ...] = HELD_OUT) -> dict[str, float]:
    """Each ``personal_*`` / ``received_*`` score over the clients that report it, weighted by their
    held-out examples (``personal_n``): a held-out set of one class has no ROC AUC, so not every
    client reports every key."""
    scored = [r for r in rows if r.get("personal_n")]
    out = {}
    for key in sorted({k for r in scored for k in r if k.startswith(prefixes) and k != "personal_n"}):
        having = [r for r in scored if key in r]
        out[key] = sum(r[key] * r["personal_n"] for r in having) / sum(r["personal_n"] for r in having)
    return out


def _received(stats: dict | None) -> dict:
    """A reply's scores of the model it received (``received_*``) and their number of examples."""
    if not stats or not any(k.startswith("received_") for k in stats):
        return {}
    return {k: v for k, v in stats.items() if k.startswith("received_") or k == "personal_n"}


def _reported_dp(stats: dict | None) -> dict:
    """The DP-SGD steps and sampling rate a reply reports ({} without a rate: not a DP-SGD report)."""
    if not stats or not stats.get("sample_rate"):
        return {}
    return {"steps": int(stats["steps"]), "sample_rate": float(stats["sample_rate"])}


BYTES_PER_NUMBER = 4  # adapters and deltas travel as float32 (2 bytes with fed.transport: bfloat16)


@dataclass(frozen=True)
class ClientJob:
    """One sampled client's work in round ``round`` (1-based)."""

    round: int
    index: int  # the client's partition id
    client: ClientData
    start: ClientStart
    seed: int
    send_label_counts: bool


@dataclass(frozen=True)
class ClientResult:
    """A client's update and training counters, or why it was dropped."""

    update: ClientUpdate | None = None
    stats: dict[str, float] | None = None  # loss, steps, examples, tokens
    error: str | None = None
    wire: dict[str, int] | None = None  # bytes a transport actually moved: wire_bytes_down, wire_bytes_up


class Server:
    def __init__(self, exp: Experiment, run_dir: Path, on_round=None):
        self.exp = exp
        self.cfg = exp.cfg
        self.run_dir = Path(run_dir)
        self.ckpt_path = self.run_dir / "checkpoint.pt"
        self.on_round = on_round  # callback(history) after each round's checkpoint
        self.rounds: list[dict[str, Any]] = []
        self.client_rows: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []  # causal LMs: the global model's answers to fixed prompts, per evaluation
        # What simulated clients keep as their own between rounds (FedSA-LoRA's B and head): in
        # a real federation it lives on the clients (a Flower node keeps it in its context.state).
        self.local_state: dict[str, dict] = {}
        # Σ_t ΔW0_t: everything folded into the base so far, kept factored (and
        # compressed to its numerical rank) for the export on the pretrained base.
        self.folded: dict[str, Factored] = {}
        # fed.received_eval: the final model as the clients sampled for the round after the last
        # would receive it, on their held-out examples (their number, and the weighted means of their scores)
        self.received_final: dict[str, float] = {}
        self.received_final_clients = 0

    # ------------------------------------------------------------------ state
    def initial_state(self) -> ServerState:
        fm = self.exp.fm
        state = self.exp.aggregator.init_state(fm.shapes, self.cfg.model.rank, fm.settings.spec, dense=fm.read_dense(), seed=self.cfg.seed)
        return transport_state(state, self.transport)  # what the clients will receive is what the server holds

    @property
    def transport(self):
        """The dtype every adapter, head and delta travels in (``fed.transport``)."""
        return TRANSPORTS[self.cfg.fed.transport]

    @property
    def bytes_per_number(self) -> int:
        return self.transport.itemsize

    def resume_or_init(self) -> ServerState:
        """The checkpoint's state, or round 0's. Refused: a checkpoint, or without one a run's
        config.yaml, of another configuration (the folder would mix two runs' files)."""
        if not self.ckpt_path.exists():
            stored = self.run_dir / "config.yaml"
            if stored.is_file():  # a kept or stopped run without its checkpoint: its summary and metrics are another run's
                import yaml

                try:
                    config = yaml.safe_load(stored.read_text())
                except yaml.YAMLError as e:
                    raise ConfigError(f"{stored} cannot be read ({e}); move the run folder away, or --overwrite") from None
                self._refuse_other(config if isinstance(config, dict) else {}, stored)
            return self.initial_state()
        ckpt = load_checkpoint(self.ckpt_path)
        self._refuse_other(ckpt["config"], self.ckpt_path)
        self._keep_precision(ckpt.get("precision"), len(ckpt["rounds"]))
        try:
            state = state_from_dict(ckpt["state"])
        except (KeyError, AttributeError, TypeError, ValueError) as e:
            raise ConfigError(
                f"checkpoint {str(self.ckpt_path)!r} holds a damaged server state ({type(e).__name__}: {e}); restore it, or move the run folder away"
            ) from None
        odd_shape = [n for n, shape in state.shapes.items() if n in self.exp.fm.shapes and tuple(shape) != tuple(self.exp.fm.shapes[n])]
        if odd_shape:
            n = odd_shape[0]
            raise ConfigError(
                f"{self.ckpt_path}: module {n!r} is {tuple(state.shapes[n])} there and {tuple(self.exp.fm.shapes[n])} in this model; it cannot resume"
            )
        saved, here = set(state.adapters), set(self.exp.fm.layers)
        if saved != here:  # e.g. written by a fedlora that adapted other modules of this model
            odd = sorted(saved - here)[:3] or sorted(here - saved)[:3]
            raise ConfigError(
                f"{self.ckpt_path} holds adapters for other modules than this model has ({', '.join(odd)} …: {len(saved)} saved, {len(here)} here); "
                "it cannot resume: choose another run name or output_dir"
            )
        self.exp.fm.load_base_state(ckpt["base"])
        self.rounds, self.client_rows = ckpt["rounds"], ckpt["clients"]
        self.samples = ckpt.get("samples", [])
        self.local_state = ckpt.get("local", {})
        self.folded = {k: Factored(v["L"], v["R"]) for k, v in ckpt["folded"].items()}
        return state

    def _refuse_other(self, stored: dict, source: Path) -> None:
        key = first_difference(stored, self.cfg)
        if key is not None:
            raise ConfigError(
                f"{self.run_dir} holds a run with a different configuration ({key}: {source.name} has {key_value(stored, key)!r}, this run "
                f"{key_value(_plain(config_to_dict(self.cfg)), key)!r}); choose another run name or output_dir, or --overwrite"
            )

    def _keep_precision(self, stored: str | None, rounds: int) -> None:
        """A run resumes in the arithmetic it started in: ``train.precision: auto`` resolves per machine
        (and per CPU timing probe), and a resume elsewhere would otherwise train its last rounds in another."""
        place = self.exp.fm.placement
        if stored is None or stored == place.precision:
            return
        if self.cfg.train.precision != "auto":
            raise ConfigError(f"{self.run_dir} trained its {rounds} rounds so far in {stored}; train.precision={self.cfg.train.precision} would change that")
        try:
            self.exp.fm.placement = resolve_placement(self.cfg.train.device, stored)
        except ConfigError as e:
            raise ConfigError(f"{self.run_dir} trained its {rounds} rounds so far in {stored}, which this machine cannot resume in: {e}") from None
        log.warning("resuming in %s, the precision this run started in (train.precision=auto would pick %s here)", stored, place.precision)

    def checkpoint(self, state: ServerState) -> None:
        save_checkpoint(
            self.ckpt_path,
            {
                "config": _plain(config_to_dict(self.cfg)),
                "precision": self.exp.fm.placement.precision,  # what `auto` resolved to: a resume keeps it
                "state": state_to_dict(state),
                "base": self.exp.fm.base_state(),
                "rounds": self.rounds,
                "clients": self.client_rows,
                "samples": self.samples,
                "folded": {k: {"L": f.L, "R": f.R} for k, f in self.folded.items()},
                "local": self.local_state,
            },
        )

    # ----------------------------------------------------------------- rounds
    def sample(self, t: int) -> list[int]:
        k = len(self.exp.clients)
        if self.exp.privacy is not None and self.exp.privacy.client is not None:
            # Poisson sampling, what the accountant assumes: each client independently with
            # probability q (a round may have none: its release is noise alone). With secure_noise
            # from the OS's entropy: who took part is as secret as the noise.
            draw = secret_generator() if self.cfg.privacy.secure_noise else generator(self.cfg.seed, t, "sample")
            draws = torch.rand(k, generator=draw, dtype=torch.float64)
            return (draws < self.cfg.fed.fraction).nonzero().flatten().tolist()
        m = max(1, round(self.cfg.fed.fraction * k))
        return sorted(torch.randperm(k, generator=generator(self.cfg.seed, t, "sample"))[:m].tolist())

    def plan(self, state: ServerState) -> list[ClientJob]:
        """The sampled clients of the next round, each with its starting point and seed."""
        t = state.round
        send_counts = self.exp.aggregator._needs_label_counts()
        jobs = []
        for i in self.sample(t):
            client = self.exp.clients[i]
            rank = self.exp.aggregator.assigned_rank(state, client.client_id, client.rank)
            if rank != client.rank:  # HetLoRA's self-pruning lowered it
                client = replace(client, rank=rank)
            jobs.append(
                ClientJob(
                    round=t + 1,
                    index=i,
                    client=client,
                    start=transport_start(self.exp.aggregator.client_start(state, client.rank), self.transport),
                    seed=derive_seed(self.cfg.seed, t, client.client_id),
                    send_label_counts=send_counts,
                )
            )
        return jobs

    def finish_received(self, jobs: list[ClientJob], results: list[ClientResult]) -> None:
        """The final round's federated evaluation (``fed.received_eval``): the clients ``plan`` samples
        for the round after the last scored the final model as they would receive it (``score_received``:
        their rank-r_i download, the global model itself for exact methods at every rank) on their
        held-out examples; ``received_final`` holds each metric's mean, weighted by their number.
        A client that failed is left out, named in the log."""
        scored = []
        for job, res in zip(jobs, results, strict=True):
            if res.error is not None:
                log.warning("final evaluation on the clients: %s left out: %s", job.client.client_id, res.error)
            elif res.stats:
                scored.append(res.stats)
        means = held_out_means(scored)
        self.received_final = {k.removeprefix("received_"): v for k, v in means.items() if k.startswith("received_")}
        self.received_final_clients = len([r for r in scored if r.get("personal_n")])
        if self.received_final:
            log.info("final model, as %d clients receive it, on their held-out examples: %s", self.received_final_clients, self.received_final)

    def finish(self, state: ServerState, jobs: list[ClientJob], results: list[ClientResult], train_s: float, train_cpu_s: float | None = None) -> ServerState:
        """Aggregate the round's results (dropping failed clients), fold, evaluate, checkpoint.

        ``train_s`` is the wall-clock time of the round's client training; ``train_cpu_s`` (in-process
        only) the CPU seconds this process spent on it, every thread counted: unlike wall time it
        does not grow when other jobs share the cores or the process is paused, so it is the compute
        figure on a CPU (on a GPU it counts only the host's share)."""
        t = state.round
        plan = self.exp.privacy
        broadcast = state.broadcast_numel()  # last round's base delta, which every client folds
        rows, updates = [], []
        for job, res in zip(jobs, results, strict=True):
            if res.error is None and plan is not None and plan.local is not None and not (res.stats or {}).get("sample_rate"):
                # an update trained without DP-SGD (an older or misconfigured node) must not reach the model
                res = ClientResult(error="its reply reports no DP-SGD sampling rate: it did not train under local DP")
            if res.error is not None:
                log.warning("round %d: %s dropped: %s", t + 1, job.client.client_id, res.error)
                # the steps a refused reply reports count (it trained on them); without a report, the planned ones
                spent = _reported_dp(res.stats) or self._planned_dp(job)
                rows.append({"round": t + 1, "client": job.client.client_id, "rank": job.client.rank, "dropped": res.error, **spent, **_received(res.stats)})
                continue
            updates.append(res.update)
            rows.append(
                {
                    "round": t + 1,
                    "client": job.client.client_id,
                    "rank": job.client.rank,
                    "examples": res.update.num_examples,
                    "train_loss": res.stats["loss"],
                    "steps": int(res.stats["steps"]),
                    "tokens": int(res.stats["tokens"]),
                    **({"sample_rate": res.stats["sample_rate"]} if "sample_rate" in res.stats else {}),
                    **{k: v for k, v in res.stats.items() if k.startswith(HELD_OUT)},
                    "bytes_down": self.bytes_per_number * (job.start.numel() + broadcast),
                    "bytes_up": self.bytes_per_number * res.update.numel(),
                    **(res.wire or {}),
                }
            )
        outliers = self.screen({job.client.client_id: job.start for job in jobs}, updates)
        for cid, reason in outliers.items():
            self._drop(rows, cid, reason, t)
        updates = [u for u in updates if u.client_id not in outliers]
        t1 = time.perf_counter()
        while True:
            if not updates and jobs:
                if plan is not None and plan.local is not None:
                    # they trained, and what they sent reached this server: their steps must outlive the
                    # failure, since a resume replays the round (with fresh batches and noise under secure_noise)
                    self.client_rows.extend(rows)
                    self.checkpoint(state)
                    if self.on_round is not None:
                        self.on_round(self)
                raise RoundFailed(f"round {t + 1}: no sampled client finished; " + "; ".join(f"{r['client']}: {r['dropped']}" for r in rows))
            try:
                if plan is not None and plan.client is not None:
                    new = private_aggregate(self.exp.aggregator, state, updates, plan.client, privacy_generator(self.cfg, t))
                else:
                    new = self.exp.aggregator.aggregate(state, updates)
                break
            except UpdateError as e:  # one client's update cannot be aggregated: drop it, aggregate the others
                if e.client not in {u.client_id for u in updates}:
                    raise
                self._drop(rows, e.client, str(e), t)
                updates = [u for u in updates if u.client_id != e.client]
        state = truncate_base_delta(new, self.cfg.fed.residual_tol)  # fed.residual_tol > 0: fewer bytes, bounded error
        state = transport_state(state, self.transport)  # fed.transport: bfloat16: the server keeps what it sends
        t2 = time.perf_counter()
        self.exp.fm.fold(state.base_delta)
        self.accumulate_folded(state)
        t3 = time.perf_counter()
        done = [r for r in rows if "dropped" not in r]
        row = {
            "round": t + 1,
            "clients": len(done),
            "dropped": len(rows) - len(done),
            "train_loss": sum(r["train_loss"] * r["examples"] for r in done) / sum(r["examples"] for r in done) if done else float("nan"),
            "train_s": train_s,
            **({"train_cpu_s": train_cpu_s} if train_cpu_s is not None else {}),
            "aggregate_s": t2 - t1,
            "fold_s": t3 - t2,
            "train_steps": sum(r["steps"] for r in done),
            "train_tokens": sum(r["tokens"] for r in done),
            "bytes_down": sum(r["bytes_down"] for r in done),
            "bytes_up": sum(r["bytes_up"] for r in done),
        }
        for key in ("wire_bytes_down", "wire_bytes_up"):
            if any(key in r for r in done):
                row[key] = sum(r.get(key, 0) for r in done)
        row.update({k: v for k, v in state.info.items() if isinstance(v, (int, float))})
        # what the aggregation gave each client (its weight; HEXA's drift, FedHL's truncation error)
        position = {cid: i for i, cid in enumerate(state.info.get("clients", []))}
        for key in ("weights", *self.exp.aggregator.per_client_info):
            values = state.info.get(key)
            if isinstance(values, list) and len(values) == len(position):
                for r in done:
                    if r["client"] in position:
                        r[key] = values[position[r["client"]]]
        # each client's own model (personal_*) on its held-out examples, and the model it received
        # (received_*, scored before it trained: a dropped client's score counts too)
        row.update(held_out_means(done, ("personal_",)) | held_out_means(rows, ("received_",)))
        if plan is not None and plan.client is not None:
            row["epsilon"] = plan.epsilon_after(t + 1)
        if plan is not None and plan.local is not None:  # each client's own ε; the run's is the largest so far
            # only their ε changed (dropped ones' too, and those of this round's failed attempts before a resume)
            trained = {r["client"] for r in self.client_rows + rows if r["round"] == t + 1 and r.get("sample_rate")}
            per_client = plan.local_epsilon(self.client_rows + rows, trained)
            for r in rows:
                if r["client"] in per_client:
                    r["epsilon"] = per_client[r["client"]]
            row["epsilon"] = max([*per_client.values(), self.rounds[-1].get("epsilon", 0.0) if self.rounds else 0.0])
        if plan is not None:
            row["dp_noise_multiplier"] = plan.noise_multiplier
        if (t + 1) % self.cfg.fed.eval_every == 0 or t + 1 == self.cfg.fed.rounds:
            row.update(self.evaluate(state))
        self.client_rows.extend(rows)
        self.rounds.append(row)
        self.checkpoint(state)
        if self.on_round is not None:
            self.on_round(self)
        return state

    def screen(self, starts: dict[str, ClientStart], updates: list[ClientUpdate]) -> dict[str, str]:
        """Clients whose effective update ‖s·B_i·A_i − s·B·A‖ (+ heads), measured from the
        factors against the point each started from, exceeds ``fed.max_update_norm`` or
        ``fed.max_update_ratio`` × the round's median: {client: reason}."""
        fed = self.cfg.fed
        if not (fed.max_update_norm or fed.max_update_ratio) or not updates:
            return {}
        try:
            norms = {u.client_id: effective_update_norm(starts[u.client_id].adapters, starts[u.client_id].dense, u) for u in updates}
        except (KeyError, RuntimeError, ValueError):
            return {}  # malformed updates: validation names them, with the reason
        median = float(torch.tensor(sorted(norms.values()), dtype=torch.float64).median())
        out = {}
        for cid, n in norms.items():
            if fed.max_update_norm and not n <= fed.max_update_norm:
                out[cid] = f"update norm {n:.4g} exceeds fed.max_update_norm={fed.max_update_norm:g}"
            elif fed.max_update_ratio and len(norms) > 2 and not n <= fed.max_update_ratio * median:
                out[cid] = f"update norm {n:.4g} is more than fed.max_update_ratio={fed.max_update_ratio:g} × the round's median {median:.4g}"
        return out

    def _planned_dp(self, job: ClientJob) -> dict:
        """Local DP: a sampled client that failed may have trained (and its reply may have reached
        the server late), so its ε counts the DP-SGD steps it was given: those it reported in its
        last reply (a Flower node with its own rows: the server never saw their number), else
        those of its partition's size."""
        plan = self.exp.privacy
        if plan is None or plan.local is None:
            return {}
        cid = job.client.client_id
        # any row with a q: a reply the server refused still reported the steps the client took
        last = next((r for r in reversed(self.client_rows) if r["client"] == cid and r.get("sample_rate")), None)
        if last is not None:
            return {"steps": int(last["steps"]), "sample_rate": float(last["sample_rate"])}
        n = len(job.client.indices)
        if n == 0:  # data.node_data and never heard from: nothing known to count (it may not have trained)
            log.warning("round %d: %s failed before it ever reported its DP-SGD steps; its ε cannot be accounted", job.round, cid)
            return {}
        return {"steps": planned_steps(n, self.cfg.train), "sample_rate": sample_rate(n, self.cfg.train)}

    def _drop(self, rows: list[dict], client: str, reason: str, t: int) -> None:
        log.warning("round %d: %s dropped: %s", t + 1, client, reason)
        for i, r in enumerate(rows):
            if r["client"] == client and "dropped" not in r:
                # the steps it took stay: its ε counts them (local DP), whatever the server did with the update
                spent = {k: r[k] for k in ("steps", "sample_rate") if k in r}
                rows[i] = {"round": r["round"], "client": client, "rank": r["rank"], "dropped": reason, **spent, **_received(r)}

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
            out.update({"eval_" + k: v for k, v in model_metrics(exp, model, self.cfg.train.eval_batch_size).items()})
            if self.cfg.fed.eval_clients:
                primary = exp.task.primary_metric
                for c in exp.clients:
                    m = evaluate(model, exp.train, c.indices, exp.task, self.cfg.train.eval_batch_size, exp.pad_token_id, exp.fm.placement)
                    key = primary if primary in m else "loss"  # a causal LM's training data has answers, not classes
                    out[f"local_{key}_{c.client_id}"] = m[key]
            if exp.sample_prompts:
                answers = generate_answers(model, exp.tokenizer, [ids for _, ids in exp.sample_prompts], self.cfg.data.sample_tokens, exp.fm.placement)
                self.samples.extend({"round": state.round, "prompt": text, "answer": a} for (text, _), a in zip(exp.sample_prompts, answers))
        out["eval_s"] = time.perf_counter() - t0
        return out


# Settings that cannot change a run's results: a resume may differ in them. `threads` changes the order
# of floating-point sums (a resume at another thread count equals the uninterrupted run up to round-off,
# not bit for bit); `data.data_dir` is where the data lies, which differs between clones of one repository;
# `track` is where metrics are copied to.
_NOT_RESULTS = {
    ("progress",),
    ("threads",),
    ("output_dir",),
    ("name",),
    ("train", "eval_batch_size"),
    ("fed", "client_timeout"),
    ("data", "data_dir"),
    ("track",),
}


def same_results(stored: dict, cfg: RunConfig) -> bool:
    """Whether a run folder's stored configuration gives the results ``cfg`` would (its
    bookkeeping keys aside). A key the stored one lacks was added to fedlora after that run:
    it ran with the key's default (new settings default to the old behaviour)."""
    return first_difference(stored, cfg) is None


def first_difference(stored: dict, cfg: RunConfig) -> str | None:
    """The first dotted key (in config order) whose stored value gives other results than ``cfg``'s, or None."""
    a = _result_keys(_merged(_plain(config_to_dict(RunConfig())), _plain(stored)))
    b = _result_keys(_plain(config_to_dict(cfg)))

    def walk(x: Any, y: Any, prefix: str) -> str | None:
        if isinstance(x, dict) and isinstance(y, dict) and not prefix.endswith("options"):
            for k in [*y, *(k for k in x if k not in y)]:
                found = walk(x.get(k), y.get(k), f"{prefix}.{k}" if prefix else k)
                if found is not None:
                    return found
            return None
        return None if x == y else prefix

    return walk(a, b, "")


def key_value(config: dict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _merged(defaults: dict, stored: dict) -> dict:
    out = dict(defaults)
    for k, v in stored.items():
        out[k] = _merged(defaults[k], v) if isinstance(v, dict) and isinstance(defaults.get(k), dict) and k != "options" else v
    return out


def _result_keys(cfg: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg.items()}
    if out.get("fed", {}).get("mode") == "centralized":
        out.pop("partition", None)  # one centralized run serves every partition
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


def model_metrics(exp: Experiment, model, eval_batch_size: int) -> dict[str, float]:
    """A model's metrics on the run's evaluation set: the task's own (or a causal LM's loss and
    perplexity), and for a GLUE task as prompts its official metric from the label words'
    likelihoods. What every round reports, and what the exported folder is checked against."""
    out = evaluate(model, exp.eval, np.arange(len(exp.eval.labels)), exp.task, eval_batch_size, exp.pad_token_id, exp.fm.placement)
    if exp.prompt_eval is not None:
        pe = exp.prompt_eval
        scores = label_word_scores(model, pe.prompts, pe.answers, eval_batch_size, exp.pad_token_id, exp.fm.placement)
        out.update(prompt_metrics(exp.task, scores, pe.targets))
    return out
