"""Files that are not delta files: the reader and the CLI describe the file and how to make a delta file."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors_bytes

from deltastore import cli
from deltastore.format import DeltaFormatError, NotADeltaFile, read_delta, read_metadata
from tests.deltastore.test_cli import run

NOT_SAFETENSORS = "is not a safetensors file, so it is not a deltamux delta file"
HINT = "`deltamux compress --base BASE --finetuned FINETUNED --task TASK --store DIR --method dare --drop-rate 0.99`"

# Files whose first bytes do not have the safetensors layout, and how the message describes them.
NOT_SAFETENSORS_CASES = {
    "text": (b"hello, this is a text file\n", "27 bytes of text starting with 'hello, this is a'"),
    "json-brace-at-byte-8": (b'{"data":{"x": [1, 2, 3]}}', "25 bytes of JSON text starting with"),
    "binary-small-length": (struct.pack("<Q", 4) + b"\xff\xfe{[", "12 bytes of binary data starting with 04 00 00 00"),
    "one-byte": (b"\x01", "1 byte of binary data starting with 01"),
    "empty": (b"", "an empty file"),
}


@pytest.mark.parametrize("case", sorted(NOT_SAFETENSORS_CASES))
@pytest.mark.parametrize("reader", [read_metadata, read_delta])
def test_non_safetensors_file_explained(tmp_path: Path, case: str, reader) -> None:
    data, found = NOT_SAFETENSORS_CASES[case]
    path = tmp_path / "notes.txt"
    path.write_bytes(data)
    with pytest.raises(NotADeltaFile) as caught:
        reader(path)
    message = str(caught.value)
    assert message.startswith(f"'notes.txt' {NOT_SAFETENSORS}: "), message
    assert f"(found {found}" in message
    assert HINT in message
    assert "the limit is" not in message


def test_binary_file_shows_bytes_in_hex(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(1, 200)) * 20)  # no zero byte in the length prefix, so not safetensors
    with pytest.raises(NotADeltaFile) as caught:
        read_metadata(path)
    assert "3980 bytes of binary data starting with 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f 10)" in str(caught.value)


def test_control_characters_never_shown_raw(tmp_path: Path) -> None:
    path = tmp_path / "escape.txt"
    path.write_bytes(b"\x1b[31mred text and more\n")
    with pytest.raises(NotADeltaFile) as caught:
        read_metadata(path)
    message = str(caught.value)
    assert "\x1b" not in message
    assert "binary data starting with 1b 5b 33 31" in message


def test_checkpoint_is_not_a_delta(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(save_safetensors_bytes({"weight": torch.zeros(3)}))
    with pytest.raises(NotADeltaFile) as caught:
        read_metadata(path)
    message = str(caught.value)
    assert "'model.safetensors' is a safetensors file but not a deltamux delta file" in message
    assert "no 'deltamux' metadata" in message
    assert HINT in message


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (struct.pack("<Q", 1 << 40) + b"{}", "-byte header; the limit is"),
        (struct.pack("<Q", 2**63) + b"{}", "-byte header; the limit is"),
        (struct.pack("<Q", 1000) + b'{"a": 1}', "truncated"),
        (struct.pack("<Q", 10) + b"{notjson!!", "not valid JSON"),
    ],
)
def test_damaged_safetensors_keeps_precise_error(tmp_path: Path, data: bytes, reason: str) -> None:
    path = tmp_path / "demo.delta.safetensors"
    path.write_bytes(data)
    with pytest.raises(DeltaFormatError, match=reason) as caught:
        read_metadata(path)
    assert not isinstance(caught.value, NotADeltaFile)


def test_inspect_explains_text_file(tmp_path: Path, capsys) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is a text file\n")
    assert run("inspect", path) == cli.EXIT_INVALID_INPUT
    error = capsys.readouterr().err
    assert NOT_SAFETENSORS in error
    assert "27 bytes of text starting with 'hello, this is a'" in error
    assert HINT in error


def test_verify_explains_text_file(tmp_path: Path, tiny_base: Path, capsys) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is a text file\n")
    assert run("verify", path, "--base", tiny_base) == cli.EXIT_VERIFY_FAILED
    error = capsys.readouterr().err
    assert NOT_SAFETENSORS in error
    assert "27 bytes of text starting with 'hello, this is a'" in error
    assert HINT in error
