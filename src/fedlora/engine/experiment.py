"""Everything a run needs, built and checked from a :class:`RunConfig` before
any file is written: data (tokenised once), partitions, model, aggregator."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, RunConfig
from ..core import Aggregator, get_aggregator
from ..data import DataError, TaskSpec, bin_names, get_task, label_histogram, load_glue, load_text_file, partition, regression_bins, tokenize
from ..data.glue import take_random
from ..data.instruct import answer_ids, load_instruct_file, render_prompt, tokenize_instruct
from ..data.prompts import PROMPTS, glue_as_instructions
from ..models import FedModel, LoraSettings, as_siamese, default_target_modules, load_causal_lm, load_pretrained
from ..models.device import resolve_placement
from ..models.hub import max_input_length, quantized_loading
from ..privacy import PrivacyPlan, plan_privacy
from .client import ClientData
from .seeding import derive_seed

__all__ = ["Experiment", "build_experiment", "client_ranks", "node_task", "personal_split"]


@dataclass
class PromptEval:
    """A GLUE dev set as label-word prompts: prompt ids, each label word's answer ids, the targets."""

    prompts: list[list[int]]
    answers: list[list[list[int]]]
    targets: np.ndarray  # class ids, or STS-B's unbinned scores


@dataclass
class Experiment:
    cfg: RunConfig
    task: TaskSpec
    model_path: str
    fm: FedModel
    tokenizer: Any
    aggregator: Aggregator
    train: Any  # TokenizedDataset; None in an experiment built without data (a node with its own)
    eval: Any
    clients: list[ClientData]
    histogram: np.ndarray
    label_names: list[str] = field(default_factory=list)
    sample_prompts: list[tuple[str, list[int]]] = field(default_factory=list)  # causal LMs: (text, prompt ids) to answer each round
    causal: bool = False  # a causal LM (instruction data, or a GLUE task as label-word prompts)
    prompt_eval: PromptEval | None = None
    privacy: PrivacyPlan | None = None  # privacy.mode != none: the checked plan (noise multiplier, sampling, accountant)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def local_dp(self):
        """What each client's DP-SGD needs (privacy.mode=local), else None."""
        return None if self.privacy is None else self.privacy.local


def file_task(cfg: RunConfig, label_names: list[str] | None) -> TaskSpec:
    """A TaskSpec for a user's CSV/JSONL files: accuracy/F1 or Pearson/Spearman. ``label_names``:
    the classes (from data.label_names, or `id_names` of the training labels)."""
    if cfg.data.regression:
        return TaskSpec("file", "", tuple(cfg.data.text_columns), None, ("pearson", "spearman"), "pearson", "")
    if not label_names:
        raise ConfigError("data.task=file (classification) needs its classes: data.label_names, or integer labels in data.train_file")
    return TaskSpec("file", "", tuple(cfg.data.text_columns), tuple(label_names), ("accuracy", "f1_macro"), "accuracy", "")


def id_names(labels: np.ndarray, path: str) -> list[str]:
    """Class names "0".."max id" for integer labels read without data.label_names: the head gets
    one output per id up to the largest in the training file (an id that never occurs is still
    a class). Refused when that is more classes than the file has examples (ids that are no
    class numbering, e.g. 10**9)."""
    top = int(labels.max())
    if top + 1 > len(labels):
        raise DataError(
            f"{path}: the largest label id is {top}, which makes {top + 1} classes for {len(labels)} examples; "
            "number the classes 0..C-1, or name them in data.label_names"
        )
    return [str(i) for i in range(top + 1)]


def instruct_task(label_names: list[str]) -> TaskSpec:
    """Instruction tuning of a causal LM: held-out loss and perplexity of the answers (lower is better)."""
    return TaskSpec("instruct", "", ("messages",), tuple(label_names), ("loss", "perplexity"), "perplexity", "", lower_is_better=True)


def load_datasets(cfg: RunConfig):
    """(task, train, evaluation) texts: the configured GLUE task, user files or instruction data,
    subsampled to data.max_train_examples (per seed) and data.max_eval_examples (one subset for
    every seed), or with data.eval_split=holdout the evaluation set held out of the training set."""
    d = cfg.data
    if d.task == "instruct":
        if not d.train_file or not d.eval_file:
            raise ConfigError("data.task=instruct needs data.train_file and data.eval_file (JSONL or CSV)")
        if d.eval_split == "holdout":  # holdout_split's sentence rules are for texts with labels, not conversations
            raise ConfigError("data.eval_split=holdout does not apply to data.task=instruct, which evaluates on data.eval_file; set data.eval_split=dev")
        train = load_instruct_file(d.train_file, category_field=d.category_field)
        dev = load_instruct_file(d.eval_file, category_field=d.category_field, category_names=train.label_names)
        # One evaluation subset for every seed, as for GLUE.
        train, dev = take_random(train, d.max_train_examples or None, cfg.seed), take_random(dev, d.max_eval_examples or None, 0)
        return instruct_task(train.label_names), train, dev
    if d.task == "file":
        if not d.train_file or not d.eval_file:
            raise ConfigError("data.task=file needs data.train_file and data.eval_file")
        train = load_text_file(d.train_file, d.text_columns, d.label_column, label_names=d.label_names or None, regression=d.regression)
        if not d.regression and not d.label_names:  # integer ids: the classes are those of the training file
            train.label_names = id_names(train.labels, d.train_file)
            dev = load_text_file(d.eval_file, d.text_columns, d.label_column, regression=False, max_id=len(train.label_names) - 1)
            dev.label_names = train.label_names
        else:
            dev = load_text_file(d.eval_file, d.text_columns, d.label_column, label_names=train.label_names, regression=d.regression)
        task = file_task(cfg, train.label_names)
        if d.eval_split == "holdout":
            return task, *holdout_split(train, d.holdout_examples, d.max_train_examples, cfg.seed, d.holdout_min_words)
        # As for GLUE: a training subset per seed, one evaluation subset for every seed.
        return task, take_random(train, d.max_train_examples or None, cfg.seed), take_random(dev, d.max_eval_examples or None, 0)
    task = get_task(d.task)
    kw = dict(source=d.source, data_dir=d.data_dir)
    if d.eval_split == "holdout":
        return task, *holdout_split(load_glue(task, "train", **kw), d.holdout_examples, d.max_train_examples, cfg.seed, d.holdout_min_words)
    train = load_glue(task, "train", max_examples=d.max_train_examples or None, seed=cfg.seed, **kw)
    # One evaluation subset for every seed, so seeds differ only in what they train on.
    dev = load_glue(task, "dev", max_examples=d.max_eval_examples or None, seed=0, **kw)
    return task, train, dev


def holdout_split(full, holdout: int, max_train: int, seed: int, min_words: int = 0):
    """(train, evaluation) both from the training set: a fixed ``holdout`` examples (the same
    for every seed) to evaluate on, and a per-seed subset of the rest to train on. What recipe
    sweeps tune on, so the dev set stays unseen until the final runs.

    ``min_words`` > 0 holds out whole sentences: the held-out examples are drawn only among those
    of at least that many words that are no contiguous span of a longer example (a phrase of a
    sentence still in training would be half seen), and every training example whose words are a
    contiguous span of a held-out sentence leaves the training pool. SST-2 is the case in point: its training set is
    mostly phrases cut from its sentences (each labelled), its dev set full sentences; a held-out
    set of phrases judges recipes on the wrong distribution, and a held-out sentence whose phrases
    are still trained on is half seen (an 8,000 → 12,000-example sweep scored 3 points above dev
    that way). Single-sentence tasks only: pairs are held out as they are.

    Whatever ``min_words``, a training example whose text (or pair), whitespace aside, is that of
    a held-out example leaves the training pool: a duplicate (SST-2 has hundreds, RTE two pairs)
    would be trained on and then scored as unseen."""
    words = [a.split() for a in full.text_a]
    if full.text_b is not None:
        counts = np.array([len(w) + len(b.split()) for w, b in zip(words, full.text_b)])
    else:
        counts = np.array([len(w) for w in words])
    eligible = np.flatnonzero(counts >= min_words)
    whole = min_words and full.text_b is None
    if whole:
        # Whole sentences only: an example that is a contiguous span of a longer one is a phrase cut from
        # it (SST-2 labels its sentences' phrases too), and holding it out would leave its sentence in training.
        candidates = {" ".join(words[k]) for k in eligible}
        inside = set()
        for w in words:
            if len(w) > min_words:
                for size in range(min_words, len(w)):
                    inside.update(c for c in (" ".join(w[i : i + size]) for i in range(len(w) - size + 1)) if c in candidates)
        eligible = np.array([k for k in eligible if " ".join(words[k]) not in inside], dtype=np.int64)
    if holdout >= len(full) or holdout > len(eligible):
        what = f"{len(eligible)} {'whole sentences' if whole else 'examples'} with ≥ {min_words} words" if min_words else f"{len(full)} examples"
        raise ConfigError(f"data.holdout_examples={holdout} leaves nothing to train on: the training set has {what}")
    chosen = eligible[np.random.default_rng(20261127).permutation(len(eligible))[:holdout]]
    rest = np.setdiff1d(np.arange(len(full)), chosen)
    if min_words and full.text_b is None:
        spans = {" ".join(w[i:j]) for w in (words[k] for k in chosen) for i in range(len(w)) for j in range(i + 1, len(w) + 1)}
        rest = np.array([k for k in rest if " ".join(words[k]) not in spans], dtype=np.int64)

    def key(k):
        return " ".join(words[k]) if full.text_b is None else (" ".join(words[k]), " ".join(full.text_b[k].split()))

    held = {key(k) for k in chosen}
    rest = np.array([k for k in rest if key(k) not in held], dtype=np.int64)
    evaluation = full.subset(np.sort(chosen))
    train = take_random(full.subset(rest), max_train or None, seed)
    return train, evaluation


def node_task(cfg: RunConfig) -> TaskSpec:
    """The run's task without its data set: what a Flower node that trains on its own examples
    needs (their columns, classes and metrics), which never reads the run's training or
    evaluation files. A user's file task takes its classes from data.label_names, else from the
    run's data.train_file where this machine has it (integer ids: "0" … the largest, as the server reads them)."""
    d = cfg.data
    if d.task == "instruct":  # a node's categories only group the server's evaluation: none needed here
        return instruct_task([])
    if d.task == "file":
        if d.regression or d.label_names:
            return file_task(cfg, list(d.label_names) or None)
        if not d.train_file or not Path(d.train_file).is_file():
            raise ConfigError(
                f"data.task=file: a node training on its own examples needs the run's classes, from data.label_names in the run config "
                f"or the run's data.train_file, which this machine lacks ({d.train_file!r})"
            )
        train = load_text_file(d.train_file, d.text_columns, d.label_column, regression=False)
        return file_task(cfg, id_names(train.labels, d.train_file))
    return get_task(d.task)


def load_eval_only(cfg: RunConfig, task: TaskSpec):
    """(task, evaluation texts) of a server that reads no training set (``data.node_data``): the
    task's dev set, or data.eval_file with the run's data.label_names; an instruction task's
    categories are then those of the evaluation file."""
    d = cfg.data
    if d.task in ("instruct", "file") and not d.eval_file:
        raise ConfigError(f"data.task={d.task} needs data.eval_file (data.node_data=true: the server reads no data.train_file)")
    if d.task == "instruct":
        dev = load_instruct_file(d.eval_file, category_field=d.category_field)
        return instruct_task(dev.label_names), take_random(dev, d.max_eval_examples or None, 0)
    if d.task == "file":  # a classification's classes are data.label_names (RunConfig.validate asks for them here)
        dev = load_text_file(d.eval_file, d.text_columns, d.label_column, label_names=task.label_names, regression=d.regression)
        return task, take_random(dev, d.max_eval_examples or None, 0)
    return task, load_glue(task, "dev", max_examples=d.max_eval_examples or None, seed=0, source=d.source, data_dir=d.data_dir)


def load_node_examples(cfg: RunConfig, task: TaskSpec, path: str, label_names: list[str] | None):
    """A node's own training examples: a CSV/JSONL file (``data.task=file`` or ``instruct``,
    the run's columns) or a folder in the GLUE layout (``<path>/<TASK>/train.tsv``)."""
    d = cfg.data
    if d.task == "instruct":
        return load_instruct_file(path, category_field=d.category_field, category_names=label_names)
    if d.as_prompt:
        return glue_as_instructions(task, load_glue(task, "train", source="local", data_dir=path))
    if d.task == "file":
        return load_text_file(path, d.text_columns, d.label_column, label_names=label_names, regression=d.regression)
    return load_glue(task, "train", source="local", data_dir=path)


def personal_split(indices: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(train, held out) of one client's examples: ``fraction`` of them, at least one, chosen with
    ``seed``, set aside for evaluating the client's own model (``fed.personal_eval``)."""
    if fraction <= 0 or len(indices) < 2:
        return indices, None
    n = min(len(indices) - 1, max(1, round(fraction * len(indices))))
    perm = np.random.default_rng(seed).permutation(len(indices))
    return np.sort(indices[perm[n:]]), np.sort(indices[perm[:n]])


def client_ranks(cfg: RunConfig, num_clients: int) -> list[int]:
    ranks = cfg.model.client_ranks or [cfg.model.rank]
    return [ranks[i % len(ranks)] for i in range(num_clients)]


def make_aggregator(cfg: RunConfig, fm: FedModel) -> Aggregator:
    """The configured method; centralized training is one client, aggregated trivially."""
    if cfg.fed.mode == "centralized":
        return get_aggregator("fedit", weighting="uniform")
    options = dict(cfg.fed.options)
    if options.get("class_aware_head") and not fm.head:
        raise ConfigError("fed.options.class_aware_head needs a classification head; a causal LM has none")
    if options.get("class_aware_head") and fm.base.config.num_labels < 2:
        raise ConfigError("fed.options.class_aware_head needs a classification task (this one is regression)")
    if options.get("class_aware_head") and not options.get("head_keys"):
        options["head_keys"] = fm.output_keys()  # HEXA (e): the output layer's rows are the classes
    elif options.get("class_aware_head"):
        keys = [options["head_keys"]] if isinstance(options["head_keys"], str) else list(options["head_keys"])
        rows = fm.base.config.num_labels
        wrong = [k for k in keys if k not in fm.head or fm.head[k].shape[0] != rows]
        if wrong:
            fits = ", ".join(fm.output_keys())
            raise ConfigError(
                f"fed.options.head_keys {wrong} are not the head's output layer ({rows} rows, one per class): leave head_keys out, or give {fits}"
            )
        options["head_keys"] = keys
    return get_aggregator(cfg.fed.method, weighting=cfg.fed.weighting, **options)


def read_pairs_apart(cfg: RunConfig, model, tokenizer, causal: bool, pairs: bool):
    """``model.pair_encoder=siamese``: the classifier read as a bi-encoder (models/siamese.py),
    or a one-line refusal where that cannot work."""
    if causal:
        raise ConfigError("model.pair_encoder=siamese reads sentence pairs with an encoder; it does not apply to a causal LM")
    if not pairs:
        raise ConfigError(
            f"model.pair_encoder=siamese needs sentence pairs (RTE, STS-B, …, or two data.text_columns); data.task={cfg.data.task!r} has one sentence"
        )
    if cfg.train.gradient_checkpointing:
        raise ConfigError("model.pair_encoder=siamese does not support train.gradient_checkpointing")
    if 1 not in tokenizer("a", "b").get("token_type_ids", []):  # RoBERTa's tokenizer marks no second segment
        raise ConfigError(
            f"model.pair_encoder=siamese needs a tokenizer that marks the second sentence with token_type_ids (BERT-style); the one of {cfg.model.name!r} does not"
        )
    return as_siamese(model, tokenizer)


def build_experiment(cfg: RunConfig, *, model=None, tokenizer=None, with_data: bool = True) -> Experiment:
    """Load and check everything. ``model``/``tokenizer`` may be passed in (tests).

    ``with_data=False``: the model side alone, for a Flower node that trains on its own examples
    (``node_task``): no data set is read, ``train`` and ``eval`` are None, every client holds no
    indices (the node builds its own), and there is no privacy plan (local DP's z comes with each job).
    ``data.node_data`` (a Flower server whose nodes all bring their own rows): the evaluation set
    alone is read; ``train`` is None, the clients hold no indices, and privacy is planned
    without the clients' sizes (``plan_privacy``)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    placement = resolve_placement(cfg.train.device, cfg.train.precision)  # a missing device fails before any loading
    if cfg.privacy.mode == "local" and placement.dtype is torch.float16:  # train.precision=auto on a GPU without bf16
        raise ConfigError(
            f"privacy.mode=local: train.precision={cfg.train.precision} resolved to fp16 on {placement.device}, and DP-SGD has no gradient "
            "scaler (it would scale the noise), so fp16 gradients would underflow: set train.precision=fp32"
        )
    causal = cfg.data.task == "instruct" or cfg.data.as_prompt  # a causal LM: instruction data, or a GLUE task as prompts
    loading = quantized_loading(cfg.model.quantization, placement.device, placement.dtype, classifier=not causal)  # and so does quantization without CUDA
    if not with_data:
        task, train_text, dev_text = node_task(cfg), None, None
    elif cfg.data.node_data:
        (task, dev_text), train_text = load_eval_only(cfg, node_task(cfg)), None
    else:
        task, train_text, dev_text = load_datasets(cfg)
    if cfg.data.as_prompt and task.name in ("file", "instruct"):
        raise ConfigError(f"data.as_prompt turns a GLUE task into label-word prompts; data.task={task.name!r} is not one")
    dev_targets = None
    if cfg.data.as_prompt and dev_text is not None:
        dev_targets = dev_text.labels
        dev_text = glue_as_instructions(task, dev_text)
        train_text = None if train_text is None else glue_as_instructions(task, train_text)

    centralized = cfg.fed.mode == "centralized"
    num_clients = 1 if centralized else cfg.partition.num_clients
    if train_text is None:
        parts: list = [np.empty(0, np.int64)] * num_clients
    else:
        if not centralized and num_clients > len(train_text):
            raise ConfigError(f"partition.num_clients={num_clients} exceeds the {len(train_text)} training examples")
        parts = partition(
            train_text.labels,
            num_clients,
            "iid" if centralized else cfg.partition.scheme,
            seed=cfg.seed,
            alpha=cfg.partition.alpha,
            labels_per_client=cfg.partition.labels_per_client,
        )
    ranks = [cfg.model.rank] if centralized else client_ranks(cfg, num_clients)

    model_path = cfg.model.name
    if model is None:
        # A head the checkpoint lacks is initialised randomly: from the run's seed, not from
        # whatever the process drew before, so a run (and its resume) starts from the same head.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, "model"))
            if causal:
                model, tokenizer = load_causal_lm(cfg.model.name, loading)
            else:
                model, tokenizer = load_pretrained(cfg.model.name, task.num_labels, regression=task.is_regression, loading=loading)
    if cfg.model.pair_encoder == "siamese":
        known = train_text if train_text is not None else dev_text
        pairs = len(task.text_columns) == 2 if known is None else known.text_b is not None
        model = read_pairs_apart(cfg, model, tokenizer, causal, pairs)
    limit = max_input_length(model, tokenizer)
    if limit is not None and cfg.model.max_length > limit:
        raise ConfigError(f"model.max_length={cfg.model.max_length} exceeds the {limit} positions of model {cfg.model.name!r}")
    lora_targets = tuple(cfg.model.target_modules) or tuple(default_target_modules(model))
    settings = LoraSettings(lora_targets, cfg.model.rank, cfg.model.alpha, cfg.model.dropout, cfg.model.rslora)
    if loading:  # QLoRA: layer norms to float32, inputs that carry gradients (peft's recipe for k-bit bases)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.train.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"train.gradient_checkpointing: model {cfg.model.name!r} does not support it")
        # Non-reentrant checkpointing: gradients reach the LoRA factors although the frozen inputs need none.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5 (the old name warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    fm = FedModel(model, settings, ranks, placement, head=not causal, base_delta=cfg.model.base_delta)
    aggregator = make_aggregator(cfg, fm)
    if any(r != cfg.model.rank for r in ranks) and not aggregator.mixed_ranks:
        raise ConfigError(
            f"method {cfg.fed.method!r} needs every client at model.rank={cfg.model.rank}; mixed client_ranks need hexa, fedhl, flexlora, hetlora or flora"
        )
    clients = []
    for i, (idx, r) in enumerate(zip(parts, ranks)):
        idx, held = personal_split(np.asarray(idx), cfg.fed.personal_eval, derive_seed(cfg.seed, "personal", i))
        counts = None
        if not task.is_regression and train_text is not None:
            counts = torch.bincount(torch.as_tensor(train_text.labels[idx]), minlength=task.num_labels).double()
        clients.append(ClientData(client_id=f"client{i}", indices=idx, rank=r, label_counts=counts, held_out=held))
    if dev_text is None:  # a node with its own rows: no data of the run, no privacy plan (z comes with each job)
        return Experiment(cfg, task, model_path, fm, tokenizer, aggregator, None, None, clients, np.zeros((num_clients, 0)), [], causal=causal)
    # the examples each client trains on (data.node_data: the server does not know them)
    privacy = plan_privacy(cfg, aggregator, None if train_text is None else [len(c.indices) for c in clients])
    encode = tokenize_instruct if causal else tokenize
    train = None if train_text is None else encode(train_text, tokenizer, cfg.model.max_length)
    dev = encode(dev_text, tokenizer, cfg.model.max_length)
    # One column per class, those no client holds included (a subset may lack the last classes).
    if train_text is None:
        hist, names = np.zeros((num_clients, 0)), []
    elif train_text.is_regression:
        hist, names = label_histogram(train_text.labels, parts), bin_names(regression_bins(train_text.labels)[1])
    else:
        hist, names = label_histogram(train_text.labels, parts, num_classes=len(train_text.label_names)), list(train_text.label_names)
    samples = []
    if causal and cfg.data.sample_prompts:
        # A sample prompt is cut as training cuts its prompts (its last model.max_length tokens), and short enough
        # for the answer's data.sample_tokens to fit the model's positions (past them GPT-2 fails, rotary models drift).
        keep = cfg.model.max_length if limit is None else min(cfg.model.max_length, limit - cfg.data.sample_tokens)
        if keep < 1:
            raise ConfigError(f"data.sample_tokens={cfg.data.sample_tokens} leaves no room for a prompt in the {limit} positions of model {cfg.model.name!r}")
        for messages in dev_text.prompts[: cfg.data.sample_prompts]:
            samples.append((messages[-1]["content"], render_prompt(tokenizer, messages)[-keep:]))
    prompt_eval = None if dev_targets is None else label_word_prompts(dev_text, PROMPTS[task.name].words, dev_targets, tokenizer, cfg.model.max_length)
    return Experiment(cfg, task, model_path, fm, tokenizer, aggregator, train, dev, clients, hist, names, samples, causal, prompt_eval, privacy)


def label_word_prompts(dev, words: tuple[str, ...], targets: np.ndarray, tokenizer, max_length: int) -> PromptEval:
    """Each dev prompt's ids (cut from the start to leave room for the longest answer) and the ids
    of every label word as the template ends an answer; refused if the tokenizer cannot tell
    two label words apart."""
    prompts, answers = [], []
    for messages in dev.prompts:
        prompt = render_prompt(tokenizer, messages)
        cands = [answer_ids(tokenizer, messages, w, prompt) for w in words]
        if len({tuple(c) for c in cands}) < len(words):
            raise ConfigError(f"the tokenizer gives label words {list(words)} identical token ids: the prompts cannot tell the classes apart")
        keep = max_length - max(len(c) for c in cands)
        if keep < 1:
            raise ConfigError(f"model.max_length={max_length} leaves no room for a prompt before the label words")
        prompts.append(prompt[-keep:])
        answers.append(cands)
    return PromptEval(prompts, answers, np.asarray(targets))
