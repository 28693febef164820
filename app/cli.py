"""The ``adapterserve`` command: ``serve``, ``prepare-model`` and ``train``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from pydantic import ValidationError

from app.config import Settings


def _add_settings_options(parser: argparse.ArgumentParser) -> None:
    """One ``--name`` option per settings field; unset options fall back to the environment."""
    for name, field in Settings.model_fields.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, default=None, help=field.description, metavar="VALUE"
        )


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None
    }
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        sys.exit(f"invalid configuration:\n{exc}")


def serve(settings: Settings) -> None:
    import uvicorn

    from app.main import create_app

    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level.lower()
    )


def prepare_model(settings: Settings) -> None:
    from app.models.base import resolve_model_path

    path, model_id = resolve_model_path(settings.base_model, settings.cache_dir)
    print(f"base model {model_id} ready at {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="adapterserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("serve", "start the HTTP service"),
        ("prepare-model", "convert/cache the base model"),
    ):
        _add_settings_options(sub.add_parser(name, help=help_))
    from app.training.cli import add_train_parser, run_train

    add_train_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "train":
        logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
        sys.exit(run_train(args, _settings(argparse.Namespace())))
    settings = _settings(args)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    {"serve": serve, "prepare-model": prepare_model}[args.command](settings)


if __name__ == "__main__":
    main()
