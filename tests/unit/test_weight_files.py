"""Reading safetensors weight files (mapped or read) and writing LoRA weights into slot banks."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from app.adapters import files
from app.models.multi_lora import MultiLoraLinear, RoutingContext, write_lora

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 27 0:45 / /store rw,relatime shared:5 - nfs4 server:/export rw,vers=4.1
41 27 0:46 / /data rw,relatime master:1 - fuse.s3fs s3fs rw
"""


def test_mount_types_parse_optional_fields() -> None:
    types = files._mount_types(MOUNTINFO)
    assert types == {(0, 21): "proc", (254, 0): "ext4", (0, 45): "nfs4", (0, 46): "fuse.s3fs"}
    assert {t for t in types.values() if t in files.LOCAL_FILESYSTEMS} == {"ext4"}


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(16, 24, generator=gen),
        "b.weight": torch.randn(40, 16, generator=gen).to(torch.bfloat16),
        "c.weight": torch.randn(3, generator=gen).to(torch.float16),
        "d.weight": torch.randn(2, 5, 7, generator=gen),
    }


@pytest.mark.parametrize("mapped", [True, False])
def test_read_float_tensors_equals_safetensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mapped: bool
) -> None:
    path = tmp_path / "w.safetensors"
    save_file(_tensors(), str(path), metadata={"format": "pt"})
    monkeypatch.setattr(files, "mappable", lambda fd: mapped)
    got = files.read_float_tensors(path)
    assert got is not None
    want = load_file(str(path))
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and got[key].is_contiguous()
        assert torch.equal(got[key], tensor), key


def test_mapped_tensors_are_private_copies_on_write(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(_tensors(), str(path))
    fd = path.open("rb")
    assert files.mappable(fd.fileno())  # the test folder is on a local filesystem
    fd.close()
    before = path.read_bytes()
    got = files.read_float_tensors(path)
    assert got is not None
    got["a.weight"].fill_(7.0)  # the server never writes, but a write must not reach the store
    assert path.read_bytes() == before
    assert torch.equal(load_file(str(path))["a.weight"], _tensors()["a.weight"])


def test_misaligned_tensor_is_copied(tmp_path: Path) -> None:
    """A header whose length leaves a float32 tensor off its 4-byte alignment still reads right."""
    values = torch.arange(6, dtype=torch.float32)
    header = b'{"x":{"dtype":"F32","shape":[2,3],"data_offsets":[1,25]}}'
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" + values.numpy().tobytes())
    got = files.read_float_tensors(path)
    assert got is not None and torch.equal(got["x"], values.view(2, 3))


@pytest.mark.parametrize("payload", [b"", b"short", struct.pack("<Q", 1 << 40) + b"{}"])
def test_unreadable_files_fall_back(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(payload)
    assert files.read_float_tensors(path) is None


def test_write_lora_copies_and_scales_across_dtypes() -> None:
    torch.manual_seed(0)
    layers = [MultiLoraLinear(nn.Linear(12, 20), RoutingContext()) for _ in range(3)]
    writes, expected = [], []
    for i, layer in enumerate(layers):
        rank = 4 + 2 * i
        a = torch.randn(rank, 12).to(torch.bfloat16 if i == 1 else torch.float32)
        b = torch.randn(20, rank).to(torch.float16 if i == 2 else torch.float32)
        dst_a, dst_b = layer.slot_views(2, rank, max_slots=5)
        writes.append((dst_a, dst_b, a, b, 0.5 * (i + 1)))
        expected.append((a.float(), b.float() * 0.5 * (i + 1)))
    write_lora(writes)
    for layer, (a, b) in zip(layers, expected, strict=True):
        assert layer.lora_A is not None and layer.lora_B is not None
        r = a.shape[0]
        assert torch.allclose(layer.lora_A[2, :r], a) and torch.allclose(layer.lora_B[2, :, :r], b)
        assert not layer.lora_A[1].any() and not layer.lora_B[1].any()  # other slots untouched
    # a smaller rank in the same slot clears what the larger one left beyond it
    small_a, small_b = layers[2].slot_views(2, 2, max_slots=5)
    write_lora([(small_a, small_b, torch.ones(2, 12), torch.ones(20, 2), 1.0)])
    assert layers[2].lora_A is not None and not layers[2].lora_A[2, 2:].any()
    assert layers[2].ranks[2] == 2
