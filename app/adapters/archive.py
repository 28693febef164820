"""Safe extraction of uploaded adapter archives (.zip or .tar.gz) into a private folder."""

from __future__ import annotations

import io
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from app.errors import InvalidAdapter

# metrics.json: what `adapterserve train` measured (informational, served as is)
ALLOWED_FILES = frozenset(
    {"adapter_config.json", "adapter_model.safetensors", "labels.json", "metrics.json", "README.md"}
)
# left out of the extraction: the server's own metadata (a folder copied out of a store or written
# by ``adapterserve train --into-store``; the server writes it anew at install) and hidden files
IGNORED_FILES = frozenset({"adapterserve.json"})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
IGNORED_PREFIXES = ("__MACOSX/",)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int
    max_total_bytes: int


def _check_name(raw: str) -> PurePosixPath:
    name = raw.replace("\\", "/")
    path = PurePosixPath(name)
    if name.startswith("/") or path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise InvalidAdapter(f"archive member {raw!r} has an absolute path", param="file")
    if any(part == ".." for part in path.parts):
        raise InvalidAdapter(f"archive member {raw!r} leaves the adapter folder ('..')", param="file")
    return path


def _plan(names: list[str]) -> dict[str, str]:
    """Map archive member names to file names in the adapter folder.

    The files may sit at the top of the archive or all in one folder at any depth (``tar czf
    a.tar.gz adapters_store/chat-topic`` works as well as ``tar czf a.tar.gz -C folder .``).
    Returns only the members to extract: ignored and hidden files are left out.
    """
    seen: set[str] = set()
    for n in names:  # the same member name twice: which one counts would be up to the extractor
        if n in seen:
            raise InvalidAdapter(f"archive holds {n!r} twice", param="file")
        seen.add(n)
    paths = {n: _check_name(n) for n in names}
    parents = {p.parent for p in paths.values()}
    plan: dict[str, str] = {}
    for raw, path in paths.items():
        if len(parents) > 1:
            raise InvalidAdapter(
                f"archive member {raw!r} is nested; put the adapter files at the top of the archive "
                "(or all in one folder)",
                param="file",
            )
        fname = path.name
        if fname in IGNORED_FILES or fname.startswith("."):
            continue
        if fname.lower().endswith(PICKLE_SUFFIXES):
            raise InvalidAdapter(
                f"{fname}: pickle checkpoints are not accepted; save the adapter with safetensors "
                "(save_pretrained(..., safe_serialization=True))",
                param="file",
            )
        if fname not in ALLOWED_FILES:
            raise InvalidAdapter(
                f"unexpected file {fname!r} in archive; allowed: {', '.join(sorted(ALLOWED_FILES))}",
                param="file",
            )
        if fname in plan.values():
            raise InvalidAdapter(f"archive holds {fname!r} twice", param="file")
        plan[raw] = fname
    return plan


def _copy_limited(src: IO[bytes], dst: Path, budget: list[int]) -> None:
    with dst.open("wb") as out:
        while chunk := src.read(_CHUNK):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise InvalidAdapter("archive expands beyond the allowed uncompressed size", param="file")
            out.write(chunk)


def _extract_zip(data: Path, dest: Path, limits: ArchiveLimits) -> None:
    with zipfile.ZipFile(data) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir() and not i.filename.startswith(IGNORED_PREFIXES)]
        if len(infos) > limits.max_members:
            raise InvalidAdapter(
                f"archive has {len(infos)} files; at most {limits.max_members}", param="file"
            )
        for info in infos:
            mode = (info.external_attr >> 16) & 0o170000
            if mode and mode != 0o100000:
                raise InvalidAdapter(f"archive member {info.filename!r} is not a regular file", param="file")
        if sum(i.file_size for i in infos) > limits.max_total_bytes:
            raise InvalidAdapter("archive expands beyond the allowed uncompressed size", param="file")
        plan = _plan([i.filename for i in infos])
        budget = [limits.max_total_bytes]
        for info in infos:
            if info.filename in plan:
                with zf.open(info) as src:
                    _copy_limited(src, dest / plan[info.filename], budget)


def _extract_tar(data: Path, dest: Path, limits: ArchiveLimits) -> None:
    with tarfile.open(data, mode="r:*") as tf:
        members = []
        for m in tf:
            if m.isdir() or m.name.startswith(IGNORED_PREFIXES) or m.name in (".", "./"):
                continue
            if not m.isfile():
                raise InvalidAdapter(
                    f"archive member {m.name!r} is a link or special file; only regular files are accepted",
                    param="file",
                )
            members.append(m)
            if len(members) > limits.max_members:
                raise InvalidAdapter(f"archive has more than {limits.max_members} files", param="file")
        if sum(m.size for m in members) > limits.max_total_bytes:
            raise InvalidAdapter("archive expands beyond the allowed uncompressed size", param="file")
        plan = _plan([m.name for m in members])
        budget = [limits.max_total_bytes]
        for m in members:
            if m.name not in plan:
                continue
            src = tf.extractfile(m)
            if src is None:
                raise InvalidAdapter(f"archive member {m.name!r} cannot be read", param="file")
            _copy_limited(src, dest / plan[m.name], budget)


def extract_archive(data: Path, dest: Path, limits: ArchiveLimits) -> None:
    """Extract a .zip or .tar(.gz) adapter archive into the existing empty folder ``dest``.

    The format is found from the content, not the file name. Raises :class:`InvalidAdapter` for
    anything unsafe or unexpected; ``dest`` may then hold partial files and must be discarded.
    """
    with data.open("rb") as fh:
        head = fh.read(4)
    try:
        if head.startswith(b"PK"):
            _extract_zip(data, dest, limits)
        elif head[:2] == b"\x1f\x8b" or tarfile.is_tarfile(data):
            _extract_tar(data, dest, limits)
        else:
            raise InvalidAdapter("file must be a .zip or .tar.gz archive of the adapter folder", param="file")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, io.UnsupportedOperation) as exc:
        raise InvalidAdapter(f"archive is corrupt or unreadable: {exc}", param="file") from exc
