"""Archives: Hugging Face uploads (zip / tar.gz) that try to write outside their folder, expand without end, or
are broken. The API refuses them at upload (415) from the listing alone; the worker, which extracts, refuses
them again (model `invalid` with the reason). The sentinel folder they aim at is never touched, and nothing
is left in the worker's scratch space."""

import os
import stat
import struct
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.hostile.builders import hf_files, hf_zip, tar_gz_bytes, zip_bytes

# (file to write outside, the same path relative to the extraction folder) -> archive content
Build = Callable[[Path, str], bytes]
BOMB_BYTES = 64 * 1024 * 1024  # expands from ~64 KiB; the limit is 4 x the 5 MiB upload limit of these tests


def base(top: str = "model") -> list[tuple[str, bytes]]:
    return [(f"{top}/{name}", data) for name, data in hf_files().items()]


def zip_traversal(target: Path, escape: str) -> bytes:
    return zip_bytes([*base(), (escape, b"owned")])


def tar_traversal(target: Path, escape: str) -> bytes:
    return tar_gz_bytes([*base(), (escape, b"owned")])


def zip_absolute(target: Path, escape: str) -> bytes:
    return zip_bytes([*base(), (str(target), b"owned")])


def tar_absolute(target: Path, escape: str) -> bytes:
    return tar_gz_bytes([*base(), (str(target), b"owned")])


def zip_symlink(target: Path, escape: str) -> bytes:
    """A link to the sentinel folder, then a file written through it."""
    link = zipfile.ZipInfo("model/link")
    link.create_system = 3  # Unix: the high 16 bits of external_attr are the st_mode
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    return zip_bytes([*base(), (link, str(target.parent).encode()), (f"model/link/{target.name}", b"owned")])


def tar_symlink(target: Path, escape: str) -> bytes:
    link = tarfile.TarInfo("model/link")
    link.type, link.linkname = tarfile.SYMTYPE, str(target.parent)
    return tar_gz_bytes([*base(), (link, b""), (f"model/link/{target.name}", b"owned")])


def tar_hardlink(target: Path, escape: str) -> bytes:
    link = tarfile.TarInfo("model/keep.txt")
    link.type, link.linkname = tarfile.LNKTYPE, str(target.parent / "keep.txt")
    return tar_gz_bytes([*base(), (link, b"")])


def zip_bomb(target: Path, escape: str) -> bytes:
    return zip_bytes([*base(), ("model/zeros.bin", bytes(BOMB_BYTES))])


def tar_bomb(target: Path, escape: str) -> bytes:
    return tar_gz_bytes([*base(), ("model/zeros.bin", bytes(BOMB_BYTES))])


def too_many_files(target: Path, escape: str) -> bytes:
    return zip_bytes([*base(), *((f"model/extra/{i}.txt", b"") for i in range(2001))])


def truncated_zip(target: Path, escape: str) -> bytes:
    whole = hf_zip(hf_files())
    return whole[: len(whole) // 2]


def truncated_tar_gz(target: Path, escape: str) -> bytes:
    whole = tar_gz_bytes(base())
    return whole[: len(whole) // 2]


def not_really_gzip(target: Path, escape: str) -> bytes:
    return b"\x1f\x8b\x08\x00" + os.urandom(4096)


def zip_bomb_with_lying_headers(target: Path, escape: str) -> bytes:
    """vocab.txt (a file the worker extracts) declares 100 bytes and inflates to 64 MiB: the listing looks small,
    only extraction can tell."""
    data = bytearray(zip_bytes([*base(), ("model/vocab.txt", bytes(BOMB_BYTES))]))
    name = b"model/vocab.txt"
    local = data.index(name) - 30  # the name follows the 30-byte local header...
    central = data.index(name, local + 31) - 46  # ...and the 46-byte central directory entry
    struct.pack_into("<I", data, local + 22, 100)  # uncompressed size
    struct.pack_into("<I", data, central + 24, 100)
    return bytes(data)


def zip_with_corrupt_member(target: Path, escape: str) -> bytes:
    """One flipped byte in a stored member: the listing is fine, the CRC check on extraction is not."""
    data = bytearray(zip_bytes(base(), compression=zipfile.ZIP_STORED))
    at = data.find(b"\x00" * 64)  # inside the zero weights of model.safetensors
    data[at] ^= 0xFF
    return bytes(data)


# Refused from the listing at upload (the code), and again by the worker's extraction (words of its reason).
REFUSED_AT_UPLOAD: list[tuple[Build, str, str]] = [
    (zip_traversal, "unsafe_archive", "goes up with '..'"),
    (tar_traversal, "unsafe_archive", "goes up with '..'"),
    (zip_absolute, "unsafe_archive", "is an absolute path"),
    (tar_absolute, "unsafe_archive", "is an absolute path"),
    (zip_symlink, "unsafe_archive", "archive member 'model/link' is a symbolic link"),
    (tar_symlink, "unsafe_archive", "archive member 'model/link' is a link"),
    (tar_hardlink, "unsafe_archive", "archive member 'model/keep.txt' is a link"),
    (zip_bomb, "archive_too_large", "'model/zeros.bin' is 67108864 bytes; the limit is 20971520 bytes per file"),
    (tar_bomb, "archive_too_large", "'model/zeros.bin' is 67108864 bytes; the limit is 20971520 bytes per file"),
    (too_many_files, "archive_too_large", "the archive has more than 2000 members"),
    (truncated_zip, "corrupt_archive", "the archive is corrupt or truncated"),
    (truncated_tar_gz, "corrupt_archive", "the archive is corrupt or truncated"),
    (not_really_gzip, "unsupported_format", "the file is not a zip, tar or tar.gz archive"),
]
ATTACK_IDS = [build.__name__ for build, _, _ in REFUSED_AT_UPLOAD]
# The listing the API reads is sound; the bytes are not, which only the worker's extraction can see.
REFUSED_AT_EXTRACTION: list[tuple[Build, str]] = [
    (zip_bomb_with_lying_headers, "Bad CRC-32 for file 'model/vocab.txt'"),  # stopped at the declared 100 bytes
    (zip_with_corrupt_member, "Bad CRC-32 for file 'model/model.safetensors'"),
]


def escape_from_extraction(home: Path, target: Path) -> str:
    """`target` relative to the folder the worker extracts into (MODELPRESS_HOME/work/inspect-*/hf-*)."""
    return os.path.relpath(target, home / "work" / "inspect-x" / "hf-x")


def storage_keys(settings) -> list[str]:
    from app.core.storage import open_storage

    return open_storage(settings.resolved_storage_url()).list_keys("tenants")


@pytest.mark.parametrize(("build", "code"), [(build, code) for build, code, _ in REFUSED_AT_UPLOAD], ids=ATTACK_IDS)
def test_hostile_archive_upload_is_415(client, auth, upload, settings, sentinel: Path, build: Build,
                                       code: str) -> None:
    target = sentinel / "pwned.txt"
    response = upload(build(target, escape_from_extraction(settings.resolved_home(), target)), filename="bert.zip")
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert client.get("/v1/models", headers=auth).json()["data"] == []
    assert storage_keys(settings) == []
    assert list(settings.upload_tmp_dir().glob("upload-*")) == []


@pytest.mark.parametrize(("build", "reason"), [(build, reason) for build, _, reason in REFUSED_AT_UPLOAD],
                         ids=ATTACK_IDS)
def test_hostile_archive_that_bypassed_the_api_is_invalid(tmp_path: Path, add_model, worker, sentinel: Path,
                                                          build: Build, reason: str) -> None:
    """Stored without the API's listing check: the worker's extraction refuses it and writes nowhere else."""
    target = sentinel / "pwned.txt"
    path = tmp_path / "evil.archive"
    path.write_bytes(build(target, escape_from_extraction(worker.settings.resolved_home(), target)))
    model = worker.inspect(add_model(path, "hf").id)
    assert model.status == "invalid"
    assert model.error.startswith("model archive: ") and reason in model.error
    assert worker.leftovers() == []


@pytest.mark.parametrize(("build", "reason"), REFUSED_AT_EXTRACTION,
                         ids=[build.__name__ for build, _ in REFUSED_AT_EXTRACTION])
def test_archive_only_extraction_can_judge_is_invalid(client, auth, upload, worker_for_api, sentinel: Path,
                                                      build: Build, reason: str) -> None:
    """Accepted at upload (the listing is sound), then `invalid` with the reason once the worker extracts it."""
    response = upload(build(sentinel / "pwned.txt", "unused"), filename="bert.zip")
    assert response.status_code == 201, response.text
    model = worker_for_api.inspect(response.json()["id"])
    assert model.status == "invalid" and reason in model.error
    shown = client.get(f"/v1/models/{model.id}", headers=auth).json()
    assert shown["status"] == "invalid" and shown["error"] == model.error
    assert worker_for_api.leftovers() == []


def test_member_name_longer_than_a_file_name_is_refused_at_upload_and_in_the_worker(upload, tmp_path, add_model,
                                                                                     worker) -> None:
    """A 300-byte name raised OSError while extracting in the worker, and the model stayed `uploaded`."""
    data = zip_bytes([*base(), (f"model/{'a' * 300}.txt", b"x")])
    response = upload(data, filename="bert.zip")
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsafe_archive"
    assert "longer than a file name may be" in response.json()["error"]["message"]
    path = tmp_path / "long.zip"
    path.write_bytes(data)
    model = worker.inspect(add_model(path, "hf").id)
    assert model.status == "invalid" and "longer than a file name may be" in model.error
    assert worker.leftovers() == []


def test_only_the_files_a_model_uses_are_extracted(tmp_path) -> None:
    """Code and libraries shipped in an archive are never written to disk, let alone loaded."""
    from worker.formats.hf import _extract

    archive = tmp_path / "m.zip"
    archive.write_bytes(hf_zip({**hf_files(), "modeling_evil.py": b"import os", "libevil.so": b"ELF",
                                "vocab.txt": b"a\n", "README.md": b"# card"}))
    root = _extract(archive, tmp_path / "work", None)
    assert sorted(path.name for path in root.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                            "vocab.txt"]
