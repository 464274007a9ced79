"""What a configuration will do, before it trains (``fedlora plan``): the clients, their ranks and
local steps, and, under differential privacy, the noise multiplier and the ε each round spends.

Client mode (DP-FedAvg): one Gaussian mechanism a round at sampling rate q = ``fed.fraction``,
so ε after round t is the accountant's for (z, q, t). Local mode (DP-SGD): client i takes
``planned_steps(n_i)`` steps a round at q_i = L/n_i, so if it is sampled every round its ε after
round t is the accountant's for (z, q_i, t·steps_i); the run reports the largest. Both figures
come from the same accountant (Opacus) the run reports ε with.
"""

from __future__ import annotations

from typing import Any

from ..config import ConfigError, RunConfig
from ..privacy import epsilon
from .dp_sgd import sample_rate
from .experiment import build_experiment
from .run import run_name
from .train import planned_steps

__all__ = ["run_plan", "plan_text"]


def run_plan(cfg: RunConfig) -> dict[str, Any]:
    """The plan of ``cfg`` as plain data (what ``fedlora plan --json`` prints)."""
    if cfg.data.node_data:
        raise ConfigError("data.node_data=true: the clients' rows are on the Flower nodes, so their sizes (and a local-DP plan) are not known here")
    exp = build_experiment(cfg)  # every input error surfaces here, as for `fedlora run`
    rounds = cfg.fed.rounds
    clients = [
        {"client": c.client_id, "examples": int(len(c.indices)), "rank": int(c.rank), "steps_per_round": planned_steps(len(c.indices), cfg.train)}
        for c in exp.clients
    ]
    out: dict[str, Any] = {
        "name": run_name(cfg),
        "method": "centralized" if cfg.fed.mode == "centralized" else cfg.fed.method,
        "rounds": rounds,
        "fraction": cfg.fed.fraction,
        "clients": clients,
    }
    plan = exp.privacy
    if plan is None:
        return out
    p = cfg.privacy
    out["privacy"] = {
        "mode": plan.mode,
        "noise_multiplier": plan.noise_multiplier,
        "from_target_epsilon": p.target_epsilon or None,
        "clip": p.clip,
        "delta": plan.delta,
        "accountant": plan.accountant,
    }
    if plan.mode == "client":
        out["privacy"]["sample_rate"] = plan.sample_rate
        out["privacy"]["epsilon_by_round"] = [plan.epsilon_after(t) for t in range(1, rounds + 1)]
        return out
    for c in clients:  # local DP-SGD, each client sampled every round (the most it can spend)
        c["sample_rate"] = sample_rate(c["examples"], cfg.train)
        c["epsilon"] = epsilon(plan.accountant, plan.noise_multiplier, c["sample_rate"], c["steps_per_round"] * rounds, plan.delta)
    out["privacy"]["epsilon"] = max(c["epsilon"] for c in clients)
    return out


def plan_text(plan: dict[str, Any]) -> str:
    """``run_plan``'s data as the lines ``fedlora plan`` prints."""
    lines = [f"{plan['name']}: {plan['method']}, {len(plan['clients'])} clients, {plan['rounds']} rounds, fraction {plan['fraction']:g}"]
    dp = plan.get("privacy")
    local = dp is not None and dp["mode"] == "local"
    head = "client      examples  rank  steps/round" + ("  q_i       ε after the last round" if local else "")
    lines += ["", head]
    for c in plan["clients"]:
        row = f"{c['client']:<10} {c['examples']:>9}  {c['rank']:>4}  {c['steps_per_round']:>11}"
        if local:
            row += f"  {c['sample_rate']:<8.4g}  {c['epsilon']:.4g}"
        lines.append(row)
    if dp is None:
        return "\n".join(lines + ["", "no differential privacy (privacy.mode: none)"])
    source = f" (for target ε = {dp['from_target_epsilon']:g})" if dp["from_target_epsilon"] else ""
    lines += [
        "",
        f"privacy: {'DP-FedAvg (client level)' if dp['mode'] == 'client' else 'DP-SGD on each client (example level)'}, "
        f"z = {dp['noise_multiplier']:.4g}{source}, C = {dp['clip']:g}, δ = {dp['delta']:g}, accountant {dp['accountant']}",
    ]
    if dp["mode"] == "client":
        lines.append(f"clients sampled by Poisson sampling at q = {dp['sample_rate']:g}; ε after each round:")
        lines.append("  " + ", ".join(f"{t}: {e:.4g}" for t, e in enumerate(dp["epsilon_by_round"], start=1)))
    else:
        lines.append(f"the run's ε (its most-spending client, sampled every round): {dp['epsilon']:.4g}")
    return "\n".join(lines)
