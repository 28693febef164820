"""``adapterserve train``: fit a LoRA adapter (with PEFT) or a bottleneck adapter (our modules) on
the configured base model and write a store-ready folder (adapter files, ``labels.json``,
``metrics.json``)."""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from peft import IA3Config, LoraConfig, PeftModel, TaskType, get_peft_model
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from app.models.base_lm import resolve_device, resolve_model_path
from app.models.quantize import Setting, resolve, snap_to_quantized
from app.models.surface import surface_for
from app.training import data as D
from app.training.bottleneck_modules import BottleneckConfig, BottleneckModel, get_bottleneck_model
from app.training.early_stop import EarlyStopping, macro_f1
from app.training.output import save_adapter

log = logging.getLogger(__name__)

FEW_STEPS = 20  # fewer optimizer steps than this: warn that the run will learn little


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based) of ``total``: a linear warm-up
    over ``warmup`` steps that starts above zero (the first step already learns), then a linear
    decay that ends above zero at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@dataclass
class TrainOptions:
    """Everything a training run depends on; written into ``metrics.json``."""

    task: Literal["classify", "generate"]
    data: Path
    output: Path
    val_data: Path | None = None
    val_fraction: float = 0.1
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"
    system: str | None = None
    kind: Literal["lora", "dora", "ia3", "bottleneck"] = "lora"
    rank: int = 8
    alpha: float = 16.0
    target_modules: str = "all-linear"
    dropout: float = 0.05
    placement: str = "ffn"  # bottleneck: attention / ffn (pfeiffer) / both (houlsby)
    bottleneck_size: int | None = None  # bottleneck: None = hidden size // reduction_factor
    reduction_factor: float = 16.0
    activation: str = "relu"
    epochs: int = 2
    lr: float = 5e-4
    batch_size: int = 16
    max_length: int = 256
    max_steps: int | None = None  # stop early after this many optimizer steps (smoke runs)
    patience: int | None = None  # with validation data: stop after this many epochs without a better one
    seed: int = 0
    base_model: str = ""
    cache_dir: Path = Path.home() / ".cache" / "adapterserve"
    device: str = "auto"
    quantization: Setting = "none"  # train on the weights a server quantized so computes with


@dataclass
class TrainResult:
    model: PeftModel | BottleneckModel  # the trained model, in eval mode
    tokenizer: PreTrainedTokenizerBase
    labels: list[str] | None
    metrics: dict[str, Any]


@dataclass
class _Split:
    train: D.Encoded
    val: D.Encoded | None
    labels: list[str] | None
    counts: dict[str, Any]


def _prepare(opts: TrainOptions, tok: PreTrainedTokenizerBase) -> _Split:
    if not 0 <= opts.val_fraction < 1:
        raise D.DataError("val_fraction must be in [0, 1)")
    if opts.task == "classify":
        train = D.classify_examples(opts.data, opts.text_column, opts.label_column)
        val = (
            D.classify_examples(opts.val_data, opts.text_column, opts.label_column) if opts.val_data else None
        )
        labels = D.label_set(train, val, opts.data)
        if val is None and opts.val_fraction > 0:
            train, val = D.stratified_split(train, opts.val_fraction, opts.seed)
        counts = {"train": D.label_counts(train.labels), "val": D.label_counts(val.labels) if val else {}}
        enc_train = D.encode_classify(tok, train, labels, opts.max_length)
        enc_val = D.encode_classify(tok, val, labels, opts.max_length) if val and val.texts else None
        return _Split(enc_train, enc_val, labels, counts)
    cols = (opts.prompt_column, opts.response_column, opts.messages_column, opts.system)
    convs = D.chat_examples(opts.data, *cols)
    val_convs = D.chat_examples(opts.val_data, *cols) if opts.val_data else None
    if val_convs is None and opts.val_fraction > 0:
        convs, val_convs = D.random_split(convs, opts.val_fraction, opts.seed)
    enc_train = D.encode_chat(tok, convs, opts.max_length)
    if not enc_train.input_ids:
        raise D.DataError(f"{opts.data}: no example keeps an assistant token within max_length")
    enc_val = D.encode_chat(tok, val_convs, opts.max_length) if val_convs else None
    if enc_val is not None and not enc_val.input_ids:  # every validation example was cut away
        enc_val = None
    return _Split(enc_train, enc_val, None, {"train": len(convs), "val": len(val_convs or [])})


def _target_modules(model: PreTrainedModel, spec: str) -> list[str]:
    """``all-linear`` = the linear layers of the transformer blocks the family's surface names
    (fused and Conv1D projections included; never a head or BERT's pooler)."""
    if spec != "all-linear":
        return [m.strip() for m in spec.split(",") if m.strip()]
    return list(surface_for(str(model.config.model_type)).lora_targets)


def _batches(lengths: list[int], batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Shuffled batches of similar lengths (less padding): sort within shuffled windows."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 16
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    yield from batches


def _collate(enc: D.Encoded, idx: list[int], pad_id: int, task: str, device: torch.device) -> dict[str, Any]:
    width = max(len(enc.input_ids[i]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    labels = (
        torch.tensor([enc.targets[i] for i in idx])
        if task == "classify"
        else torch.full((len(idx), width), -100, dtype=torch.long)
    )
    for row, i in enumerate(idx):
        n = len(enc.input_ids[i])
        ids[row, :n] = torch.tensor(enc.input_ids[i])
        mask[row, :n] = 1
        if task == "generate":
            labels[row, :n] = torch.tensor(enc.targets[i])
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


@torch.no_grad()
def evaluate(
    model: nn.Module, enc: D.Encoded, opts: TrainOptions, pad_id: int, dev: torch.device
) -> dict[str, float]:
    """Accuracy and macro-F1 (classify) or token loss and perplexity (generate)."""
    model.eval()
    idx = sorted(range(len(enc.input_ids)), key=lambda i: len(enc.input_ids[i]))
    preds: dict[int, int] = {}
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(idx), opts.batch_size):
        chunk = idx[start : start + opts.batch_size]
        batch = _collate(enc, chunk, pad_id, opts.task, dev)
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        if opts.task == "classify":
            preds.update(zip(chunk, logits.argmax(-1).tolist(), strict=True))
        else:
            shift = labels[:, 1:]
            loss_sum += float(
                nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), shift.reshape(-1), reduction="sum"
                )
            )
            tokens += int((shift != -100).sum())
    model.train()
    if opts.task == "classify":
        pred = [preds[i] for i in range(len(enc.input_ids))]
        gold = [int(t) for t in enc.targets]
        acc = sum(p == g for p, g in zip(pred, gold, strict=True)) / max(len(gold), 1)
        num_labels = max(max(gold, default=0), max(pred, default=0)) + 1
        return {"accuracy": round(acc, 4), "macro_f1": round(macro_f1(pred, gold, num_labels), 4)}
    loss = loss_sum / max(tokens, 1)
    return {"loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 50.0)), 3)}


def _load_model(
    opts: TrainOptions, path: Path, labels: list[str] | None, tok: PreTrainedTokenizerBase
) -> nn.Module:
    if opts.task == "classify":
        assert labels is not None
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            dtype=torch.float32,
        )
        model.config.pad_token_id = tok.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    head = surface_for(str(model.config.model_type)).head_modules
    snap_to_quantized(
        model, resolve(opts.quantization, resolve_device(opts.device)), keep=head, tokenizer=tok
    )
    if opts.kind == "bottleneck":
        bottleneck = BottleneckConfig(
            task=opts.task,
            placement=opts.placement,
            bottleneck_size=opts.bottleneck_size,
            reduction_factor=opts.reduction_factor,
            activation=opts.activation,
        )
        try:
            return get_bottleneck_model(model, bottleneck)
        except ValueError as exc:
            raise D.DataError(f"bottleneck options: {exc}") from exc
    # PEFT trains (and saves) "classifier" / "score" modules; the family's other head layers
    # (BERT's pooler) are trained and saved with them, so that the adapter carries its whole head
    extra = [m for m in head if not {"classifier", "score"} & set(m.split("."))]
    task_type = TaskType.SEQ_CLS if opts.task == "classify" else TaskType.CAUSAL_LM
    to_save = extra if opts.task == "classify" and extra else None
    config: LoraConfig | IA3Config
    if opts.kind == "ia3":  # PEFT's targets for the family (keys, values, the feed-forward output)
        targets = None if opts.target_modules == "all-linear" else _target_modules(model, opts.target_modules)
        config = IA3Config(
            task_type=task_type,
            modules_to_save=to_save,
            target_modules=targets,
            feedforward_modules=None if targets is None else [],
        )
    else:
        config = LoraConfig(
            task_type=task_type,
            modules_to_save=to_save,
            r=opts.rank,
            lora_alpha=opts.alpha,  # type: ignore[arg-type]  # PEFT accepts any number
            lora_dropout=opts.dropout,
            target_modules=_target_modules(model, opts.target_modules),
            use_dora=opts.kind == "dora",
        )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # e.g. target modules that the base model does not have
        raise D.DataError(f"--target-modules {opts.target_modules!r}: {exc}") from exc


def train(opts: TrainOptions) -> TrainResult:
    """Run one training job and write ``opts.output``; the metrics are also in its ``metrics.json``."""
    if opts.epochs < 1 or opts.batch_size < 1 or opts.rank < 1 or opts.max_length < 8:
        raise D.DataError("epochs, batch_size and rank must be at least 1, max_length at least 8")
    random.seed(opts.seed)
    torch.manual_seed(opts.seed)
    hf_logging.set_verbosity_error()  # the fresh classification head is expected, not news
    path, model_id = resolve_model_path(opts.base_model, opts.cache_dir)
    surface = surface_for(str(AutoConfig.from_pretrained(path).model_type))
    if opts.task == "generate" and not surface.can_generate:
        raise D.DataError(f"the base model ({surface.family}) is an encoder: it trains --task classify only")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    split = _prepare(opts, tok)
    for what, enc in (("training", split.train), ("validation", split.val)):
        if enc is not None and (enc.truncated or enc.dropped):
            print(
                f"{what}: {enc.truncated} of {len(enc.input_ids) + enc.dropped} examples truncated to "
                f"{opts.max_length} tokens; {enc.dropped} dropped (nothing left to learn)"
            )
    dev = resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    model = _load_model(opts, path, split.labels, tok).to(dev)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    steps_per_epoch = math.ceil(len(split.train.input_ids) / opts.batch_size)
    total = steps_per_epoch * opts.epochs
    if opts.max_steps is not None:
        total = min(total, opts.max_steps)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=opts.lr)
    warmup = max(1, total // 16)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda i: lr_factor(i, warmup, total))
    if total < FEW_STEPS:
        print(
            f"warning: only {total} optimizer steps ({len(split.train.input_ids)} examples, batch size "
            f"{opts.batch_size}, {opts.epochs} epochs): the adapter will learn little; add examples, "
            "raise --epochs or lower --batch-size",
            file=sys.stderr,
        )
    print(
        f"training a {opts.task} {opts.kind} adapter on {model_id}: {len(split.train.input_ids)} examples, "
        f"{total} steps, {trainable:,} trainable parameters, device {dev}"
    )
    rng = random.Random(opts.seed)
    lengths = [len(x) for x in split.train.input_ids]
    history: list[dict[str, Any]] = []
    stopper = EarlyStopping(opts.task, opts.patience)  # the best epoch is kept either way
    started, step = time.perf_counter(), 0
    model.train()
    bar = tqdm(total=total, unit="step", dynamic_ncols=True)
    for epoch in range(1, opts.epochs + 1):
        losses: list[float] = []
        bar.set_description(f"epoch {epoch}/{opts.epochs}")
        for idx in _batches(lengths, opts.batch_size, rng):
            if step >= total:
                break
            loss = model(**_collate(split.train, idx, int(tok.pad_token_id), opts.task, dev)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        row: dict[str, Any] = {"epoch": epoch, "train_loss": round(sum(losses) / max(len(losses), 1), 4)}
        if split.val is not None:
            row["val"] = evaluate(model, split.val, opts, int(tok.pad_token_id), dev)
        row["elapsed_s"] = round(time.perf_counter() - started, 1)
        history.append(row)
        bar.write(f"epoch {epoch}: " + json.dumps({k: v for k, v in row.items() if k != "epoch"}))
        stop = "val" in row and stopper.update(model, epoch, row["val"])
        if stop or step >= total:
            break
    bar.close()
    stopper.restore(model)
    if opts.patience is not None and stopper.best_epoch and stopper.best_epoch != history[-1]["epoch"]:
        print(f"kept epoch {stopper.best_epoch}, the best on the validation split: {stopper.best_val}")
    seconds = time.perf_counter() - started
    metrics = {
        "task": opts.task,
        "base_model": model_id,
        "quantization": resolve(opts.quantization, dev),
        "train_examples": len(split.train.input_ids),
        "val_examples": len(split.val.input_ids) if split.val else 0,
        "class_counts": split.counts if opts.task == "classify" else None,
        "truncated": {"train": split.train.truncated, "val": split.val.truncated if split.val else 0},
        "trainable_params": trainable,
        "steps": step,
        "train_seconds": round(seconds, 1),
        "epochs": history,
        "final": stopper.final(history),
        "early_stopping": stopper.summary(),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
    }
    save_adapter(model, opts.output, model_id, split.labels, metrics)  # type: ignore[arg-type]
    print(f"trained in {seconds:.0f} s; adapter written to {opts.output}")
    model.eval()
    return TrainResult(model, tok, split.labels, metrics)  # type: ignore[arg-type]
