"""Local DP-SGD on one client (``privacy.mode: local``), through Opacus.

Each step draws a logical batch by Poisson sampling (every example of the client
independently with probability q = L / n_i, L = batch_size · grad_accum: the sampling the
accountant assumes, so a batch may be empty), Opacus' ``GradSampleModule`` hooks give every
example's gradient g_j of the trainable parameters (LoRA factors of the active adapter and the
head, all together), and Opacus' ``DPOptimizer`` clips and noises them before the optimiser (AdamW, or SGD) sees them:

    ḡ = (Σ_j g_j·min(1, C/‖g_j‖₂) + N(0, z²C²·I)) / (q·n_i)

A Poisson batch holds examples of every length, so it is sorted by length and run as physical
batches of at most ``batch_size`` examples; Opacus clips each physical batch's examples and
accumulates them (``signal_skip_step``), and the noise is added once per logical batch. The
per-example gradients do not depend on how the batch is cut, so this only saves padding.

A causal LM's loss is each example's mean over its answer tokens, then the batch mean, so an
example's gradient depends on that example only (the models' own token-averaged batch loss
would weight an example by the other examples' lengths). The accountant's ε of client i after
t rounds is that of (z, q, the steps it took); ``fedlora.privacy`` reports it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..data import collate
from ..models import FedModel
from .seeding import derive_seed, generator, secret_generator
from .train import TrainStats, make_optimizer, planned_steps

__all__ = ["LocalDP", "train_local_dp", "sample_rate"]


@dataclass(frozen=True)
class LocalDP:
    clip: float  # C, per example
    noise_multiplier: float  # z
    secure_noise: bool = False


def sample_rate(num_examples: int, cfg: TrainConfig) -> float:
    """q = L / n_i with L = batch_size · grad_accum the logical batch (1 when the client has
    fewer examples than that)."""
    return min(1.0, cfg.batch_size * cfg.grad_accum / max(1, num_examples))


def _grad_samples_in_fp32(params) -> None:
    """Per-example gradients as float32 before Opacus clips them. Under bf16/fp16 autocast its hooks
    compute them in the half dtype, and it would take their norms and scale them by min(1, C/‖g_j‖)
    in that dtype too: rounded, a clipped gradient can come out above C (by ~2⁻⁸ relative in bf16),
    and the accountant's sensitivity is C. In float32 the bound holds to float32 round-off."""
    for p in params:
        g = getattr(p, "grad_sample", None)
        if isinstance(g, torch.Tensor) and g.dtype != torch.float32:
            p.grad_sample = g.float()
        elif isinstance(g, list):
            p.grad_sample = [t.float() for t in g]


def _per_example_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over each example's answer tokens (labels ≠ −100), then over the batch."""
    tgt = labels[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tgt, ignore_index=-100, reduction="none")
    per = ce.sum(1) / (tgt != -100).sum(1).clamp_min(1)
    return per.mean()


def train_local_dp(fm: FedModel, data, indices: np.ndarray, cfg: TrainConfig, seed: int, dp: LocalDP, *, pad_token_id: int, progress=None) -> TrainStats:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(derive_seed(seed, "dropout"))
    place = fm.placement
    # Opacus draws the noise on the parameters' device, so the generator lives there. With
    # secure_noise the Poisson batches and the noise come from the operating system's entropy:
    # which examples a step used is as secret as the noise (the subsampling amplification needs it).
    if dp.secure_noise:
        batches, noise = secret_generator(), secret_generator(place.device)
    else:
        batches = generator(seed, "dp-batches")
        noise = torch.Generator(device=place.device).manual_seed(derive_seed(seed, "dp-noise"))
    n = len(indices)
    q = sample_rate(n, cfg)
    total = planned_steps(n, cfg)
    params = fm.trainable_parameters()
    causal = not fm.head
    with warnings.catch_warnings():  # Opacus warns about modules it does not need to hook (frozen ones)
        warnings.simplefilter("ignore")
        gsm = GradSampleModule(fm.peft, batch_first=True, loss_reduction="mean", strict=False)
        opt = DPOptimizer(
            make_optimizer(fm, params, cfg),
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.clip,
            expected_batch_size=max(1, round(q * n)),
            loss_reduction="mean",
            generator=noise,
            secure_mode=dp.secure_noise,
        )
    sched = get_linear_schedule_with_warmup(opt.original_optimizer, int(cfg.warmup_ratio * total), total)
    gsm.train()
    loss_sum, loss_n, examples, tokens = 0.0, 0, 0, 0
    try:
        for _ in range(total):
            take = torch.rand(n, generator=batches, dtype=torch.float64).numpy() < q
            logical = indices[take]
            if len(logical) == 0:  # an empty Poisson batch: the step is noise alone
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            logical = logical[np.argsort(data.lengths[logical], kind="stable")]
            physical = [logical[i : i + cfg.batch_size] for i in range(0, len(logical), cfg.batch_size)]
            for k, batch_idx in enumerate(physical):
                batch = place.batch(collate(data, batch_idx, pad_token_id))
                with place.autocast():
                    if causal:
                        labels = batch.pop("labels")
                        loss = _per_example_lm_loss(gsm(**batch).logits, labels)
                    else:
                        loss = gsm(**batch).loss
                with warnings.catch_warnings():  # the frozen embeddings' outputs need no gradient: expected, not a problem
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.float().backward()
                loss_sum += float(loss.detach()) * len(batch_idx)
                loss_n += len(batch_idx)
                examples += len(batch_idx)
                tokens += batch["input_ids"].numel()
                _grad_samples_in_fp32(params)
                if k < len(physical) - 1:  # clip and accumulate this part; noise and step after the last
                    opt.signal_skip_step(do_skip=True)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if progress is not None:
                progress.update(1)
    finally:
        gsm._close()  # remove Opacus' hooks: the shared model serves other clients next
        for p in params:
            p.grad_sample = None
    fm.peft.eval()
    return TrainStats(loss=loss_sum / max(loss_n, 1), steps=total, examples=examples, tokens=tokens, sample_rate=q)
