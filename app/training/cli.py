"""Options of ``adapterserve train`` and what it does with them (train, then optionally hand over)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.adapters.store import Manifest
    from app.config import Settings

# task-dependent defaults: a fresh classification head learns faster than a chat style
_DEFAULT_LR = {"classify": 5e-4, "generate": 2e-4}
_BOTTLENECK_LR = 1e-3  # the up projection starts at zero; bottleneck modules want a larger step
_IA3_LR = 5e-3  # a few thousand scales near 1: a larger step still (PEFT's IA3 examples use 3e-3 to 1e-2)
# small encoders (all-MiniLM-L6-v2: 22.7 M parameters) train a fresh pooler and classifier with the
# adapter: measured on 600 reviews, 6 epochs at 2e-3 (a minute each on 2 cores) lifted macro-F1
# from 0.26 (the majority class) to 0.48-0.49 for LoRA and bottleneck alike; lower rates or fewer
# epochs stayed near the majority class
_ENCODER_LR, _ENCODER_EPOCHS = 2e-3, 6
# early stopping is off by default: on three corpora (scripts/early_stopping.py, docs/adapters.md)
# the fully annealed last epoch beat the best epoch chosen on a small validation split
_PATIENCE = 0


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default (where it has one and the help does not say it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def add_train_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "train",
        help="train a LoRA adapter on a CSV/JSONL file",
        description=(
            "Train a LoRA adapter with PEFT on the configured base model (ADAPTERSERVE_BASE_MODEL) and "
            "write a store-ready folder: adapter files, labels.json (classify) and metrics.json."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--task", choices=["classify", "generate"], required=True, help="what the adapter does")
    p.add_argument("--data", type=Path, required=True, help=".csv or .jsonl training file")
    p.add_argument("--output", type=Path, help="output folder (default: trained/<name>)")
    p.add_argument("--name", help="adapter name (default: the output folder's name)")
    p.add_argument("--val-data", type=Path, help="validation file (default: hold out --val-fraction)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held out when no --val-data (0 = none)")
    g = p.add_argument_group("columns")
    g.add_argument("--text-column", default="text", help="classify: the text column")
    g.add_argument("--label-column", default="label", help="classify: the label column")
    g.add_argument("--prompt-column", default="prompt", help="generate: the prompt column")
    g.add_argument("--response-column", default="response", help="generate: the response column")
    g.add_argument("--messages-column", default="messages", help="chat messages (list of role/content)")
    g.add_argument("--system", help="system message added to conversations that have none")
    k = p.add_argument_group("adapter kind")
    k.add_argument(
        "--kind",
        choices=["lora", "dora", "ia3", "bottleneck"],
        default="lora",
        help="LoRA, DoRA or IA3 (PEFT), or a bottleneck adapter",
    )
    k.add_argument(
        "--placement",
        choices=["attention", "ffn", "both", "houlsby", "pfeiffer"],
        default="ffn",
        help="bottleneck: after the attention and/or feed-forward output (houlsby = both, pfeiffer = ffn)",
    )
    k.add_argument(
        "--bottleneck-size", type=int, help="bottleneck width (default: hidden / reduction factor)"
    )
    k.add_argument("--reduction-factor", type=float, default=16.0, help="bottleneck: hidden / width")
    k.add_argument("--activation", choices=["relu", "gelu", "silu", "tanh"], default="relu")
    h = p.add_argument_group("LoRA and optimisation")
    h.add_argument("--rank", type=int, default=8, help="LoRA rank")
    h.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scaling = alpha / rank)")
    h.add_argument("--target-modules", default="all-linear", help="comma-separated names or all-linear")
    h.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout while training")
    h.add_argument(
        "--epochs", type=int, help="passes over the training data (default: 2; 6 on an encoder base)"
    )
    h.add_argument(
        "--lr",
        type=float,
        help="learning rate (default: 5e-4 classify, 2e-4 generate, 1e-3 bottleneck; 2e-3 on encoders)",
    )
    h.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step")
    h.add_argument("--max-length", type=int, default=256, help="longer examples are truncated (reported)")
    h.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    h.add_argument(
        "--patience",
        type=int,
        default=_PATIENCE,
        help="early stopping: stop after this many epochs without a better validation score and keep "
        "the best epoch (0, the default: off, the last epoch is kept)",
    )
    h.add_argument("--seed", type=int, default=0, help="random seed (data order, initialisation)")
    h.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    h.add_argument(
        "--quantization",
        choices=["auto", "none", "bf16", "int8", "int4", "w8a8"],
        default=None,
        help="train on the base's weights as a server with this ADAPTERSERVE_QUANTIZATION computes "
        "with them (QLoRA-style: the adapter learns on the weights it is served with; w8a8 also on its "
        "activations); default: "
        "ADAPTERSERVE_QUANTIZATION, else none",
    )
    o = p.add_argument_group("hand-over")
    o.add_argument("--upload", metavar="URL", help="upload to a running server, e.g. http://127.0.0.1:8000")
    o.add_argument("--admin-token", help="admin token for --upload (default: ADAPTERSERVE_ADMIN_TOKEN)")
    o.add_argument(
        "--into-store", action="store_true", help="install into the store folder (ADAPTERSERVE_STORE)"
    )


def run_train(args: argparse.Namespace, settings: Settings) -> int:
    """Train, then upload or install; return the process exit status (2 = bad data or options)."""
    from app.adapters.publish import PublishError, upload
    from app.adapters.store import check_name
    from app.errors import InvalidAdapter
    from app.training.data import DataError
    from app.training.trainer import TrainOptions, train

    name = args.name or (args.output.name if args.output else args.data.stem)
    try:
        check_name(name)
    except InvalidAdapter as exc:
        print(f"error: {exc.message} (choose one with --name)", file=sys.stderr)
        return 2
    token = args.admin_token or os.environ.get("ADAPTERSERVE_ADMIN_TOKEN")
    if args.upload and not token:
        print("error: --upload needs --admin-token or ADAPTERSERVE_ADMIN_TOKEN", file=sys.stderr)
        return 2
    from app.models.base_lm import check_base
    from app.models.surface import UnsupportedBase

    try:
        encoder = check_base(settings.base_model, settings.cache_dir).kind == "encoder"
    except UnsupportedBase as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    opts = TrainOptions(
        task=args.task,
        data=args.data,
        output=args.output or Path("trained") / name,
        val_data=args.val_data,
        val_fraction=args.val_fraction,
        text_column=args.text_column,
        label_column=args.label_column,
        prompt_column=args.prompt_column,
        response_column=args.response_column,
        messages_column=args.messages_column,
        system=args.system,
        kind=args.kind,
        placement=args.placement,
        bottleneck_size=args.bottleneck_size,
        reduction_factor=args.reduction_factor,
        activation=args.activation,
        rank=args.rank,
        alpha=args.alpha,
        target_modules=args.target_modules,
        dropout=args.dropout,
        epochs=args.epochs if args.epochs is not None else (_ENCODER_EPOCHS if encoder else 2),
        lr=args.lr
        if args.lr is not None
        else (_ENCODER_LR if encoder else _default_lr(args.kind, args.task)),
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_steps=args.max_steps,
        patience=args.patience or None,
        seed=args.seed,
        base_model=settings.base_model,
        cache_dir=settings.cache_dir,
        device=args.device,
        quantization=args.quantization or settings.quantization,
    )
    try:
        metrics = train(opts).metrics
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("held-out metrics:", json.dumps(metrics["final"]))
    try:
        if args.upload:
            out = upload(opts.output, name, args.upload, token or "")
            print(f"uploaded {name} version {out['version']} to {args.upload}")
        if args.into_store:
            manifest = _install(opts.output, name, settings)
            print(f"installed {name} version {manifest.version} into {settings.store}")
    except (PublishError, InvalidAdapter) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    return 0


def _default_lr(kind: str, task: str) -> float:
    return {"bottleneck": _BOTTLENECK_LR, "ia3": _IA3_LR}.get(kind, _DEFAULT_LR[task])


def _install(folder: Path, name: str, settings: Settings) -> Manifest:
    from app.adapters.publish import install_into_store
    from app.models.base_lm import read_spec

    spec = read_spec(settings.base_model, settings.cache_dir)
    return install_into_store(folder, name, settings, spec)
