"""What a configuration will do, before it trains (``fedlora plan``): the clients, their ranks,
the rounds each is sampled in and its local steps, and, under differential privacy, the noise
multiplier and the ε the run will report.

Client mode (DP-FedAvg): one Gaussian mechanism a round at sampling rate q = ``fed.fraction``,
so ε after round t is the accountant's for (z, q, t). Local mode (DP-SGD): client i takes
``planned_steps(n_i)`` steps at q_i = L/n_i in each round it is sampled (the fixed-size draws of
``Server.sample``, reproduced here from the seed), so its ε after the last round is the
accountant's for (z, q_i, τ_i·steps_i), τ_i its rounds; the run reports the largest. A round that
fails and is replayed is charged again (docs/privacy.md), which a plan cannot foresee. Both use
the accountant (Opacus) the run reports ε with.
"""

from __future__ import annotations

from typing import Any

from ..config import ConfigError, RunConfig
from ..privacy import epsilon
from .dp_sgd import sample_rate
from .experiment import build_experiment
from .run import checked_run_dir, run_name
from .server import Server
from .train import planned_steps

__all__ = ["run_plan", "plan_text"]


def run_plan(cfg: RunConfig) -> dict[str, Any]:
    """The plan of ``cfg`` as plain data (what ``fedlora plan --json`` prints). It loads the model
    and data as ``fedlora run`` would (every input error surfaces the same way) and writes nothing."""
    if cfg.data.node_data:
        raise ConfigError("data.node_data=true: the clients' rows are on the Flower nodes, so their sizes (and a local-DP plan) are not known here")
    exp = build_experiment(cfg)
    server = Server(exp, checked_run_dir(cfg))  # holds the sampling rule; writes nothing until a round finishes
    rounds = cfg.fed.rounds
    plan = exp.privacy
    # client-level DP samples by Poisson draws (secret with secure_noise): only their rate is planned
    sampled = [0] * len(exp.clients)
    if plan is None or plan.client is None:
        for t in range(rounds):
            for i in server.sample(t):
                sampled[i] += 1
    clients = [
        {
            "client": c.client_id,
            "examples": int(len(c.indices)),
            "rank": int(c.rank),
            "steps_per_round": planned_steps(len(c.indices), cfg.train),
            **({"rounds": sampled[i]} if plan is None or plan.client is None else {}),
        }
        for i, c in enumerate(exp.clients)
    ]
    federated = cfg.fed.mode == "federated"
    out: dict[str, Any] = {"name": run_name(cfg), "method": cfg.fed.method if federated else "centralized", "rounds": rounds, "clients": clients}
    if federated:
        out["fraction"] = cfg.fed.fraction
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
    for c in clients:
        c["sample_rate"] = sample_rate(c["examples"], cfg.train)
        steps = c["steps_per_round"] * c["rounds"]
        c["epsilon"] = epsilon(plan.accountant, plan.noise_multiplier, c["sample_rate"], steps, plan.delta) if steps else 0.0
    out["privacy"]["epsilon"] = max(c["epsilon"] for c in clients)
    return out


def plan_text(plan: dict[str, Any]) -> str:
    """``run_plan``'s data as the lines ``fedlora plan`` prints."""
    sampling = f", fraction {plan['fraction']:g}" if "fraction" in plan else ""
    lines = [f"{plan['name']}: {plan['method']}, {len(plan['clients'])} clients, {plan['rounds']} rounds{sampling}"]
    dp = plan.get("privacy")
    local = dp is not None and dp["mode"] == "local"
    counted = "rounds" in plan["clients"][0]
    head = "client      examples  rank  steps/round" + ("  rounds" if counted else "") + ("  q_i       ε after the last round" if local else "")
    lines += ["", head]
    for c in plan["clients"]:
        row = f"{c['client']:<10} {c['examples']:>9}  {c['rank']:>4}  {c['steps_per_round']:>11}" + (f"  {c['rounds']:>6}" if counted else "")
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
        lines.append(f"clients sampled by Poisson sampling at q = {dp['sample_rate']:g}; the run's ε after each round:")
        lines.append("  " + ", ".join(f"{t}: {e:.4g}" for t, e in enumerate(dp["epsilon_by_round"], start=1)))
    else:
        lines.append(f"the run's ε (its most-spending client) after the last round: {dp['epsilon']:.4g} (a failed round replayed would add to it)")
    return "\n".join(lines)
