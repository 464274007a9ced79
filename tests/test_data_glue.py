"""load_glue: the real local GLUE copy, hand-made fixtures for the missing tasks, errors, hub."""

import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedlora.data import DataError, get_task, load_glue

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "glue"
# The shared data folder sits beside the repository (CI: a clean clone with shared/ beside it).
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
needs_shared = pytest.mark.skipif(not (SHARED / "SOURCES.md").is_file(), reason=f"local GLUE copy not found at {SHARED}")


def counts(ds):
    return dict(Counter(ds.labels.tolist()))


# ---------------------------------------------------------------- real local copy (SOURCES.md)


@needs_shared
@pytest.mark.parametrize(
    "task, split, rows, label_counts",
    [
        ("SST-2", "train", 67349, {0: 29780, 1: 37569}),
        ("SST-2", "dev", 872, {0: 428, 1: 444}),
        ("RTE", "train", 2490, {0: 1249, 1: 1241}),  # entailment, not_entailment
        ("RTE", "dev", 277, {0: 146, 1: 131}),
        ("QNLI", "dev", 5463, {0: 2702, 1: 2761}),
        ("WNLI", "train", 635, {0: 323, 1: 312}),
        ("WNLI", "dev", 71, {0: 40, 1: 31}),
    ],
)
def test_local_copy_counts(task, split, rows, label_counts):
    ds = load_glue(task, split, data_dir=SHARED)
    assert len(ds) == rows and counts(ds) == label_counts
    assert ds.labels.dtype == np.int64 and ds.label_names == list(get_task(task).label_names)
    assert (ds.text_b is None) == (task == "SST-2")
    assert all(t.strip() for t in ds.text_a)


@needs_shared
@pytest.mark.parametrize("split, rows, mean", [("train", 5749, 2.701), ("dev", 1500, 2.364)])
def test_local_stsb(split, rows, mean):
    ds = load_glue("STS-B", split, data_dir=SHARED)
    assert len(ds) == rows and ds.labels.dtype == np.float32
    assert ds.labels.mean() == pytest.approx(mean, abs=5e-4)
    assert ds.labels.min() == 0.0 and ds.labels.max() == 5.0
    assert ds.num_classes is None and ds.label_names is None
    first = {"train": "A plane is taking off.", "dev": "A man with a hard hat is dancing."}
    assert ds.text_a[0] == first[split]


@needs_shared
def test_local_first_rows_and_quotes():
    rte = load_glue("rte", "dev", data_dir=SHARED)
    assert rte.text_b[0] == "Christopher Reeve had an accident." and rte.labels[0] == 1
    sst = load_glue("sst2", "dev", data_dir=SHARED)
    assert sst.text_a[0] == "it 's a charming and often affecting journey . " and sst.labels[0] == 1
    # no quote processing: 90 QNLI dev rows hold an odd number of '"'; all kept verbatim
    qnli = load_glue("qnli", "dev", data_dir=SHARED)
    odd = sum((a + b).count('"') % 2 for a, b in zip(qnli.text_a, qnli.text_b))
    assert len(qnli) == 5463 and odd == 90


@needs_shared
def test_missing_task_file_in_local_copy():
    with pytest.raises(DataError, match=r"not found: .*QNLI[/\\]train\.tsv"):
        load_glue("qnli", "train", data_dir=SHARED)


# ---------------------------------------------------------------- fixtures (official layouts)


@pytest.mark.parametrize(
    "task, split, rows, label_counts, pair",
    [
        ("cola", "train", 6, {1: 4, 0: 2}, False),
        ("cola", "dev", 3, {1: 2, 0: 1}, False),
        ("mrpc", "train", 5, {1: 3, 0: 2}, True),
        ("mrpc", "dev", 2, {1: 1, 0: 1}, True),
        ("qqp", "train", 5, {0: 3, 1: 2}, True),
        ("qqp", "dev", 3, {0: 2, 1: 1}, True),
        ("mnli", "train", 9, {0: 5, 1: 3, 2: 1}, True),
        ("mnli", "dev", 4, {0: 1, 1: 1, 2: 2}, True),
        ("mnli-mm", "train", 9, {0: 5, 1: 3, 2: 1}, True),
        ("mnli-mm", "dev", 5, {0: 1, 1: 1, 2: 3}, True),
        ("qnli", "train", 4, {0: 2, 1: 2}, True),
    ],
)
def test_fixture_layouts(task, split, rows, label_counts, pair):
    ds = load_glue(task, split, data_dir=FIXTURES)
    assert len(ds) == rows and counts(ds) == label_counts and (ds.text_b is not None) == pair


def test_fixture_texts():
    cola = load_glue("CoLA", "train", data_dir=FIXTURES)  # header-less; column 3 is the text
    assert cola.text_a[2] == "They drank the pub." and cola.labels[2] == 0
    assert cola.text_a[5] == 'John said "hello'  # unbalanced quote kept verbatim
    mrpc = load_glue("MRPC", "train", data_dir=FIXTURES)  # header with a BOM
    assert mrpc.text_a[0].startswith("Amrozi accused his brother") and mrpc.labels[0] == 1
    assert load_glue("MRPC", "dev", data_dir=FIXTURES).text_b[0].startswith('" The foodservice')
    qqp = load_glue("QQP", "train", data_dir=FIXTURES)
    assert qqp.text_b[1] == "How do you control your horniness?" and qqp.labels[1] == 1
    mnli = load_glue("MNLI-m", "dev", data_dir=FIXTURES)
    assert mnli.text_a[0] == "The new rights are nice enough"
    assert mnli.text_b[0] == "Everyone really likes the newest benefits "
    assert load_glue("mnli-mm", "dev", data_dir=FIXTURES).text_a[0].startswith("Your contribution")
    qnli = load_glue("qnli", "train", data_dir=FIXTURES)
    assert qnli.text_a[0] == "When did the third Digimon series begin?" and qnli.labels[0] == 1


def test_max_examples_seeded_subset():
    full = load_glue("mnli", "train", data_dir=FIXTURES)
    a = load_glue("mnli", "train", data_dir=FIXTURES, max_examples=4, seed=3)
    b = load_glue("mnli", "train", data_dir=FIXTURES, max_examples=4, seed=3)
    assert len(a) == 4 and a.text_a == b.text_a and a.text_a == sorted(a.text_a, key=full.text_a.index)
    assert set(a.text_a) <= set(full.text_a)
    others = {tuple(load_glue("mnli", "train", data_dir=FIXTURES, max_examples=4, seed=s).text_a) for s in range(6)}
    assert len(others) > 1
    assert len(load_glue("mnli", "train", data_dir=FIXTURES, max_examples=100)) == 9
    with pytest.raises(DataError, match="max_examples"):
        load_glue("mnli", "train", data_dir=FIXTURES, max_examples=0)


# ---------------------------------------------------------------- errors


def copy_task(tmp_path, task_dir, name="train.tsv"):
    (tmp_path / task_dir).mkdir()
    src = (FIXTURES / task_dir / name).read_text(encoding="utf-8")
    return tmp_path / task_dir / name, src


def test_missing_file_names_path(tmp_path):
    with pytest.raises(DataError, match=r"not found: .*RTE[/\\]dev\.tsv"):
        load_glue("rte", "dev", data_dir=tmp_path)


@pytest.mark.parametrize(
    "task_dir, task, mutate, line, message",
    [
        ("MNLI", "mnli", lambda s: s.replace("\tcontradiction\n", "\tmaybe\n"), 10, "unknown label 'maybe'"),
        ("QQP", "qqp", lambda s: s.replace("\t1\n", "\tyes\n", 1), 3, "label 'yes' is not an integer"),
        ("QQP", "qqp", lambda s: s.replace("\t1\n", "\t7\n", 1), 3, "label 7 out of range"),
        ("MRPC", "mrpc", lambda s: s.replace("\t2108831\t", "\t", 1), 3, "expected 5 .*columns, found 4"),
        ("CoLA", "cola", lambda s: s.replace("They drank the pub.", " "), 3, "empty text"),
        ("QNLI", "qnli", lambda s: s.replace("\n1\t", "\n1\t\t", 1), 3, "expected 4 .*columns, found 5"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, task_dir, task, mutate, line, message):
    path, text = copy_task(tmp_path, task_dir)
    path.write_text(mutate(text), encoding="utf-8")
    with pytest.raises(DataError, match=rf"train\.tsv:{line}: {message}.*; fix or delete that row \(from Python, load_glue\(\.\.\., strict=False\)"):
        load_glue(task, "train", data_dir=tmp_path)
    with pytest.warns(UserWarning, match="skipped 1 malformed row"):
        ds = load_glue(task, "train", data_dir=tmp_path, strict=False)
    assert len(ds) == len(load_glue(task, "train", data_dir=FIXTURES)) - 1


def test_bad_stsb_score(tmp_path):
    (tmp_path / "STS-B").mkdir()
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    row = "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane.\tAn air plane.\t{}\n"
    (tmp_path / "STS-B" / "train.tsv").write_text(header + row.format("5.000") + row.format("high"))
    with pytest.raises(DataError, match=r"train\.tsv:3: label 'high' is not a number"):
        load_glue("stsb", "train", data_dir=tmp_path)


def test_header_without_expected_columns(tmp_path):
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "train.tsv").write_text("id\ttext\tlabel\n0\ta\tentailment\n")
    with pytest.raises(DataError, match=r"train\.tsv:1: header .* lacks"):
        load_glue("rte", "train", data_dir=tmp_path)


def test_bad_split_source_and_dir(monkeypatch):
    with pytest.raises(DataError, match="test splits carry no labels"):
        load_glue("rte", "test", data_dir=FIXTURES)
    with pytest.raises(DataError, match="unknown split"):
        load_glue("rte", "training", data_dir=FIXTURES)
    with pytest.raises(DataError, match="unknown data source .*auto"):
        load_glue("rte", "train", source="s3")
    monkeypatch.delenv("FEDLORA_GLUE_DIR", raising=False)
    monkeypatch.delenv("GLUE_DIR", raising=False)
    with pytest.raises(DataError, match="needs data_dir"):
        load_glue("rte", "train")
    monkeypatch.setenv("GLUE_DIR", str(FIXTURES))
    assert len(load_glue("cola", "dev")) == 3


# ---------------------------------------------------------------- hub (never touches the network)


class FakeHub:
    """What `datasets.load_dataset` returns, as far as load_glue looks at it."""

    def __init__(self, columns):
        self.columns = columns
        self.column_names = list(columns)

    def __getitem__(self, name):
        return self.columns[name]


def fake_datasets(monkeypatch, load):
    module = types.ModuleType("datasets")
    module.load_dataset = load
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hub_unreachable_becomes_data_error(monkeypatch):
    def load(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    fake_datasets(monkeypatch, load)
    with pytest.raises(DataError, match=r"hub.*ConnectionError.*source: local.*RTE[/\\]dev\.tsv"):
        load_glue("rte", "dev", source="hub")


def test_hub_rows_converted(monkeypatch):
    calls = []

    def load(path, config, split):
        calls.append((path, config, split))
        return FakeHub({"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"], "label": [2, 0], "idx": [0, 1]})

    fake_datasets(monkeypatch, load)
    ds = load_glue("mnli-mm", "dev", source="hub")
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert ds.text_a == ["p0", "p1"] and ds.text_b == ["h0", "h1"] and ds.labels.tolist() == [2, 0]
    assert ds.label_names == ["entailment", "neutral", "contradiction"]


def test_hub_regression_and_unlabeled(monkeypatch):
    fake_datasets(monkeypatch, lambda path, config, split: FakeHub({"sentence1": ["a"], "sentence2": ["b"], "label": [3.8]}))
    ds = load_glue("stsb", "train", source="hub")
    assert ds.labels.dtype == np.float32 and ds.labels[0] == pytest.approx(3.8)
    fake_datasets(monkeypatch, lambda path, config, split: FakeHub({"sentence": ["a"], "label": [-1]}))
    with pytest.raises(DataError, match="unlabeled"):
        load_glue("sst2", "train", source="hub")


# ---------------------------------------------------------------- source auto (no network either)


def no_hub(*args, **kwargs):
    raise AssertionError("source auto must not ask the hub when the local copy is there")


def test_auto_reads_the_local_copy_when_the_task_folder_exists(monkeypatch):
    fake_datasets(monkeypatch, no_hub)
    assert load_glue("cola", "dev", source="auto", data_dir=FIXTURES).text_a == load_glue("cola", "dev", data_dir=FIXTURES).text_a


def test_auto_with_a_task_folder_but_no_file_is_a_local_error(tmp_path, monkeypatch):
    fake_datasets(monkeypatch, no_hub)
    (tmp_path / "RTE").mkdir()
    with pytest.raises(DataError, match=r"not found: .*RTE[/\\]dev\.tsv"):
        load_glue("rte", "dev", source="auto", data_dir=tmp_path)


def test_auto_falls_back_to_the_hub(tmp_path, monkeypatch):
    calls = []

    def load(path, config, split):
        calls.append((path, config, split))
        return FakeHub({"sentence1": ["a"], "sentence2": ["b"], "label": [1]})

    fake_datasets(monkeypatch, load)
    (tmp_path / "SST-2").mkdir()  # another task's folder does not count
    ds = load_glue("rte", "train", source="auto", data_dir=tmp_path)
    assert calls == [("nyu-mll/glue", "rte", "train")] and ds.text_a == ["a"]


def test_auto_without_local_copy_or_hub_is_one_error(tmp_path, monkeypatch):
    def load(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub\n(OfflineModeIsEnabled)")

    fake_datasets(monkeypatch, load)
    with pytest.raises(DataError) as e:
        load_glue("sst2", "train", source="auto", data_dir=tmp_path / "glue")
    msg = str(e.value)
    assert "\n" not in msg
    for needle in (
        f"no local copy of SST-2 at {tmp_path / 'glue' / 'SST-2'}",
        "hub is unreachable",
        "OfflineModeIsEnabled",
        "data.data_dir",
        "SST-2/train.tsv",
        "go online",
    ):
        assert needle in msg, (needle, msg)


def test_auto_gives_up_on_a_silent_hub_quickly(tmp_path, monkeypatch):
    """Not in offline mode, the hub is asked once with a short timeout before `datasets` is."""
    import huggingface_hub.utils

    from fedlora.data import glue_hub

    asked = []

    class Session:
        def head(self, url, timeout):
            asked.append((url, timeout))
            raise TimeoutError("timed out")

    fake_datasets(monkeypatch, no_hub)
    monkeypatch.setattr(glue_hub, "hub_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: Session())
    with pytest.raises(DataError, match=r"no local copy of RTE .* unreachable \(no answer from .* within 5 s"):
        load_glue("rte", "dev", source="auto", data_dir=tmp_path)
    assert len(asked) == 1 and asked[0][1] <= 5


def test_offline_mode_is_read_from_the_environment(monkeypatch):
    from fedlora.data.glue_hub import hub_offline

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert hub_offline()
