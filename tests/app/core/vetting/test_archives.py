"""Tests for app.core.vetting.archives: listing and extracting hostile zip and tar archives without harm."""

from __future__ import annotations

import gzip
import io
import stat
import struct
import tarfile
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path

import pytest

from app.core.vetting.archives import ArchiveError, archive_kind, extract_archive, list_archive, read_member

MODEL_FILES = [("bert/config.json", b'{"model_type": "bert"}'), ("bert/model.safetensors", b"\1" * 300),
               ("bert/tokenizer/vocab.txt", b"[PAD]\n[UNK]\n")]


def make_zip(path: Path, items: Iterable[tuple[str | zipfile.ZipInfo, bytes]],
             compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are written on purpose
        with zipfile.ZipFile(path, "w", compression) as archive:
            for name, data in items:
                archive.writestr(name, data)
    return path


def make_tar(path: Path, items: Iterable[tuple[str | tarfile.TarInfo, bytes]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in items:
            info = name if isinstance(name, tarfile.TarInfo) else tarfile.TarInfo(name)
            if info.isreg():
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def tar_entry(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def zip_entry(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix: the high 16 bits of external_attr are st_mode
    info.external_attr = mode << 16
    return info


def both_kinds(tmp_path: Path, items: list[tuple[str, bytes]]) -> list[Path]:
    return [make_zip(tmp_path / "m.zip", items), make_tar(tmp_path / "m.tar.gz", items)]


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def refused(call, code: str) -> ArchiveError:
    with pytest.raises(ArchiveError) as error:
        call()
    assert error.value.code == code, error.value.message
    return error.value


def test_kinds_are_judged_by_content(tmp_path: Path) -> None:
    zip_path, tgz_path = both_kinds(tmp_path, MODEL_FILES)
    tar_path = make_tar(tmp_path / "m.tar", MODEL_FILES, mode="w")
    misnamed = tmp_path / "model.zip"
    misnamed.write_bytes(tgz_path.read_bytes())
    gz_not_tar = tmp_path / "x.tar.gz"
    gz_not_tar.write_bytes(gzip.compress(b"just text" * 100))
    assert [archive_kind(p) for p in (zip_path, tgz_path, tar_path, misnamed, gz_not_tar)] == [
        "zip", "tar.gz", "tar", "tar.gz", None]


@pytest.mark.parametrize("mode", ["zip", "w:gz", "w"])
def test_good_archive_extracts_with_its_top_folder_as_root(tmp_path: Path, mode: str) -> None:
    path = (make_zip(tmp_path / "m.zip", [("bert/", b""), *MODEL_FILES]) if mode == "zip"
            else make_tar(tmp_path / "m.tar", MODEL_FILES, mode=mode))
    listing = list_archive(path)
    assert listing.root == "bert"
    assert listing.files == {"config.json": 22, "model.safetensors": 300, "tokenizer/vocab.txt": 12}
    assert listing.total_bytes == 334
    assert read_member(path, listing.member("config.json"), max_bytes=100) == b'{"model_type": "bert"}'

    dest = tmp_path / "out"
    root = extract_archive(path, dest)
    assert root == dest / "bert"
    assert files_under(dest) == {"bert/config.json", "bert/model.safetensors", "bert/tokenizer/vocab.txt"}
    assert (root / "model.safetensors").read_bytes() == b"\1" * 300


def test_files_at_the_top_and_dot_slash_names(tmp_path: Path) -> None:
    path = make_tar(tmp_path / "m.tar.gz", [(tar_entry("./", tarfile.DIRTYPE), b""), ("./config.json", b"{}"),
                                            ("./model.safetensors", b"x")])
    listing = list_archive(path)
    assert (listing.root, set(listing.files)) == ("", {"config.json", "model.safetensors"})
    assert extract_archive(path, tmp_path / "out") == tmp_path / "out"
    assert files_under(tmp_path / "out") == {"config.json", "model.safetensors"}


def test_zip_folder_marked_only_by_its_mode(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "m.zip", [(zip_entry("bert/empty", stat.S_IFDIR | 0o755), b""), *MODEL_FILES])
    assert "empty" not in list_archive(path).files
    extract_archive(path, tmp_path / "out")
    assert (tmp_path / "out" / "bert" / "empty").is_dir()


def test_macos_resource_forks_are_skipped(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "m.zip", [*MODEL_FILES, ("__MACOSX/bert/._config.json", b"\0\5\26\7")])
    assert list_archive(path).root == "bert"
    assert extract_archive(path, tmp_path / "out") == tmp_path / "out" / "bert"
    assert not (tmp_path / "out" / "__MACOSX").exists()


@pytest.mark.parametrize("name", ["../escaped.txt", "bert/../../escaped.txt", "/tmp/escaped.txt",
                                  "..\\escaped.txt", "bert\\..\\..\\escaped.txt", "C:/escaped.txt",
                                  "C:escaped.txt"])
def test_names_that_could_escape_are_refused(tmp_path: Path, name: str) -> None:
    for path in both_kinds(tmp_path, [("bert/config.json", b"{}"), (name, b"owned")]):
        refused(lambda: list_archive(path), "unsafe_archive")
        dest = tmp_path / "work" / "out"
        refused(lambda: extract_archive(path, dest), "unsafe_archive")
        assert files_under(tmp_path / "work") == set()
        assert not list(tmp_path.rglob("escaped.txt"))


@pytest.mark.parametrize("entry", [
    zip_entry("bert/link", stat.S_IFLNK | 0o777),
    zip_entry("bert/fifo", stat.S_IFIFO | 0o644),
    zip_entry("bert/device", stat.S_IFCHR | 0o644),
], ids=["symlink", "fifo", "device"])
def test_zip_links_and_special_files_are_refused(tmp_path: Path, entry: zipfile.ZipInfo) -> None:
    path = make_zip(tmp_path / "m.zip", [*MODEL_FILES, (entry, b"../../../etc/passwd")])
    refused(lambda: list_archive(path), "unsafe_archive")
    refused(lambda: extract_archive(path, tmp_path / "out"), "unsafe_archive")
    assert files_under(tmp_path / "out") == set()


@pytest.mark.parametrize("entry", [
    tar_entry("bert/link", tarfile.SYMTYPE, "/etc/passwd"),
    tar_entry("bert/hard", tarfile.LNKTYPE, "bert/config.json"),
    tar_entry("bert/fifo", tarfile.FIFOTYPE),
    tar_entry("bert/device", tarfile.CHRTYPE),
], ids=["symlink", "hardlink", "fifo", "device"])
def test_tar_links_and_special_files_are_refused(tmp_path: Path, entry: tarfile.TarInfo) -> None:
    path = make_tar(tmp_path / "m.tar.gz", [*MODEL_FILES, (entry, b"")])
    refused(lambda: list_archive(path), "unsafe_archive")
    refused(lambda: extract_archive(path, tmp_path / "out"), "unsafe_archive")
    assert files_under(tmp_path / "out") == set()


@pytest.mark.parametrize("names", [["bert/a.txt", "bert/a.txt"], ["bert/A.txt", "bert/a.txt"],
                                   ["bert/a", "bert/a/b"], ["bert/a/b", "bert/a"], ["bert/x", "bert/./x"]],
                         ids=["same", "case-only", "file-then-folder", "folder-then-file", "dot-alias"])
def test_duplicate_names_are_refused(tmp_path: Path, names: list[str]) -> None:
    for path in both_kinds(tmp_path, [(name, b"data") for name in names]):
        refused(lambda: list_archive(path), "unsafe_archive")
        refused(lambda: extract_archive(path, tmp_path / "out"), "unsafe_archive")


def test_too_many_members(tmp_path: Path) -> None:
    for path in both_kinds(tmp_path, [(f"bert/{i}.txt", b"x") for i in range(6)]):
        assert len(list_archive(path, max_files=6).files) == 6
        refused(lambda: list_archive(path, max_files=5), "archive_too_large")
        refused(lambda: extract_archive(path, tmp_path / "out", max_files=5), "archive_too_large")
        assert files_under(tmp_path / "out") == set()


def test_bomb_over_the_declared_limits_is_refused_before_writing(tmp_path: Path) -> None:
    bomb = [("bert/config.json", b"{}"), ("bert/zeros.bin", bytes(8 * 1024 * 1024))]
    for path in both_kinds(tmp_path, bomb):
        assert path.stat().st_size < 64 * 1024
        refused(lambda: list_archive(path, max_total_bytes=1024 * 1024), "archive_too_large")
        refused(lambda: list_archive(path, max_member_bytes=1024 * 1024), "archive_too_large")
        refused(lambda: extract_archive(path, tmp_path / "out", max_total_bytes=1024 * 1024), "archive_too_large")
        assert files_under(tmp_path / "out") == set()


def lie_about_sizes(path: Path, declared: int) -> None:
    """Rewrite every uncompressed-size field (local headers and central directory) of a zip."""
    data = bytearray(path.read_bytes())
    for signature, field in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(signature)
        while at != -1:
            struct.pack_into("<I", data, at + field, declared)
            at = data.find(signature, at + 4)
    path.write_bytes(bytes(data))


def test_zip_bomb_whose_headers_lie_never_writes_past_the_declared_size(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "m.zip", [("bert/zeros.bin", bytes(16 * 1024 * 1024))])
    lie_about_sizes(path, 100)
    assert list_archive(path, max_total_bytes=1000).files == {"zeros.bin": 100}
    refused(lambda: extract_archive(path, tmp_path / "out", max_total_bytes=1000), "corrupt_archive")
    assert files_under(tmp_path / "out") == set()


def test_tar_metadata_bomb_is_refused_before_it_is_read(tmp_path: Path) -> None:
    header = tar_entry("././@PaxHeader", tarfile.XHDTYPE)
    header.size = 512 * 1024 * 1024
    path = tmp_path / "m.tar"
    path.write_bytes(header.tobuf(tarfile.USTAR_FORMAT) + bytes(2048))
    refused(lambda: list_archive(path), "unsafe_archive")


def test_truncated_and_corrupt_archives(tmp_path: Path) -> None:
    zip_path, tgz_path = both_kinds(tmp_path, MODEL_FILES)
    for path in (zip_path, tgz_path):
        cut = tmp_path / f"cut-{path.name}"
        cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        refused(lambda: list_archive(cut), "corrupt_archive")
        refused(lambda: extract_archive(cut, tmp_path / "out"), "corrupt_archive")
        assert files_under(tmp_path / "out") == set()

    stored = make_zip(tmp_path / "stored.zip", MODEL_FILES, compression=zipfile.ZIP_STORED)
    flipped = bytearray(stored.read_bytes())
    at = flipped.find(b"\1" * 300)
    flipped[at + 10] ^= 0xFF  # one payload byte: only the CRC check can notice
    stored.write_bytes(bytes(flipped))
    list_archive(stored)
    refused(lambda: extract_archive(stored, tmp_path / "out"), "corrupt_archive")
    assert files_under(tmp_path / "out") == set()

    not_archive = tmp_path / "plain.txt"
    not_archive.write_bytes(b"hello")
    refused(lambda: list_archive(not_archive), "corrupt_archive")


def test_read_member_is_size_capped(tmp_path: Path) -> None:
    for path in both_kinds(tmp_path, MODEL_FILES):
        refused(lambda: read_member(path, "bert/model.safetensors", max_bytes=100), "archive_too_large")
        refused(lambda: read_member(path, "bert/missing.json", max_bytes=100), "corrupt_archive")


def test_extraction_needs_an_empty_folder(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "m.zip", MODEL_FILES)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError):
        extract_archive(path, tmp_path / "out")
    assert files_under(tmp_path / "out") == {"keep.txt"}


def test_module_is_stdlib_only() -> None:
    source = (Path(__file__).resolve().parents[4] / "app" / "core" / "vetting" / "archives.py").read_text()
    assert not any(word in source for word in ("import torch", "import numpy", "import transformers"))
