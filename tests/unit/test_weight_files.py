"""Reading safetensors weight files (mapped or read) and writing LoRA weights into slot banks."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from app.adapters import files
from app.models.multi_lora import MultiLoraLinear, RoutingContext

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


def test_set_lora_converts_dtypes_and_keeps_its_own_tensors_where_layouts_match() -> None:
    torch.manual_seed(0)
    for layer_dtype, adapter_dtype in [
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
    ]:
        layer = MultiLoraLinear(nn.Linear(12, 20).to(layer_dtype), RoutingContext())
        a, b = torch.randn(4, 12).to(adapter_dtype), torch.randn(20, 4).to(adapter_dtype)
        layer.set_lora(2, a, b, 0.5)
        a_t, b_t, scale = layer.loras[2]
        assert (a_t.dtype, b_t.dtype, scale) == (layer_dtype, layer_dtype, 0.5)
        assert a_t.is_contiguous() and b_t.is_contiguous()
        assert torch.equal(a_t, a.t().to(layer_dtype)) and torch.equal(b_t, b.t().to(layer_dtype))
        # B^T of a contiguous B is not contiguous: converted; A^T of a column-major A is A's own
        assert b_t.data_ptr() != b.data_ptr()
        column_major = a.t().contiguous().t()
        layer.set_lora(3, column_major, b, 1.0)
        same = layer_dtype == adapter_dtype
        assert (layer.loras[3][0].data_ptr() == column_major.data_ptr()) == same
