"""Property-based tests (hypothesis): configs, data files and client updates built from random
pieces are either accepted or refused with fedlora's own error, never another exception, and a
refused aggregation leaves the server state bit-for-bit unchanged."""

from __future__ import annotations

import string

import pytest
import torch
from helpers import SHAPES, assert_unchanged, make, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.config import ConfigError, load_config
from fedlora.core import Adapter, AggregationError, ClientUpdate
from fedlora.data.errors import DataError
from fedlora.data.files import load_text_file
from fedlora.data.glue import load_glue
from fedlora.data.instruct import load_instruct_file

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

KEYS = [
    "model.rank", "model.alpha", "model.client_ranks", "model.max_length", "model.quantization", "model.base_delta", "data.task", "data.source",
    "data.max_train_examples", "data.eval_split", "data.holdout_examples", "partition.scheme", "partition.num_clients", "partition.alpha",
    "train.lr", "train.head_lr", "train.epochs", "train.batch_size", "train.device", "train.precision", "fed.method", "fed.options", "fed.weighting",
    "fed.rounds", "fed.fraction", "fed.max_update_ratio", "privacy.mode", "privacy.clip", "privacy.noise_multiplier", "privacy.target_epsilon",
    "privacy.delta", "privacy.accountant", "seed", "threads", "nosuch.key", "train", "model.rank.deeper", "",
]  # fmt: skip
VALUES = st.one_of(
    st.integers(-5, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "no", "[4,8]", "[", "{a: 1}", "{drift_beta: 0}", "hexa", "fedex", "none", "4bit", "cuda", "bf16", "holdout", "", "~", "null"]),
    st.text(string.printable, max_size=12),
)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=6))
def test_any_overrides_give_a_config_or_a_config_error(pairs):
    try:
        cfg = load_config(None, [f"{k}={v}" for k, v in pairs])
    except ConfigError:
        return
    assert cfg.model.rank >= 1 and cfg.fed.rounds >= 1 and 0 < cfg.fed.fraction <= 1


@FUZZ
@given(st.lists(st.text(max_size=40), max_size=6))
def test_any_override_strings_give_a_config_or_a_config_error(items):
    try:
        load_config(None, items)
    except ConfigError:
        pass


LINES = st.one_of(
    st.text(max_size=60),
    st.sampled_from(['{"text": "good", "label": "pos"}', '{"text": 1, "label": null}', "[1, 2]", "{", '"just a string"', "text,label", "a,b,c", ""]),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
)


@FUZZ
@given(st.lists(LINES, max_size=8), st.sampled_from([".csv", ".jsonl"]), st.booleans())
def test_any_data_file_is_read_or_refused_with_a_data_error(tmp_path_factory, lines, suffix, invalid_utf8):
    path = tmp_path_factory.mktemp("fuzz") / f"data{suffix}"
    raw = "\n".join(lines).encode("utf-8", "surrogatepass") if not invalid_utf8 else b"\xff\xfe" + "\n".join(lines).encode("utf-8", "replace")
    path.write_bytes(raw)
    try:
        ds = load_text_file(path, "text", "label")
        assert len(ds) >= 1
    except DataError:
        pass
    try:
        load_instruct_file(path)
    except DataError:
        pass


@FUZZ
@given(st.lists(LINES, max_size=8))
def test_any_glue_tsv_is_read_or_refused_with_a_data_error(tmp_path_factory, lines):
    root = tmp_path_factory.mktemp("glue")
    (root / "SST-2").mkdir()
    (root / "SST-2" / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(lines), errors="surrogatepass")
    try:
        load_glue("sst2", "train", data_dir=root)
    except DataError:
        pass


FACTORS = st.one_of(
    st.floats(-1e3, 1e3, allow_nan=False),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e20, 3e38, 0.0, -0.0, 1e-45]),
)


@FUZZ
@given(
    st.sampled_from(["fedex", "fedit", "ffa", "fedsvd", "fra", "flora", "flexlora", "hetlora", "fedhl", "hexa"]),
    st.lists(st.tuples(st.integers(-2, 10**6), st.integers(0, 6), FACTORS, st.sampled_from(["float32", "float64", "float16"])), min_size=1, max_size=4),
)
def test_any_client_updates_aggregate_or_are_refused_leaving_the_state_unchanged(name, clients):
    agg, state = make(name, SHAPES, rank=4)
    snap = snapshot(state)
    updates = []
    for i, (n, rank, value, dtype) in enumerate(clients):
        adapters = {}
        for module, (m, k) in SHAPES.items():
            B = torch.full((m, rank), value).to(getattr(torch, dtype))  # float16 overflows to Inf, as a client's cast would
            A = torch.randn(rank, k, generator=torch.Generator().manual_seed(i)).to(getattr(torch, dtype))
            adapters[module] = Adapter(B, A, state.adapters[module].scale if rank == 4 else 2.0)
        updates.append(ClientUpdate(f"c{i % 3}", n, adapters))
    try:
        new = agg.aggregate(state, updates)
    except AggregationError:
        assert_unchanged(state, snap)
        return
    for a in new.adapters.values():
        assert torch.isfinite(a.B).all() and torch.isfinite(a.A).all()
    assert_unchanged(state, snap)


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, b"PK\x03\x04 truncated", b"not torch at all"])
def test_a_damaged_checkpoint_file_is_a_config_error(tmp_path, content):
    from fedlora.engine.checkpoint import load_checkpoint

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_checkpoint(path)
