"""One frozen base model for every simulated client, with peft LoRA adapters.

The engines see a model only through :class:`FedModel`: named adapters
(B out×r, A r×in — the core's orientation), dense head parameters, and
folding of factored deltas into the frozen base weights. Clients differ only
in which adapter is active (one per LoRA rank in use), what is loaded into it,
and the head; so K clients cost one base model plus K small adapter copies.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter, Factored, LoraSpec
from .base_delta import BaseDeltas, is_quantized
from .device import Placement
from .hub import FRESH, HEAD_MODULES, ModelError

__all__ = ["LoraSettings", "FedModel", "HEAD_MODULES"]

# Sequence-classification heads trained in full (peft's SEQ_CLS modules_to_save).


@dataclass(frozen=True)
class LoraSettings:
    target_modules: tuple[str, ...] = ("query", "value")
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False

    @property
    def spec(self) -> LoraSpec:
        return LoraSpec(alpha=self.alpha, rslora=self.rslora)

    def peft_config(self, rank: int, **extra):
        from peft import LoraConfig

        return LoraConfig(
            r=rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            use_rslora=self.rslora,
            target_modules=list(self.target_modules),
            **extra,
        )


def adapter_name(rank: int) -> str:
    return f"r{rank}"


class FedModel:
    """A Hugging Face model wrapped once with one peft adapter per client rank."""

    def __init__(
        self,
        model: nn.Module,
        settings: LoraSettings,
        ranks: Iterable[int] = (),
        placement: Placement | None = None,
        *,
        head: bool = True,
        base_delta: str = "auto",
    ):
        import warnings

        from peft import get_peft_model
        from peft.tuners.lora import LoraLayer

        self.settings = settings
        self.ranks = sorted(set(ranks) | {settings.rank})
        # Classifiers train their head in full; a causal LM's output layer stays frozen (head=False).
        # the head: the output layer, and any module the checkpoint lacked (hub.load_pretrained: random at load)
        self.head_modules = (*HEAD_MODULES, *getattr(model, FRESH, ())) if head else ()
        # No LoRA inside the head, which trains in full: a target name such as `dense` would otherwise also match
        # RoBERTa's classifier.dense, whose factors would then travel (and be averaged) as head weights.
        self._exclude = {"exclude_modules": "(?:" + "|".join(re.escape(m) for m in self.head_modules) + r")(?:\..*)?"} if self.head_modules else {}
        with warnings.catch_warnings():  # peft warns when it switches Conv1D to fan_in_fan_out
            warnings.simplefilter("ignore")
            first, *rest = self.ranks
            try:
                self.peft = get_peft_model(model, settings.peft_config(first, **self._exclude), adapter_name=adapter_name(first))
            except ValueError as e:  # peft: "Target modules {...} not found in the base model"
                if "not found" not in str(e):
                    raise
                raise ModelError(f"no module matches LoRA target_modules {list(settings.target_modules)} in this {model.config.model_type} model") from None
            for r in rest:
                self.peft.add_adapter(adapter_name(r), settings.peft_config(r, **self._exclude))
        self.base = self.peft.get_base_model()
        prefix = "base_model.model."
        self.layers: dict[str, LoraLayer] = {
            name[len(prefix) :] if name.startswith(prefix) else name: m for name, m in self.peft.named_modules() if isinstance(m, LoraLayer)
        }
        if not self.layers:
            raise ModelError(f"no module matches LoRA target_modules {list(settings.target_modules)}")
        self.head = {name: p for name, p in self.base.named_parameters() if _in_modules(name, self.head_modules)}
        if head and not self.head:
            raise ModelError("the model has no classification head named 'classifier' or 'score'")
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.activate(settings.rank)
        self.placement = placement or Placement(torch.device("cpu"))
        base_layers = {mod: layer.get_base_layer() for mod, layer in self.layers.items()}
        self.quantized = any(is_quantized(layer) for layer in base_layers.values())
        if not self.quantized:  # a bitsandbytes model is placed when loaded (device_map) and cannot move
            self.peft.to(self.placement.device)
        # Where ΔW0 lives: folded into W0, or beside it as frozen factors (models/base_delta.py).
        self.deltas = BaseDeltas(base_layers, {mod: layer.fan_in_fan_out for mod, layer in self.layers.items()}, base_delta)

    # ------------------------------------------------------------------ shapes
    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every adapted weight, whatever its storage layout."""
        r = adapter_name(self.settings.rank)
        return {n: (layer.lora_B[r].out_features, layer.lora_A[r].in_features) for n, layer in self.layers.items()}

    def output_keys(self) -> list[str]:
        """Dense keys of the output layer (rows = classes), for class-aware averaging."""
        num_labels = self.base.config.num_labels
        mods = [n.rsplit(".", 1)[0] for n, p in self.head.items() if n.endswith("weight") and p.shape[0] == num_labels]
        if not mods:
            raise ValueError(f"no head layer with {num_labels} output rows")
        return [n for n in self.head if n.rsplit(".", 1)[0] == mods[-1]]

    # ---------------------------------------------------------------- adapters
    def ensure_rank(self, rank: int) -> None:
        """Add a rank-``rank`` adapter if the model has none (a client whose method lowered its rank:
        HetLoRA's self-pruning). Frozen until :meth:`activate`; placed beside its base layer by peft."""
        if rank in self.ranks:
            return
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.peft.add_adapter(adapter_name(rank), self.settings.peft_config(rank, **self._exclude))
        self.ranks = sorted({*self.ranks, rank})
        self.activate(self.active_rank)  # the new adapter's factors frozen; peft's add_adapter leaves the active one as it was

    def activate(self, rank: int, train_A: bool = True, train_B: bool = True) -> None:
        """Make the rank-``rank`` adapter the active, trainable one (and the head trainable)."""
        name = adapter_name(rank)
        if rank not in self.ranks:
            raise ValueError(f"no adapter of rank {rank}; the model was built for ranks {self.ranks}")
        self.peft.base_model.set_adapter(name)
        for layer in self.layers.values():
            for r in self.ranks:
                on = r == rank
                layer.lora_A[adapter_name(r)].weight.requires_grad_(on and train_A)
                layer.lora_B[adapter_name(r)].weight.requires_grad_(on and train_B)
        for p in self.head.values():
            p.requires_grad_(True)
        self.active_rank = rank

    @torch.no_grad()
    def load_adapters(self, adapters: Mapping[str, Adapter]) -> None:
        """Copy (B, A) into the active adapter; the scalings must agree with peft's."""
        name = adapter_name(self.active_rank)
        for mod, layer in self.layers.items():
            a = adapters[mod]
            if a.rank != self.active_rank:
                raise ValueError(f"module {mod!r}: adapter rank {a.rank} but rank {self.active_rank} is active")
            if abs(layer.scaling[name] - a.scale) > 1e-6 * a.scale:
                raise ValueError(f"module {mod!r}: scaling {a.scale} differs from peft's {layer.scaling[name]}")
            layer.lora_B[name].weight.copy_(a.B)
            layer.lora_A[name].weight.copy_(a.A)

    @contextmanager
    def B_in_span(self, on: bool = True) -> Iterator[None]:
        """Inside the block, the active adapter's B trains only within the column space of the B
        loaded into it (Fed-SB): B = Q·R with Q an orthonormal basis of that B (a buffer) and the
        r×r R the parameter the optimiser sees. Afterwards B is a plain parameter again, holding Q·R."""
        if not on:
            yield
            return
        from torch.nn.utils import parametrize

        name = adapter_name(self.active_rank)
        linears = [layer.lora_B[name] for layer in self.layers.values()]
        for lin in linears:
            Q, _ = torch.linalg.qr(lin.weight.detach().float())
            parametrize.register_parametrization(lin, "weight", _InSpan(Q.to(lin.weight.dtype)), unsafe=True)
        try:
            yield
        finally:
            for lin in linears:
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)

    @torch.no_grad()
    def read_adapters(self) -> dict[str, Adapter]:
        """The active adapter's (B, A, s) as float32 CPU copies (what the core aggregates)."""
        name = adapter_name(self.active_rank)
        return {
            mod: Adapter(_cpu32(layer.lora_B[name].weight), _cpu32(layer.lora_A[name].weight), float(layer.scaling[name])) for mod, layer in self.layers.items()
        }

    # ------------------------------------------------------------------- heads
    def read_dense(self) -> dict[str, Tensor]:
        return {n: _cpu32(p) for n, p in self.head.items()}

    @torch.no_grad()
    def load_dense(self, dense: Mapping[str, Tensor]) -> None:
        for n, p in self.head.items():
            p.copy_(dense[n])

    # ------------------------------------------------------------- base weights
    def base_weight(self, module: str) -> Tensor:
        return self.layers[module].get_base_layer().weight

    def fold(self, deltas: Mapping[str, Factored]) -> None:
        """W0 += Δ for every module, for good (the round's broadcast base delta), where
        ``model.base_delta`` keeps it: in W0 or beside it."""
        self.deltas.fold(deltas)

    def folded(self, deltas: Mapping[str, Factored]) -> contextlib.AbstractContextManager:
        """W0 + Δ inside the block only, as frozen factors beside W0: nothing is copied or written."""
        return self.deltas.added(deltas)

    @contextmanager
    def global_view(self, delta: Mapping[str, Factored], dense: Mapping[str, Tensor]) -> Iterator[nn.Module]:
        """The global model W0 + G with heads θ, adapters disabled (for evaluation)."""
        if dense:
            self.load_dense(dense)
        with self.peft.disable_adapter(), self.folded(delta):
            yield self.peft

    def base_state(self) -> dict[str, Tensor]:
        """What the base deltas changed (full-precision W0 of the adapted modules, side
        factors), as CPU tensors, for checkpoints and a node's pristine copy."""
        return self.deltas.state()

    def load_base_state(self, state: Mapping[str, Tensor]) -> None:
        self.deltas.load_state(state)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.peft.parameters() if p.requires_grad]


class _InSpan(nn.Module):
    """B = Q·R for a fixed Q with orthonormal columns; R = Qᵀ·B initialises the parameter."""

    def __init__(self, Q: Tensor):
        super().__init__()
        self.register_buffer("Q", Q)

    def forward(self, R: Tensor) -> Tensor:
        return self.Q @ R

    def right_inverse(self, B: Tensor) -> Tensor:
        return self.Q.T @ B


def _cpu32(t: Tensor) -> Tensor:
    """A float32 CPU copy, whatever the tensor's device and dtype."""
    return t.detach().to("cpu", torch.float32, copy=True)


def _in_modules(param: str, modules: Iterable[str]) -> bool:
    """Whether parameter ``param`` belongs to one of ``modules`` (a top-level name such as
    ``classifier``, or a module path such as ``pooler.dense``)."""
    return any(param == m or param.startswith(m + ".") for m in modules)
