"""`inspect --weights`: tensor names, shapes and dtypes from a safetensors header, no tensor loaded."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from revdeq_cli.checkpoints.safetensors_header import read_safetensors_header
from revdeq_cli.errors import CheckpointError


def _write(tmp_path, tensors, metadata=None):
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_header_matches_the_tensors(tmp_path):
    tensors = {"wte.weight": torch.zeros(10, 4), "ln_f.bias": torch.zeros(4, dtype=torch.bfloat16),
               "steps": torch.zeros(3, dtype=torch.int64)}
    path = _write(tmp_path, tensors, metadata={"format": "pt"})
    header = read_safetensors_header(path)
    got = {t.name: (t.shape, t.dtype, t.nbytes) for t in header.tensors}
    assert got == {"wte.weight": ((10, 4), "float32", 160), "ln_f.bias": ((4,), "bfloat16", 8),
                   "steps": ((3,), "int64", 24)}
    assert header.metadata == {"format": "pt"}
    assert header.numel() == 47 and header.dtypes() == {"float32": 40, "bfloat16": 4, "int64": 3}
    assert header.file_bytes == path.stat().st_size


def test_does_not_read_tensor_data(tmp_path, monkeypatch):
    """Only the 8-byte prefix and the header are read, however large the file."""
    path = _write(tmp_path, {"big": torch.zeros(256, 1024)})
    reads = []
    real_open = type(path).open

    def spy_open(self, *args, **kwargs):
        fh = real_open(self, *args, **kwargs)
        real_read = fh.read
        fh_read = lambda n=-1: reads.append(n) or real_read(n)
        return type("Spy", (), {"read": staticmethod(fh_read), "__enter__": lambda s: s,
                                "__exit__": lambda s, *a: fh.close()})()

    monkeypatch.setattr(type(path), "open", spy_open)
    header = read_safetensors_header(path)
    assert header.tensors[0].shape == (256, 1024)
    assert sum(reads) < 200 and -1 not in reads


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda data: data[:5], "too short"),
        (lambda data: data[:-100], "truncated"),
        (lambda data: struct.pack("<Q", 10**12) + data[8:], "does not fit"),
        (lambda data: data[:8] + b"x" + data[9:], "not valid JSON"),
        (lambda data: b"PK\x03\x04" + data[4:], "does not fit|not valid JSON"),
    ],
)
def test_corrupt_files_give_one_line_naming_the_file(tmp_path, corrupt, match):
    path = _write(tmp_path, {"a": torch.zeros(50)})
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(CheckpointError, match=match) as err:
        read_safetensors_header(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def _handmade(tmp_path, header: dict, data_bytes: int):
    raw = json.dumps(header).encode()
    path = tmp_path / "hand.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_bytes)
    return path


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        ({"a": {"dtype": "Q99", "shape": [2], "data_offsets": [0, 8]}}, 8, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "need 12"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8, "outside"),
        ({"a": [1, 2]}, 0, "not an object"),
        ([1, 2], 0, "not a JSON object"),
    ],
)
def test_inconsistent_headers_are_refused(tmp_path, header, data, match):
    with pytest.raises(CheckpointError, match=match):
        read_safetensors_header(_handmade(tmp_path, header, data))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_safetensors_header(tmp_path / "nope.safetensors")
