"""``model.pair_encoder: siamese``: sentence pairs read by a bi-encoder (models/siamese.py).

References are independent of the module (reference.pair_cosines): each sentence tokenized on its own
by the tokenizer, run alone through the plain transformers encoder, mean-pooled and compared in
float64 by hand.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from engine_support import GLUE, overrides, tiny_models  # noqa: F401  (fixture)
from reference import pair_cosines

from fedlora import cli
from fedlora.models import as_siamese, tiny_model
from fedlora.models.siamese import SIAMESE_HEAD, split_pair

FIRST = ["the movie was good", "bad plot", "it is not very fun and the story was dull"]
SECOND = ["it is great fun", "the actors were awful and the story was dull", "a film"]


def test_split_pair_gives_each_sentence_as_the_tokenizer_encodes_it_alone():
    _, tok = tiny_model("bert")
    enc = tok(FIRST, SECOND, padding=True, return_tensors="pt")
    ids_a, mask_a, ids_b, mask_b = split_pair(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], tok.cls_token_id, tok.pad_token_id)
    alone_a = tok(FIRST, padding=True, return_tensors="pt")
    alone_b = tok(SECOND, padding=True, return_tensors="pt")
    assert torch.equal(ids_a, alone_a["input_ids"]) and torch.equal(mask_a, alone_a["attention_mask"])
    assert torch.equal(ids_b, alone_b["input_ids"]) and torch.equal(mask_b, alone_b["attention_mask"])


def test_logits_and_gradients_equal_an_encoder_run_on_each_sentence_alone():
    model, tok = tiny_model("bert")
    siamese = as_siamese(model, tok).eval()
    with torch.no_grad():
        siamese.classifier.weight.copy_(torch.tensor([[-2.0], [3.0]]))
        siamese.classifier.bias.copy_(torch.tensor([0.5, -0.25]))
    enc = tok(FIRST, SECOND, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = siamese(**enc).logits.double().numpy()
    cos = pair_cosines(model.bert, tok, FIRST, SECOND).numpy()
    want = cos[:, None] * np.array([-2.0, 3.0]) + np.array([0.5, -0.25])
    np.testing.assert_allclose(logits, want, atol=1e-5)

    # The loss's gradient through the split batch equals the gradient through the sentences alone.
    labels = torch.tensor([0, 1, 1])
    weight = model.bert.encoder.layer[0].attention.self.query.weight
    siamese.zero_grad()
    siamese(**enc, labels=labels).loss.backward()
    got = weight.grad.clone()
    siamese.zero_grad()
    cosines = []
    for a, b in zip(FIRST, SECOND):
        u = model.bert(**tok(a, return_tensors="pt")).last_hidden_state[0].mean(0)
        v = model.bert(**tok(b, return_tensors="pt")).last_hidden_state[0].mean(0)
        cosines.append(torch.nn.functional.cosine_similarity(u, v, dim=0))
    ref_logits = torch.stack(cosines)[:, None] * siamese.classifier.weight[:, 0] + siamese.classifier.bias
    torch.nn.functional.cross_entropy(ref_logits, labels).backward()
    assert got.abs().max() > 0
    torch.testing.assert_close(got, weight.grad, atol=1e-6, rtol=1e-4)


def test_a_bi_encoder_run_trains_exports_and_merges(tiny_models, tmp_path, capsys):
    """RTE through the CLI: the run's exported adapter reloads (as `evaluate_export` and a user load
    it) and `fedlora merge` writes an encoder + head whose predictions, computed by hand, give the
    run's final dev accuracy."""
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    from fedlora.data.glue import load_glue
    from fedlora.models.hub import load_base

    over = overrides(
        tiny_models["bert"],
        tmp_path,
        data__task="rte",
        model__pair_encoder="siamese",
        model__target_modules="[query,value,dense]",
        fed__method="fedex",
        train__lr=1e-2,
        name="r",
    )
    assert cli.main(["run", *over]) == 0
    run = tmp_path / "r"
    from safetensors.torch import load_file

    sent = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert any(".output.dense." in k for k in sent)  # "dense" adapted the encoder's layers (fedex: some sent whole) …
    assert not [k for k in sent if "pooler" in k]  # … but not the pooler mean pooling never reads
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["accuracy"] >= 0
    reloaded = PeftModel.from_pretrained(load_base(str(tiny_models["bert"]), 2, False, False, "siamese"), str(run / "adapter")).eval()
    head = reloaded.base_model.model.classifier.modules_to_save["default"]
    assert head.weight.abs().max() > 0  # the zero-initialised head trained and travelled

    out = tmp_path / "merged"
    assert cli.main(["merge", str(run), str(out)]) == 0
    encoder, loading = AutoModel.from_pretrained(out, output_loading_info=True)  # transformers alone
    encoder = encoder.eval()
    assert not loading["missing_keys"] and not loading["unexpected_keys"]  # a whole BertModel, pooler included
    tok = AutoTokenizer.from_pretrained(out)
    cosine_head = json.loads((out / SIAMESE_HEAD).read_text())
    dev = load_glue("rte", "dev", data_dir=GLUE, max_examples=40, seed=0)  # the run's evaluation subset (overrides' data.max_eval_examples)
    dev_first, dev_second, labels = dev.text_a, dev.text_b, np.asarray(dev.labels)
    cos = pair_cosines(encoder, tok, dev_first, dev_second, max_length=64).numpy()  # overrides' model.max_length
    logits = cos[:, None] * np.array(cosine_head["weight"]) + np.array(cosine_head["bias"])
    batch = tok(list(dev_first), list(dev_second), truncation=True, max_length=64, padding=True, return_tensors="pt")
    with torch.no_grad():
        exported = reloaded(**batch).logits.double().numpy()  # the unmerged export, as peft applies it
    np.testing.assert_allclose(logits, exported, atol=1e-5)
    assert np.ptp(logits[:, 1] - logits[:, 0]) > 0  # the predictions depend on the pair
    accuracy = float((logits.argmax(1) == labels).mean())
    assert accuracy == pytest.approx(summary["final"]["accuracy"])
    # and the merged encoder is not the pretrained one: the adapters' update is in it (the test can fail)
    pretrained = AutoModel.from_pretrained(tiny_models["bert"]).eval()
    torch.testing.assert_close(encoder.pooler.dense.weight, pretrained.pooler.dense.weight, rtol=0, atol=0)  # the pretrained pooler
    ids = tok(dev_first[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert not torch.allclose(encoder(**ids).last_hidden_state, pretrained(**ids).last_hidden_state, atol=1e-4)


@pytest.mark.parametrize(
    "setting,message",
    [
        ({"data__task": "sst2"}, "needs sentence pairs"),
        ({"data__task": "rte", "model__name": "GPT2"}, "needs an encoder model"),
        ({"data__task": "rte", "model__pair_encoder": "both"}, "model.pair_encoder must be cross or siamese"),
        ({"data__task": "rte", "model__name": "ROBERTA"}, "needs a tokenizer that marks the second sentence"),
    ],
)
def test_settings_a_bi_encoder_cannot_take_are_refused_in_one_line(tiny_models, tmp_path, capsys, setting, message):
    kw = {"model__pair_encoder": "siamese", **setting}
    if kw.get("model__name") == "GPT2":  # a decoder read as a classifier: no encoder to read pairs apart
        kw["model__name"] = tiny_models["gpt2"]
    if kw.get("model__name") == "ROBERTA":  # an encoder whose tokenizer gives no token types, as RoBERTa's
        model, tok = tiny_model("bert")
        folder = tmp_path.parent / f"{tmp_path.name}-no-token-types"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_input_names": ["input_ids", "attention_mask"]}))
        kw["model__name"] = folder
        capsys.readouterr()  # transformers' saving bar, not the run's output
    assert cli.main(["run", *overrides(tiny_models["bert"], tmp_path, **kw)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())


def test_opacus_per_example_gradients_through_the_two_encoder_calls():
    """DP-SGD's premise with a bi-encoder: every example's gradient sums its two encoder calls (the
    LoRA layers run twice a batch). Reference: each pair alone, tokenized alone, through the model and
    torch.autograd.grad; no Opacus involved (as tests/test_privacy.py does for Opacus #820)."""
    from opacus import GradSampleModule

    from fedlora.models import FedModel, LoraSettings

    model, tok = tiny_model("bert", seed=1)
    fm = FedModel(as_siamese(model, tok), LoraSettings(("query", "value"), rank=4))
    for m in fm.peft.modules():  # Opacus records activations in training mode only: dropout off instead of eval()
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    fm.peft.train()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # B = 0 and a zero head would make the adapters' gradients zero
        for layer in fm.layers.values():
            layer.lora_B["r4"].weight.normal_(0, 0.1, generator=g)
        fm.base.classifier.weight.copy_(torch.tensor([[-2.0], [3.0]]))
    labels = torch.tensor([0, 1, 1])
    params = [(n, p) for n, p in fm.peft.named_parameters() if p.requires_grad]
    rows = []
    for a, b, y in zip(FIRST, SECOND, labels):
        loss = fm.peft(**tok(a, b, return_tensors="pt"), labels=y[None]).loss
        rows.append(torch.autograd.grad(loss, [p for _, p in params]))
    want = {n: torch.stack([r[i] for r in rows]) for i, (n, _) in enumerate(params)}
    gsm = GradSampleModule(fm.peft, batch_first=True, loss_reduction="mean", strict=False)
    try:
        gsm(**tok(FIRST, SECOND, padding=True, return_tensors="pt"), labels=labels).loss.backward()
        got = {n: p.grad_sample for n, p in params}
    finally:
        gsm._close()
    assert any("lora_A" in n for n in got) and any("classifier" in n for n in got)
    for n, _ in params:
        assert float(want[n].abs().max()) > 0, n
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-4, msg=n)


def test_a_bi_encoder_trains_under_local_dp_sgd(tiny_models, tmp_path):
    """privacy.mode=local through the CLI: the accountant's ε each round, and the model moves."""
    from test_privacy import LOCAL

    over = overrides(tiny_models["bert"], tmp_path, data__task="rte", model__pair_encoder="siamese", fed__rounds=2, name="dp", **LOCAL)
    assert cli.main(["run", *over]) == 0
    rows = [json.loads(x) for x in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["epsilon"] > rows[0]["epsilon"] > 0
    ckpt = torch.load(tmp_path / "dp" / "checkpoint.pt", weights_only=False)
    assert float(ckpt["state"]["dense"]["classifier.weight"].abs().max()) > 0  # the zero-initialised head trained
