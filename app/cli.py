"""The ``adapterserve`` command: ``serve``, ``prepare-model``, ``train``, ``upload`` and
``import-adapterhub`` (and ``tenant-key``)."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.config import Settings


def _add_settings_options(parser: argparse.ArgumentParser) -> None:
    """One ``--name`` option per settings field; unset options fall back to the environment."""
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "" if default in (None, "") else f" (default: {default})"
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=None,
            help=f"{field.description}{shown}; env ADAPTERSERVE_{name.upper()}".replace("%", "%%"),
            metavar="VALUE",
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
    """Serve until SIGTERM/SIGINT: then stop admitting (503, readiness false), let running requests
    finish for up to SHUTDOWN_GRACE_S, stop the engine, exit 0."""
    import uvicorn

    from app.main import create_app
    from app.models.base_lm import check_base
    from app.models.surface import UnsupportedBase
    from app.platform import tune_process

    try:
        check_base(settings.base_model, settings.cache_dir)
    except (UnsupportedBase, RuntimeError) as exc:
        sys.exit(f"error: {getattr(exc, 'message', exc)}")
    tune_process(keep_freed=settings.keep_freed_memory)
    app = create_app(settings)

    grace = settings.shutdown_grace_s
    margin = min(2.0, grace / 2)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn re-raises the signal after its graceful shutdown (exit status -15); a drained
            # shutdown is this service's normal end, so it exits 0. A second signal forces the exit.
            if not self.should_exit:
                # shortly before uvicorn would cancel what still runs (a 500 and a traceback per
                # request), the engine ends it: generations return their text so far, the rest 503
                timer = threading.Timer(grace - margin, _cut_off, args=(app,))
                timer.daemon = True
                timer.start()
            app.state.draining = True
            self.force_exit = self.should_exit
            self.should_exit = True

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,  # uvicorn's own messages go through the configured (JSON) handler
        access_log=False,  # the service logs each request itself, with its request id
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
    )
    DrainingServer(config).run()


def _cut_off(app: Any) -> None:
    engine = getattr(app.state, "engine", None)
    if engine is not None:
        engine.cut_off_all()


def prepare_model(settings: Settings) -> None:
    from app.models.base_lm import check_base, resolve_model_path
    from app.models.surface import UnsupportedBase

    path, model_id = resolve_model_path(settings.base_model, settings.cache_dir)
    try:
        surface = check_base(settings.base_model, settings.cache_dir)
    except UnsupportedBase as exc:
        sys.exit(f"error: {exc.message}")
    print(f"base model {model_id} ({surface.family}, {surface.kind}) ready at {path}")
    if settings.native_kernels:  # compiled now, not at the first start of an int4 base
        from app import kernels

        kernels.configure(settings.cache_dir)
        kernel = kernels.q4()
        print(f"int4 CPU kernel: {kernel.name if kernel else 'not built (PyTorch kernels)'}")


def import_adapterhub(args: argparse.Namespace, settings: Settings) -> int:
    """Convert an AdapterHub bottleneck adapter; optionally install it into the store."""
    from app.adapters.adapterhub import convert_adapterhub
    from app.adapters.publish import install_into_store
    from app.adapters.store import check_name
    from app.errors import InvalidAdapter
    from app.models.base_lm import read_spec

    name = args.name or args.source.name
    output: Path = args.output or Path("trained") / name
    try:
        check_name(name)
        spec = read_spec(settings.base_model, settings.cache_dir)
        adapter = convert_adapterhub(args.source, output, spec)
        print(
            f"converted {args.source} -> {output}: bottleneck size {adapter.rank}, "
            f"places {adapter.target_modules}, {len(adapter.blocks)} modules, activation {adapter.activation}"
        )
        if args.into_store:
            manifest = install_into_store(output, name, settings, spec)
            print(f"installed {name} version {manifest.version} into {settings.store}")
    except InvalidAdapter as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


def upload_folder(args: argparse.Namespace) -> int:
    """Pack an adapter folder (one written by ``adapterserve train``, PEFT's ``save_pretrained`` or
    copied out of a store) and upload it to a running server."""
    import os

    from app.adapters.publish import PublishError, upload

    token = args.admin_token or os.environ.get("ADAPTERSERVE_ADMIN_TOKEN")
    if not token:
        print("error: give --admin-token or set ADAPTERSERVE_ADMIN_TOKEN", file=sys.stderr)
        return 2
    if not (args.folder / "adapter_config.json").is_file():
        print(f"error: {args.folder} is not an adapter folder (no adapter_config.json)", file=sys.stderr)
        return 2
    name = args.name or args.folder.resolve().name
    try:
        out = upload(args.folder, name, args.url, token)
    except PublishError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"uploaded {name} version {out['version']} ({out['task']}, {out['kind']}) to {args.url}")
    return 0


def _add_upload_parser(sub: Any) -> None:
    from app.training.cli import DefaultsHelpFormatter

    p = sub.add_parser(
        "upload",
        help="pack an adapter folder and upload it to a running server (POST /admin/adapters)",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("folder", type=Path, help="adapter folder (adapter_config.json, weights, labels.json...)")
    p.add_argument("--name", help="adapter name (default: the folder's name)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--admin-token", help="admin token (default: ADAPTERSERVE_ADMIN_TOKEN)")


def _add_import_parser(sub: Any) -> None:
    p = sub.add_parser(
        "import-adapterhub",
        help="convert a bottleneck adapter saved by AdapterHub `adapters` (safetensors) to the served format",
    )
    p.add_argument(
        "source", type=Path, help="folder written by model.save_adapter(..., use_safetensors=True)"
    )
    p.add_argument("--name", help="adapter name (default: the source folder's name)")
    p.add_argument("--output", type=Path, help="output folder (default: trained/<name>)")
    p.add_argument("--into-store", action="store_true", help="install into the store (ADAPTERSERVE_STORE)")


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
    _add_upload_parser(sub)
    _add_import_parser(sub)
    key = sub.add_parser("tenant-key", help="print what the tenants file lists for a key (its sha256)")
    key.add_argument("key", help="the API key a tenant's clients send as Authorization: Bearer KEY")
    args = parser.parse_args(argv)
    if args.command == "tenant-key":
        from app.tenants import key_hash

        print(key_hash(args.key))
        return
    if args.command == "upload":
        sys.exit(upload_folder(args))
    if args.command == "import-adapterhub":
        sys.exit(import_adapterhub(args, _settings(argparse.Namespace())))
    if args.command == "train":
        logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
        sys.exit(run_train(args, _settings(argparse.Namespace())))
    settings = _settings(args)
    from app.logs import configure

    configure(settings.log_level, settings.log_format)
    {"serve": serve, "prepare-model": prepare_model}[args.command](settings)


if __name__ == "__main__":
    main()
