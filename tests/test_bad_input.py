"""Bad input is refused with an error naming the client and module; the state stays bit-for-bit unchanged."""

from __future__ import annotations

import math
import re

import pytest
import torch
from helpers import MIXED_SHAPES, SHAPES, assert_unchanged, client_round, make, run_round, snapshot

from fedlora.core import Adapter, AggregationError, ClientUpdate, LoraSpec, UpdateError, available_methods, get_aggregator

ALL = ["fedex", "fedhl", "fedit", "fedsa", "fedsb", "fedsvd", "ffa", "flexlora", "flora", "fra", "hetlora", "hexa", "rolora"]
SAME_RANK = ["fedit", "fedex", "ffa", "fra", "fedsvd", "rolora", "fedsa", "fedsb"]
MIXED = ["flora", "flexlora", "hetlora", "fedhl", "hexa"]
NS = [3, 4, 5]


def setup(name, **opts):
    """A state after one round (non-trivial extras/base deltas) and valid updates for the next."""
    dense = {"head": torch.randn(3, 4)}
    agg, state = make(name, SHAPES, rank=4, dense=dense, **opts)
    starts, ups = client_round(agg, state, [None] * 3, NS, seed=0)
    ups = [ClientUpdate(u.client_id, u.num_examples, u.adapters, dense={"head": torch.randn(3, 4)}) for u in ups]
    state = agg.aggregate(state, ups)
    starts, ups = client_round(agg, state, [None] * 3, NS, seed=1)
    ups = [ClientUpdate(u.client_id, u.num_examples, u.adapters, dense={"head": torch.randn(3, 4)}) for u in ups]
    return agg, state, ups


def with_module(u: ClientUpdate, module: str, adapter: Adapter | None, **changes) -> ClientUpdate:
    ad = dict(u.adapters)
    if adapter is None:
        del ad[module]
    else:
        ad[module] = adapter
    kw = dict(client_id=u.client_id, num_examples=u.num_examples, adapters=ad, dense=u.dense, label_counts=u.label_counts)
    kw.update(changes)
    return ClientUpdate(**kw)


def refused(agg, state, updates, client, module, exc=UpdateError, words=()):
    snap = snapshot(state)
    with pytest.raises(exc) as e:
        agg.aggregate(state, updates)
    msg = str(e.value)
    if client is not None:
        assert f"'{client}'" in msg, msg
        if isinstance(e.value, UpdateError):
            assert e.value.client == client
    if module is not None:
        assert f"'{module}'" in msg, msg
        assert e.value.module == module
    for w in words:
        assert w.lower() in msg.lower(), msg
    assert_unchanged(state, snap)
    return e.value


def bad_variants(a: Adapter, spec: LoraSpec):
    """(label, bad adapter, words the message must contain) for a valid adapter a of module 'v' (16×16)."""
    r = a.rank
    nan_B = a.B.clone()
    nan_B[1, 0] = float("nan")
    inf_B = a.B.clone()
    inf_B[0, 1] = float("inf")
    nan_A = a.A.clone()
    nan_A[0, 3] = float("nan")
    inf_A = a.A.clone()
    inf_A[2, 2] = -float("inf")
    return [
        ("B rows", Adapter(torch.randn(17, r), a.A, a.scale), ["shape"]),
        ("A cols", Adapter(a.B, torch.randn(r, 15), a.scale), ["shape"]),
        ("A cols+", Adapter(a.B, torch.randn(r, 17), a.scale), ["shape"]),
        ("B 1-D", Adapter(a.B[:, 0], a.A, a.scale), ["matri"]),
        ("B/A rank", Adapter(a.B, a.A[: r - 1], a.scale), ["rank"]),
        ("NaN in B", Adapter(nan_B, a.A, a.scale), ["nan"]),
        ("Inf in B", Adapter(inf_B, a.A, a.scale), ["inf"]),
        ("NaN in A", Adapter(a.B, nan_A, a.scale), ["nan"]),
        ("Inf in A", Adapter(a.B, inf_A, a.scale), ["inf"]),
        ("scale x2", Adapter(a.B, a.A, 2 * a.scale), ["scaling"]),
        ("scale other rank", Adapter(a.B, a.A, spec.alpha / (r + 1)), ["scaling"]),
        ("scale nan", Adapter(a.B, a.A, float("nan")), ["scaling"]),
        ("scale negative", Adapter(a.B, a.A, -a.scale), ["scaling"]),
        ("int dtype", Adapter(a.B.round().to(torch.int64), a.A, a.scale), ["dtype"]),
        ("rank 0", Adapter(torch.zeros(16, 0), torch.zeros(0, 16), a.scale), ["rank"]),
    ]


@pytest.mark.parametrize("name", ALL)
def test_malformed_adapter_refused(name):
    agg, state, ups = setup(name)
    for label, bad, words in bad_variants(ups[1].adapters["v"], state.lora):
        try:
            refused(agg, state, [ups[0], with_module(ups[1], "v", bad), ups[2]], "c1", "v", words=words)
        except BaseException as e:  # name the variant that slipped through
            raise AssertionError(f"{name}, variant {label!r}: {e}") from e


@pytest.mark.parametrize("name", ALL)
def test_missing_and_unknown_module(name):
    agg, state, ups = setup(name)
    refused(agg, state, [ups[0], ups[1], with_module(ups[2], "v", None)], "c2", "v", words=["missing"])
    extra = with_module(ups[2], "k_proj", ups[2].adapters["v"])
    refused(agg, state, [ups[0], ups[1], extra], "c2", "k_proj", words=["not adapted"])


@pytest.mark.parametrize("name", SAME_RANK)
def test_rank_differing_from_global_refused(name):
    agg, state, ups = setup(name)
    a = ups[0].adapters["q"]
    for r in (a.rank - 1, a.rank + 1):
        g = torch.Generator().manual_seed(r)
        lower = Adapter(torch.randn(12, r, generator=g), torch.randn(r, 10, generator=g), state.lora.scale(r))
        refused(agg, state, [with_module(ups[0], "q", lower), ups[1], ups[2]], "c0", "q", words=["rank"])
    with pytest.raises(AggregationError):
        agg.client_start(state, state.rank - 1)


@pytest.mark.parametrize("name", [m for m in MIXED if m != "flora"])
def test_rank_above_global_refused(name):
    agg, state = make(name, MIXED_SHAPES, rank=8)
    _, ups = client_round(agg, state, [2, 4, 8], NS, seed=0)
    r = 12
    g = torch.Generator().manual_seed(0)
    big = Adapter(torch.randn(24, r, generator=g), torch.randn(r, 20, generator=g), state.lora.scale(r))
    refused(agg, state, [ups[0], with_module(ups[1], "q", big), ups[2]], "c1", "q", words=["rank"])


def test_flora_accepts_any_client_rank():
    agg, state = make("flora", MIXED_SHAPES, rank=8)
    new = run_round(agg, state, [2, 12, 16], NS, seed=0).new
    assert new.round == 1


@pytest.mark.parametrize("name", ALL)
def test_num_examples_and_ids(name):
    agg, state, ups = setup(name)
    neg = ClientUpdate("c1", -1, ups[1].adapters, dense=ups[1].dense)
    refused(agg, state, [ups[0], neg, ups[2]], "c1", None, words=["num_examples"])
    flt = ClientUpdate("c1", 2.5, ups[1].adapters, dense=ups[1].dense)
    refused(agg, state, [ups[0], flt, ups[2]], "c1", None, words=["num_examples"])
    boolean = ClientUpdate("c1", True, ups[1].adapters, dense=ups[1].dense)
    refused(agg, state, [ups[0], boolean, ups[2]], "c1", None, words=["num_examples"])
    dup = ClientUpdate("c0", 7, ups[1].adapters, dense=ups[1].dense)
    refused(agg, state, [ups[0], dup, ups[2]], "c0", None, words=["more than one"])
    zero = ClientUpdate("c2", 0, ups[2].adapters, dense=ups[2].dense)  # a share under any weighting, with nothing trained
    refused(agg, state, [ups[0], ups[1], zero], "c2", None, words=["num_examples", "trained on something"])
    huge = ClientUpdate("c1", 2**60, ups[1].adapters, dense=ups[1].dense)
    refused(agg, state, [ups[0], huge, ups[2]], "c1", None, words=["num_examples"])
    refused(agg, state, [], None, None, exc=AggregationError, words=["no client updates"])


@pytest.mark.parametrize("name", ["fedex", "hexa", "flexlora"])
def test_bad_dense_params_refused(name):
    agg, state, ups = setup(name)
    nan = torch.randn(3, 4)
    nan[0, 0] = float("nan")
    refused(agg, state, [ups[0], ClientUpdate("c1", 4, ups[1].adapters, dense={"head": nan}), ups[2]], "c1", "head", words=["nan"])
    refused(agg, state, [ups[0], ClientUpdate("c1", 4, ups[1].adapters, dense={"head": torch.randn(4, 3)}), ups[2]], "c1", "head", words=["shape"])
    refused(agg, state, [ups[0], ClientUpdate("c1", 4, ups[1].adapters, dense={}), ups[2]], "c1", "head")
    wide = torch.randn(3, 4, dtype=torch.float64)  # the norm check raised torch's RuntimeError on it, ending the round
    refused(agg, state, [ups[0], ClientUpdate("c1", 4, ups[1].adapters, dense={"head": wide}), ups[2]], "c1", "head", words=["dtype", "float64"])


@pytest.mark.parametrize("name", ["fedex", "fedit", "flexlora"])
def test_updates_that_are_not_detached_dense_adapters_are_refused_by_name(name):
    """A plug-in client's mistakes: raw AttributeError, NotImplementedError or an autograd error before."""
    agg, state, ups = setup(name)
    a = ups[1].adapters["q"]
    as_dict = with_module(ups[1], "q", None)
    as_dict = ClientUpdate("c1", 4, {**as_dict.adapters, "q": {"B": a.B, "A": a.A}}, dense=ups[1].dense)
    refused(agg, state, [ups[0], as_dict, ups[2]], "c1", "q", words=["dict", "Adapter"])
    sparse = with_module(ups[1], "q", Adapter(a.B.to_sparse(), a.A, a.scale))
    refused(agg, state, [ups[0], sparse, ups[2]], "c1", "q", words=["sparse"])
    grad = with_module(ups[1], "q", Adapter(a.B.clone().requires_grad_(), a.A, a.scale))
    refused(agg, state, [ups[0], grad, ups[2]], "c1", "q", words=["requires grad"])


def test_ffa_changed_A_refused():
    agg, state, ups = setup("ffa")
    a = ups[2].adapters["o"]
    moved = Adapter(a.B, a.A * 1.01, a.scale)
    refused(agg, state, [ups[0], ups[1], with_module(ups[2], "o", moved)], "c2", "o", words=["frozen"])


def test_unknown_method_and_bad_options():
    with pytest.raises(AggregationError) as e:
        get_aggregator("nope")
    assert "'nope'" in str(e.value) and "hexa" in str(e.value)
    bad = [
        ("fedit", {"bogus": 1}),
        ("fedex", {"weighting": "by_magic"}),
        ("hexa", {"restart": "nope"}),
        ("hexa", {"drift_beta": -1.0}),
        ("hexa", {"drift_beta": math.nan}),
        ("hexa", {"mixed_ranks": "pad"}),
        ("hexa", {"class_aware_head": True}),
        ("fra", {"split": "U"}),
        ("fra", {"fra_rounds": 0}),
        ("flexlora", {"split": "U"}),
        ("fedhl", {"split": "U"}),
    ]
    for name, opts in bad:
        with pytest.raises(AggregationError) as e:
            get_aggregator(name, **opts)
        assert f"'{name}'" in str(e.value) or name in str(e.value).lower(), (name, opts, str(e.value))


@pytest.mark.parametrize("name", ALL)
def test_bad_global_rank_refused(name):
    agg = get_aggregator(name)
    with pytest.raises(AggregationError):
        agg.init_state(SHAPES, 0, LoraSpec())
    with pytest.raises(AggregationError) as e:
        agg.init_state(SHAPES, 10, LoraSpec())  # "o" is 24×9
    assert "'o'" in str(e.value)


@pytest.mark.parametrize("name", ALL)
def test_state_untouched_by_successful_round(name):
    agg, state, ups = setup(name)
    snap = snapshot(state)
    agg.aggregate(state, ups)
    assert_unchanged(state, snap)


# ------------------------------------------------------------ diverged and hostile updates
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("case", ["entries-1e20", "one-entry-3e38", "head-1e30"])
def test_finite_but_diverged_updates_are_refused_by_name(name, case):
    """Finite entries whose products or Gram matrices overflow float32: refused with the client
    named, before any arithmetic (they used to give Inf in the global model or a raw
    linear-algebra error naming nobody)."""
    agg, state, ups = setup(name)
    module = next(iter(ups[1].adapters))
    a = ups[1].adapters[module]
    if case == "entries-1e20":
        bad = with_module(ups[1], module, Adapter(torch.full_like(a.B, 1e20), a.A, a.scale))
        words = ["B has norm", "diverged"]
    elif case == "one-entry-3e38":
        B = a.B.clone()
        B[0, 0] = 3e38
        bad = with_module(ups[1], module, Adapter(B, a.A, a.scale))
        words = ["diverged"]
    else:
        bad = ClientUpdate(ups[1].client_id, ups[1].num_examples, ups[1].adapters, dense={"head": torch.full((3, 4), 1e30)})
        module, words = "head", ["dense parameter has norm"]
    refused(agg, state, [ups[0], bad, ups[2]], ups[1].client_id, module, words=words)


@pytest.mark.parametrize("failure", ["raises", "inf"])
def test_a_failure_inside_a_method_names_the_client_it_comes_from(monkeypatch, failure):
    """Whatever goes wrong inside ``_aggregate`` (a linear-algebra error, a non-finite
    result) is traced to the client whose update alone reproduces it."""
    agg, state, ups = setup("fra")
    real = type(agg)._aggregate

    def fragile(self, st, updates, p):
        out = real(self, st, updates, p)
        if any(u.client_id == "c2" for u in updates):
            if failure == "raises":
                raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
            name = next(iter(out.adapters))
            out.adapters[name] = Adapter(out.adapters[name].B * float("inf"), out.adapters[name].A, out.adapters[name].scale)
        return out

    monkeypatch.setattr(type(agg), "_aggregate", fragile)
    e = refused(agg, state, ups, "c2", None, words=["aggregating its update fails"])
    assert ("converge" if failure == "raises" else "not finite") in str(e)
    new = agg.aggregate(state, [ups[0], ups[1]])  # the others aggregate
    assert new.info["clients"] == ["c0", "c1"]


@pytest.mark.parametrize(
    "damage,words",
    [
        (lambda d: d.pop("extra"), "lacks ['extra']"),
        (lambda d: d["adapters"]["q"].__setitem__("A", d["adapters"]["q"]["A"][:3]), "do not chain"),
        (lambda d: d["adapters"]["q"]["B"].__setitem__((0, 0), float("nan")), "NaN or Inf"),
        (lambda d: d["adapters"]["q"].__setitem__("scale", 123.0), "is not the spec's"),
        (lambda d: d["adapters"]["q"].pop("__adapter__"), "not an adapter"),
    ],
    ids=["missing-key", "factors-do-not-chain", "nan", "scaling", "marker-lost"],
)
def test_a_damaged_state_dict_is_refused_by_what_is_wrong(damage, words):
    """A checkpoint's state that does not read back as a server state: a named ValueError (the engine's resume
    makes it a one-line ConfigError), where before a KeyError, an AttributeError or a silent acceptance."""
    import copy

    from fedlora.core.serialize import state_from_dict, state_to_dict

    agg, state, ups = setup("fedex")
    good = state_to_dict(agg.aggregate(state, ups))
    assert state_from_dict(copy.deepcopy(good)).round == 2
    bad = copy.deepcopy(good)
    damage(bad)
    with pytest.raises(ValueError, match=re.escape(words)):
        state_from_dict(bad)
