"""tokenize / length_bucketed_batches / collate with a tiny offline WordPiece tokenizer."""

import numpy as np
import pytest
import torch

from fedlora.data import DataError, TextDataset, collate, length_bucketed_batches, tokenize
from fedlora.data.tokenize import pair_separator

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "park", "big", "red", ".", "##s"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return d


@pytest.fixture(scope="module")
def bert(tokenizer_dir):
    from transformers import BertTokenizer  # a local folder: never touches the hub

    return BertTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def roberta_like(tokenizer_dir):
    from transformers import BertTokenizer  # same vocab, but no token_type_ids (like RoBERTa)

    return BertTokenizer.from_pretrained(str(tokenizer_dir), model_input_names=["input_ids", "attention_mask"])


PAIRS = TextDataset(
    text_a=["the cat sat on the mat .", "a dog", "the big red dog ran to the park .", "cats", "a cat sat"],
    text_b=["the cat sat", "a dog ran", "a dog", "the dogs", "on the mat on the mat on the mat"],
    labels=np.array([0, 1, 2, 1, 0]),
)


def test_tokenize_pairs_matches_tokenizer(bert):
    tok = tokenize(PAIRS, bert, max_length=12)
    ref = bert(PAIRS.text_a, PAIRS.text_b, truncation=True, max_length=12)
    assert len(tok) == 5 and tok.token_type_ids is not None
    for i in range(5):
        assert tok.input_ids(i).tolist() == ref["input_ids"][i]
        lo, hi = tok.offsets[i], tok.offsets[i + 1]
        assert tok.token_type_ids[lo:hi].tolist() == ref["token_type_ids"][i]
    assert tok.lengths.tolist() == [len(x) for x in ref["input_ids"]]
    assert max(tok.lengths) <= 12 and tok.lengths[4] == 12  # truncated, longest first
    assert tok.labels.dtype == torch.int64 and tok.labels.tolist() == [0, 1, 2, 1, 0]
    assert tok.offsets[-1] == len(tok.ids)


def test_tokenize_single_regression_and_chunks(roberta_like):
    ds = TextDataset(["the cat", "a big dog ran", "park"], None, np.array([0.5, 4.0, 2.25]))
    tok = tokenize(ds, roberta_like, max_length=16, chunk_size=2)  # two tokenizer calls
    assert tok.token_type_ids is None
    assert tok.lengths.tolist() == [4, 6, 3]  # [CLS] ... [SEP]
    assert tok.labels.dtype == torch.float32 and tok.labels.tolist() == [0.5, 4.0, 2.25]
    with pytest.raises(DataError, match="max_length"):
        tokenize(ds, roberta_like, max_length=1)


def test_collate_pads_like_the_tokenizer(bert):
    tok = tokenize(PAIRS, bert, max_length=12)
    batch = collate(tok, np.array([1, 3, 0]), bert.pad_token_id)
    ref = bert([PAIRS.text_a[i] for i in (1, 3, 0)], [PAIRS.text_b[i] for i in (1, 3, 0)], truncation=True, max_length=12, padding=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(batch[key], ref[key]), key
    assert batch["labels"].tolist() == [1, 1, 0]
    assert batch["input_ids"].shape[1] == int(tok.lengths[[1, 3, 0]].max())


def test_collate_without_token_types_and_custom_pad(roberta_like):
    tok = tokenize(PAIRS, roberta_like, max_length=12)
    batch = collate(tok, [2, 1], pad_token_id=99)
    assert "token_type_ids" not in batch
    assert batch["input_ids"][1, int(tok.lengths[1]) :].eq(99).all()
    assert batch["attention_mask"].sum(1).tolist() == tok.lengths[[2, 1]].tolist()
    with pytest.raises(DataError, match="pad_token_id"):
        collate(tok, [0], None)


LENGTHS = torch.tensor(np.random.default_rng(0).integers(3, 120, 1000))


def test_batches_cover_indices_once():
    idx = np.arange(0, 1000, 3)  # a client's subset
    batches = length_bucketed_batches(LENGTHS, idx, 16, generator=torch.Generator().manual_seed(0), bucket_factor=4)
    flat = np.concatenate(batches)
    assert np.array_equal(np.sort(flat), idx)
    assert sum(len(b) < 16 for b in batches) == 1 and all(len(b) <= 16 for b in batches)


def test_batches_deterministic_with_generator():
    def run(seed):
        return length_bucketed_batches(
            LENGTHS,
            np.arange(1000),
            8,
            generator=torch.Generator().manual_seed(seed),
        )

    a, b, c = run(1), run(1), run(2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_bucketing_reduces_padding():
    g = torch.Generator().manual_seed(0)
    lengths = LENGTHS.numpy()

    def padding(batches):
        return sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches)

    bucketed = length_bucketed_batches(LENGTHS, np.arange(1000), 16, generator=g, bucket_factor=10)
    plain = length_bucketed_batches(LENGTHS, np.arange(1000), 16, generator=g, bucket_factor=1)
    assert padding(bucketed) < 0.3 * padding(plain)
    # one chunk holding everything: batches are consecutive runs of the length-sorted order
    whole = length_bucketed_batches(LENGTHS, np.arange(1000), 16, generator=g, bucket_factor=100)
    runs = sorted(whole, key=lambda b: (lengths[b].min(), lengths[b].max()))
    assert all(lengths[x].max() <= lengths[y].min() for x, y in zip(runs, runs[1:]))
    mins = [int(lengths[b].min()) for b in whole]
    assert mins != sorted(mins)  # ...in shuffled order


def test_eval_batches_sorted_and_unshuffled():
    idx = np.array([5, 1, 9, 3, 7])
    lengths = np.zeros(10, dtype=int)
    lengths[[5, 1, 9, 3, 7]] = [30, 10, 20, 10, 5]
    batches = length_bucketed_batches(lengths, idx, 2, generator=None, shuffle=False)
    assert [b.tolist() for b in batches] == [[7, 1], [3, 9], [5]]
    assert length_bucketed_batches(lengths, [], 4, generator=None) == []
    with pytest.raises(DataError, match="batch_size"):
        length_bucketed_batches(lengths, idx, 0, generator=None)


def _word_level(**special):
    """A tokenizer with no pair template (like GPT-2's): one id per word, specials as given."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", "the", "cat", "sat", "a", "dog", "ran", "<sep>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **special)


def test_pair_without_template_gets_eos_between_sentences():
    """GPT-2-style tokenizers add nothing between a pair's sentences: "the cat sat" + "a dog ran"
    would read as one sentence. The eos token (id 1) goes between them; truncation keeps it."""
    gpt2_like = _word_level(eos_token="<eos>", pad_token="<eos>")
    assert gpt2_like.num_special_tokens_to_add(pair=True) == 0
    pairs = TextDataset(["the cat sat", "the cat sat the cat sat"], ["a dog ran", "a dog"], np.array([0, 1]))
    tok = tokenize(pairs, gpt2_like, max_length=7)
    assert tok.input_ids(0).tolist() == [3, 4, 5, 1, 6, 7, 8]
    assert tok.input_ids(1).tolist() == [3, 4, 5, 3, 1, 6, 7]  # longest first: the first sentence is cut, the eos kept
    sep_first = tokenize(pairs, _word_level(eos_token="<eos>", sep_token="<sep>"), max_length=16)
    assert sep_first.input_ids(0).tolist() == [3, 4, 5, 9, 6, 7, 8]  # a sep token is preferred to eos
    single = tokenize(TextDataset(["the cat sat"], None, np.array([0])), gpt2_like, max_length=7)
    assert single.input_ids(0).tolist() == [3, 4, 5]  # single sentences are untouched


def test_pair_without_template_or_specials_gets_a_newline(bert):
    """A byte-level tokenizer with no eos or sep: a newline separates the pair, the same ids as the
    joined text; a tokenizer with a pair template (BERT's [SEP]) gets nothing added."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bpe = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level = PreTrainedTokenizerFast(tokenizer_object=bpe)
    tok = tokenize(TextDataset(["the cat"], ["a dog"], np.array([0])), byte_level, max_length=32)
    assert tok.input_ids(0).tolist() == byte_level("the cat\na dog")["input_ids"]
    assert len(tok.input_ids(0)) == len("the cat\na dog")
    assert pair_separator(byte_level) == "\n" and pair_separator(bert) is None
