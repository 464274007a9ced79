"""`fedlora merge`: a finished run's global model as one folder that transformers loads alone. Reference:
the same run's exported adapter applied by peft without merging (the path `evaluate_export` takes)."""

from __future__ import annotations

import pytest
import torch
from engine_support import overrides, tiny_models  # noqa: F401  (fixture)

from fedlora import cli


@pytest.mark.parametrize("task,method", [("sst2", "fedex"), ("stsb", "hexa")])
def test_merged_folder_computes_what_base_plus_adapter_computes(tiny_models, tmp_path, capsys, task, method):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedlora.models.hub import load_base

    over = overrides(tiny_models["bert"], tmp_path, fed__method=method, data__task=task, train__lr=5e-3, name="r")
    assert cli.main(["run", *over]) == 0
    run = tmp_path / "r"
    out = tmp_path / "merged"
    assert cli.main(["merge", str(run), str(out)]) == 0
    assert f"merged model written to {out}" in capsys.readouterr().out
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()  # transformers alone
    regression = task == "stsb"
    assert merged.config.num_labels == (1 if regression else 2)
    reference = PeftModel.from_pretrained(load_base(str(tiny_models["bert"]), 1 if regression else 2, regression, False), str(run / "adapter")).eval()
    ids = torch.randint(5, 40, (6, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        got = merged(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    base = load_base(str(tiny_models["bert"]), 1 if regression else 2, regression, False).eval()
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, got, atol=1e-3)  # the update is there: the test can fail


def test_merge_refuses_a_folder_it_would_overwrite_or_that_is_no_run(tiny_models, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert cli.main(["merge", str(tmp_path), str(tmp_path / "new")]) == 2
    assert "is not a finished run folder" in capsys.readouterr().err
    assert cli.main(["run", *overrides(tiny_models["bert"], tmp_path, fed__rounds=1, name="r")]) == 0
    assert cli.main(["merge", str(tmp_path / "r"), str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert "taken exists" in err and not any((tmp_path / "taken").iterdir())
