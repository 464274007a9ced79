"""Privacy accounting and the checks a DP run passes before it trains (docs/privacy.md).

Accounting is Opacus' (``opacus.accountants``: RDP, or PRV for tighter ε), never a formula of
ours: client-level DP is one Gaussian mechanism per round with sampling rate q = fed.fraction
(Poisson sampling) and noise multiplier z, so ε after t rounds is the accountant's ε for
(z, q, t steps, δ). A target ε becomes z through ``get_noise_multiplier`` for the planned rounds.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import ConfigError, RunConfig
from .core import Aggregator
from .core.privacy import DP_METHODS, ClientDP

if TYPE_CHECKING:
    from .engine.dp_sgd import LocalDP

__all__ = ["PrivacyPlan", "composed_epsilon", "epsilon", "noise_for_epsilon", "plan_privacy"]


def _accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    return {"rdp": RDPAccountant, "prv": PRVAccountant}[name]()


def epsilon(accountant: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε spent by ``steps`` Gaussian mechanisms (z, q), at δ, by Opacus' accountant."""
    return composed_epsilon(accountant, [(noise_multiplier, sample_rate, steps)], delta)


def composed_epsilon(accountant: str, history: list[tuple[float, float, int]], delta: float) -> float:
    """ε spent by the composition of every (z, q, steps) in ``history``, at δ, by Opacus' accountant."""
    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    acc = _accountant(accountant)
    acc.history = list(history)
    with warnings.catch_warnings():  # RDP's "optimal order is the largest alpha": still a valid bound
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta))


def noise_for_epsilon(accountant: str, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest z (to Opacus' tolerance, 0.01 in ε) whose ``steps`` mechanisms spend at most ``target_epsilon``."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant, epsilon_tolerance=0.01
            )
        )


@dataclass(frozen=True)
class PrivacyPlan:
    mode: str  # client | local
    accountant: str
    delta: float
    noise_multiplier: float  # z, given or from the target ε
    sample_rate: float  # client mode: q of the clients per round (local mode: per client, see local_epsilon)
    client: ClientDP | None = None
    local: LocalDP | None = None

    def epsilon_after(self, rounds: int) -> float:
        """Client mode: ε of the whole run after ``rounds`` rounds."""
        return epsilon(self.accountant, self.noise_multiplier, self.sample_rate, rounds, self.delta)

    def local_epsilon(self, client_rows: list[dict], clients: set[str]) -> dict[str, float]:
        """Local mode: the ε of each of ``clients`` over every DP-SGD step it has taken (rows of
        clients.jsonl), those of rounds whose update was dropped included: it trained, and what it
        sent may have reached the server. Steps at different q (a Flower node restarted with other
        rows) compose as mechanisms of their own."""
        steps: dict[str, dict[float, int]] = {}  # client → q → steps taken at it
        for r in client_rows:
            if r.get("sample_rate") and r["client"] in clients:
                at = steps.setdefault(r["client"], {})
                at[float(r["sample_rate"])] = at.get(float(r["sample_rate"]), 0) + int(r["steps"])
        return {c: composed_epsilon(self.accountant, [(self.noise_multiplier, q, k) for q, k in at.items()], self.delta) for c, at in steps.items()}

    def check_local_client(self, n: int, cfg: RunConfig) -> None:
        """Local mode, a client whose examples the plan did not see (a Flower node's own data):
        ConfigError if δ ≥ 1/n, or if over the planned rounds it would spend more than the target ε."""
        if self.local is None:
            return
        if self.delta >= 1 / max(n, 1):
            raise ConfigError(f"privacy.delta={self.delta} must be below 1/n = {1 / max(n, 1):.3g} for this node's n = {n} examples")
        target = cfg.privacy.target_epsilon
        if target > 0:
            from .engine.dp_sgd import sample_rate
            from .engine.train import planned_steps

            spent = epsilon(self.accountant, self.noise_multiplier, sample_rate(n, cfg.train), planned_steps(n, cfg.train) * cfg.fed.rounds, self.delta)
            if spent > target:
                raise ConfigError(
                    f"this node's {n} examples would spend ε = {spent:.3g} over {cfg.fed.rounds} rounds at the noise planned on the "
                    f"server's partitions (z = {self.noise_multiplier:.4g}), above privacy.target_epsilon={target}: give privacy.noise_multiplier instead"
                )


def plan_privacy(cfg: RunConfig, aggregator: Aggregator, client_sizes: list[int] | None) -> PrivacyPlan | None:
    """``privacy.*`` checked against the rest of the run and resolved into a plan, or a
    ConfigError naming what would break the guarantee. None when privacy.mode is none.
    ``client_sizes`` None: a server that does not know them (``data.node_data``); local DP then
    takes a given noise multiplier, not a target ε, and each node checks δ < 1/n itself."""
    p = cfg.privacy
    if p.mode == "none":
        return None
    if p.noise_multiplier > 0 and p.target_epsilon > 0:
        raise ConfigError("give privacy.noise_multiplier or privacy.target_epsilon, not both")
    if p.noise_multiplier == 0 and p.target_epsilon == 0:
        raise ConfigError(f"privacy.mode={p.mode} needs privacy.noise_multiplier > 0 or privacy.target_epsilon > 0 (without noise ε is infinite)")
    if cfg.fed.eval_clients:
        raise ConfigError("fed.eval_clients reports the global model's metric on each client's training data, which the DP guarantee does not cover")
    if cfg.fed.personal_eval:
        raise ConfigError("fed.personal_eval reports each client's own model on examples it holds out, which the DP guarantee does not cover")
    if aggregator._needs_label_counts():
        raise ConfigError(
            f"fed.method={cfg.fed.method} with class_aware_head sends each client's exact label counts, which the DP guarantee does not cover: set it false"
        )
    if getattr(aggregator, "self_pruning", False):
        raise ConfigError(
            f"fed.method={cfg.fed.method} with prune_gamma > 0 reports each client's rank, chosen from its data, which the DP guarantee does not cover: set prune_gamma to 0"
        )
    if p.mode == "local":
        if not aggregator.local_dp:
            raise ConfigError(
                f"fed.method={cfg.fed.method} cannot train under privacy.mode=local: its clients train through a parametrisation Opacus's per-example gradients do not cover"
            )
        return _plan_local(cfg, client_sizes)
    num_clients = cfg.partition.num_clients if client_sizes is None else len(client_sizes)
    if cfg.fed.mode != "federated":
        raise ConfigError("privacy.mode=client protects clients of a federation; fed.mode=centralized has none (privacy.mode=local is DP-SGD)")
    if aggregator.dp_space(aggregator_state_stub()) is None:
        raise ConfigError(f"fed.method={cfg.fed.method} has no client-level DP mechanism: use {', '.join(DP_METHODS)} (docs/privacy.md says why)")
    if cfg.fed.max_update_ratio:
        raise ConfigError(
            "privacy.mode=client cannot take fed.max_update_ratio: whether it drops a client depends on the others' norms (the round's median), "
            "so one client can change the release by more than C; fed.max_update_norm decides per client and is allowed"
        )
    if cfg.fed.weighting != "uniform":
        raise ConfigError(
            "privacy.mode=client needs fed.weighting=uniform: data-size weights let a client's share grow with its example count, which the clip C does not bound"
        )
    if p.delta >= 1 / num_clients:
        raise ConfigError(
            f"privacy.delta={p.delta} must be below 1/num_clients = {1 / num_clients:.3g}: at that δ one client's update may be released in the clear"
        )
    q = cfg.fed.fraction
    z = p.noise_multiplier
    if p.target_epsilon > 0:
        try:
            z = noise_for_epsilon(p.accountant, p.target_epsilon, p.delta, q, cfg.fed.rounds)
        except ValueError as e:
            raise ConfigError(f"privacy.target_epsilon={p.target_epsilon} cannot be met over {cfg.fed.rounds} rounds at q={q}: {e}") from None
    return PrivacyPlan("client", p.accountant, p.delta, z, q, client=ClientDP(clip=p.clip, noise_multiplier=z, denominator=q * num_clients))


def _plan_local(cfg: RunConfig, client_sizes: list[int] | None) -> PrivacyPlan:
    """Local DP-SGD: per-example clipping on every client. A target ε sets z for the client that
    spends the most (the smallest one: largest q) if it trains in every round."""
    p, t = cfg.privacy, cfg.train
    if t.precision == "fp16":
        raise ConfigError("privacy.mode=local does not support train.precision=fp16 (its gradient scaler would scale the noise); use bf16 or fp32")
    if t.gradient_checkpointing:
        raise ConfigError("privacy.mode=local needs per-example activations: train.gradient_checkpointing must be false")
    z = p.noise_multiplier
    if client_sizes is None:  # each node checks δ < 1/n on its own examples (client_app)
        if p.target_epsilon > 0:
            raise ConfigError(
                "privacy.target_epsilon with data.node_data=true: the server does not know the nodes' sizes to plan the noise on; "
                "give privacy.noise_multiplier (the server reports the ε each node spends)"
            )
    else:
        smallest = min(client_sizes)
        if p.delta >= 1 / smallest:
            raise ConfigError(f"privacy.delta={p.delta} must be below 1/n = {1 / smallest:.3g} for the smallest client's n = {smallest} examples")
        if p.target_epsilon > 0:
            from .engine.dp_sgd import sample_rate
            from .engine.train import planned_steps

            try:
                z = max(
                    noise_for_epsilon(p.accountant, p.target_epsilon, p.delta, sample_rate(n, t), planned_steps(n, t) * cfg.fed.rounds)
                    for n in set(client_sizes)
                )
            except ValueError as e:
                raise ConfigError(f"privacy.target_epsilon={p.target_epsilon} cannot be met by local DP-SGD over {cfg.fed.rounds} rounds: {e}") from None
    from .engine.dp_sgd import LocalDP

    return PrivacyPlan("local", p.accountant, p.delta, z, 0.0, local=LocalDP(clip=p.clip, noise_multiplier=z, secure_noise=p.secure_noise))


def aggregator_state_stub():
    """A round-0 state with no modules: enough to ask a method for its DP space."""
    from .core import LoraSpec, ServerState

    return ServerState(round=0, rank=1, lora=LoraSpec(), adapters={})
