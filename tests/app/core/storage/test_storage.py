"""Storage behaviour, run against both backends: a temp directory and a real (moto) S3 server."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from app.core.storage import ObjectNotFound, Storage, StorageError, open_storage, validate_key
from app.core.storage.local import LocalStorage
from app.core.storage.s3 import S3Storage

BAD_KEYS = ["../x", "/abs", "a//b", "", "a/../b", "./a", "a/.", "a/", "a\\b", "a\x00b"]
BAD_PREFIXES = ["../x", "/abs", "a/../b", "a//b", "a\x00b"]


def free_port() -> int:
    """A loopback port that was free a moment ago (and has nothing listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def rejected(call: Callable[[], object]) -> bool:
    """Whether ``call`` raises ValueError; lets one assert list every accepted bad input."""
    try:
        call()
    except ValueError:
        return True
    return False


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, moto_endpoint: str) -> str:
    """Dummy credentials and no AWS config files, so a test can never reach a real account."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("MODELPRESS_S3_ENDPOINT_URL", moto_endpoint)
    return moto_endpoint


@pytest.fixture
def s3_client(aws_env: str):
    return boto3.client("s3", endpoint_url=aws_env, region_name="us-east-1")


@pytest.fixture
def bucket(s3_client) -> str:
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return open_storage(f"file://{tmp_path / 'store'}")
    # A URL prefix, so every shared test also checks that the prefix is applied and stripped.
    return open_storage(f"s3://{request.getfixturevalue('bucket')}/artifacts")


# --- behaviour shared by every backend -------------------------------------------------


def test_put_get_roundtrip_multi_mb(store: Storage, tmp_path: Path) -> None:
    data = os.urandom(9 * 1024 * 1024 + 123)  # above boto3's 8 MiB multipart threshold
    store.put_file("tenants/t1/models/m1/model.onnx", write(tmp_path / "in.bin", data))

    out = tmp_path / "out.bin"
    store.get_file("tenants/t1/models/m1/model.onnx", out)

    assert out.read_bytes() == data
    assert store.size("tenants/t1/models/m1/model.onnx") == len(data)
    assert store.exists("tenants/t1/models/m1/model.onnx")
    assert store.list_keys() == ["tenants/t1/models/m1/model.onnx"]


def test_put_overwrites(store: Storage, tmp_path: Path) -> None:
    store.put_file("k.bin", write(tmp_path / "a", b"first version"))
    store.put_file("k.bin", write(tmp_path / "b", b"second"))
    assert b"".join(store.open_range("k.bin")) == b"second"
    assert store.size("k.bin") == 6


RANGE_DATA = bytes(range(256)) * 40  # 10240 bytes
RANGE_CASES = [
    (0, None),  # whole object
    (1234, None),  # start only
    (10, 19),  # start + end
    (0, 0),  # first byte
    (len(RANGE_DATA) - 1, len(RANGE_DATA) - 1),  # last byte
    (len(RANGE_DATA) - 1, None),  # last byte, open ended
    (100, 5000),  # spans several chunks
    (10200, 99999),  # end past EOF is clipped
    (len(RANGE_DATA), None),  # start at EOF: nothing
    (99999, 100010),  # start past EOF: nothing
]


# Cases are looped inside one test (not parametrized) so each backend is set up once.
def test_open_range(store: Storage, tmp_path: Path) -> None:
    store.put_file("blob", write(tmp_path / "blob", RANGE_DATA))
    wrong = []
    for start, end in RANGE_CASES:
        chunks = list(store.open_range("blob", start, end, chunk_size=1000))
        expected = RANGE_DATA[start : None if end is None else end + 1]
        if b"".join(chunks) != expected or not all(0 < len(c) <= 1000 for c in chunks):
            wrong.append((start, end))
    assert wrong == []


def test_open_range_empty_object(store: Storage, tmp_path: Path) -> None:
    store.put_file("empty", write(tmp_path / "empty", b""))
    assert store.size("empty") == 0
    for start, end in [(0, None), (0, 10), (5, None)]:
        assert b"".join(store.open_range("empty", start, end)) == b"", (start, end)


def test_open_range_rejects_bad_arguments(store: Storage, tmp_path: Path) -> None:
    store.put_file("blob", write(tmp_path / "blob", b"0123456789"))
    cases = [(-1, None, 10), (5, 4, 10), (0, None, 0)]
    accepted = [c for c in cases if not rejected(lambda: store.open_range("blob", *c))]
    assert accepted == []


def test_missing_key(store: Storage, tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    with pytest.raises(ObjectNotFound):
        store.get_file("no/such/key", out)
    with pytest.raises(ObjectNotFound):
        store.open_range("no/such/key")  # raised by the call, before iterating
    with pytest.raises(ObjectNotFound):
        store.size("no/such/key")
    assert not store.exists("no/such/key")
    assert not out.exists()
    assert issubclass(ObjectNotFound, StorageError)


def test_folder_is_not_an_object(store: Storage, tmp_path: Path) -> None:
    store.put_file("dir/file", write(tmp_path / "f", b"x"))
    assert not store.exists("dir")
    with pytest.raises(ObjectNotFound):
        store.size("dir")


def test_delete_is_idempotent(store: Storage, tmp_path: Path) -> None:
    store.put_file("a/b.txt", write(tmp_path / "f", b"hello"))
    store.delete("a/b.txt")
    assert not store.exists("a/b.txt")
    store.delete("a/b.txt")
    store.delete("never/existed")


def test_list_keys_and_delete_prefix(store: Storage, tmp_path: Path) -> None:
    src = write(tmp_path / "f", b"data")
    keys = [
        "tenants/t1/models/m1/model.onnx",
        "tenants/t1/models/m1/meta.json",
        "tenants/t1/models/m2/model.onnx",
        "tenants/t10/models/m1/model.onnx",
        "other.txt",
    ]
    for key in keys:
        store.put_file(key, src)

    assert store.list_keys() == sorted(keys)
    t1 = sorted(k for k in keys if k.startswith("tenants/t1/"))
    assert store.list_keys("tenants/t1") == t1  # whole segments: t10 is not under t1
    assert store.list_keys("tenants/t1/") == t1
    assert store.list_keys("tenants/nope") == []
    assert store.list_keys("other.txt") == []  # a prefix names a folder, not an object

    assert store.delete_prefix("tenants/t1/models/m1") == 2
    assert store.list_keys("tenants/t1") == ["tenants/t1/models/m2/model.onnx"]
    assert store.delete_prefix("tenants/t1/") == 1
    assert store.delete_prefix("tenants/t1") == 0
    assert store.list_keys() == ["other.txt", "tenants/t10/models/m1/model.onnx"]
    assert store.delete_prefix("") == 2
    assert store.list_keys() == []


def test_invalid_keys_rejected(store: Storage, tmp_path: Path) -> None:
    src = write(tmp_path / "f", b"x")
    calls: dict[str, Callable[[str], object]] = {
        "put_file": lambda key: store.put_file(key, src),
        "get_file": lambda key: store.get_file(key, tmp_path / "out"),
        "open_range": store.open_range,
        "size": store.size,
        "exists": store.exists,
        "delete": store.delete,
        "validate_key": validate_key,
    }
    accepted = [
        (name, key) for key in BAD_KEYS for name, call in calls.items() if not rejected(lambda: call(key))
    ]
    assert accepted == []
    assert not (tmp_path / "out").exists()


def test_invalid_prefixes_rejected(store: Storage) -> None:
    calls = {"list_keys": store.list_keys, "delete_prefix": store.delete_prefix}
    accepted = [
        (name, prefix)
        for prefix in BAD_PREFIXES
        for name, call in calls.items()
        if not rejected(lambda: call(prefix))
    ]
    assert accepted == []


def test_check_passes_when_healthy(store: Storage) -> None:
    store.check()


# --- key validation and URL dispatch ----------------------------------------------------


@pytest.mark.parametrize("key", ["a", "tenants/t1/models/m1/model.onnx", ".hidden/x..y", "a b/ü.bin"])
def test_validate_key_accepts_relative_paths(key: str) -> None:
    assert validate_key(key) == key


def test_open_storage_dispatches_on_scheme(tmp_path: Path, aws_env: str) -> None:
    local = open_storage(f"file://{tmp_path / 'root'}")
    assert isinstance(local, LocalStorage)
    assert (tmp_path / "root").is_dir()  # root is created
    s3 = open_storage("s3://some-bucket/some/prefix")
    assert isinstance(s3, S3Storage)
    assert (s3.bucket, s3.prefix) == ("some-bucket", "some/prefix")


@pytest.mark.parametrize("url", ["", "/abs/path", "http://example.com/x", "gs://bucket/x", "ftp://host/x"])
def test_open_storage_rejects_unknown_schemes(url: str) -> None:
    with pytest.raises(ValueError, match=r"file://.*s3://"):
        open_storage(url)


@pytest.mark.parametrize("url", ["file://relative/path", "file:relative", "s3://", "s3:///prefix-only", "s3://b/x/../y"])
def test_open_storage_rejects_malformed_urls(url: str, aws_env: str) -> None:
    with pytest.raises(ValueError):
        open_storage(url)


# --- local backend specifics ------------------------------------------------------------


def test_local_symlink_escape_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    write(outside / "secret", b"top secret")
    store = LocalStorage(f"file://{tmp_path / 'store'}")
    os.symlink(outside, tmp_path / "store" / "linkdir")
    os.symlink(outside / "secret", tmp_path / "store" / "linkfile")
    src = write(tmp_path / "src", b"payload")

    for key in ("linkdir/secret", "linkfile"):
        with pytest.raises(StorageError):
            store.get_file(key, tmp_path / "stolen")
        with pytest.raises(StorageError):
            store.open_range(key)
        with pytest.raises(StorageError):
            store.size(key)
        with pytest.raises(StorageError):
            store.exists(key)
        with pytest.raises(StorageError):
            store.delete(key)
    with pytest.raises(StorageError):
        store.put_file("linkdir/planted", src)
    with pytest.raises(StorageError):
        store.list_keys("linkdir")
    with pytest.raises(StorageError):
        store.delete_prefix("linkdir")

    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_bytes() == b"top secret"
    assert not (tmp_path / "stolen").exists()


def test_local_put_leaves_no_partial_files(tmp_path: Path) -> None:
    store = LocalStorage(f"file://{tmp_path / 'store'}")
    store.put_file("m/model.bin", write(tmp_path / "src", b"weights"))
    assert os.listdir(tmp_path / "store" / "m") == ["model.bin"]

    with pytest.raises(StorageError):
        store.put_file("m/other.bin", tmp_path / "missing-source")
    assert os.listdir(tmp_path / "store" / "m") == ["model.bin"]


def test_local_delete_prefix_removes_empty_dirs(tmp_path: Path) -> None:
    store = LocalStorage(f"file://{tmp_path / 'store'}")
    src = write(tmp_path / "src", b"x")
    store.put_file("tenants/t1/models/m1/a", src)
    store.put_file("tenants/t1/models/m2/b", src)

    assert store.delete_prefix("tenants/t1") == 2
    assert not (tmp_path / "store" / "tenants" / "t1").exists()
    assert store.delete_prefix("") == 0
    assert (tmp_path / "store").is_dir()  # the root itself stays


def test_local_check_fails_when_root_missing(tmp_path: Path) -> None:
    store = LocalStorage(f"file://{tmp_path / 'store'}")
    (tmp_path / "store").rmdir()
    with pytest.raises(StorageError):
        store.check()


# --- S3 backend specifics ---------------------------------------------------------------


def test_s3_url_prefix_scopes_keys(s3_client, bucket: str, tmp_path: Path) -> None:
    s3_client.put_object(Bucket=bucket, Key="outside.txt", Body=b"not ours")
    store = S3Storage(f"s3://{bucket}/artifacts/v1")
    store.put_file("m/model.bin", write(tmp_path / "src", b"weights"))

    raw = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(raw) == ["artifacts/v1/m/model.bin", "outside.txt"]
    assert store.list_keys() == ["m/model.bin"]
    assert store.delete_prefix("") == 1
    assert [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]] == ["outside.txt"]


def test_s3_missing_bucket_is_storage_error(aws_env: str, tmp_path: Path) -> None:
    store = S3Storage("s3://no-such-bucket-modelpress")
    with pytest.raises(StorageError, match="no-such-bucket-modelpress"):
        store.check()
    with pytest.raises(StorageError):
        store.put_file("k", write(tmp_path / "src", b"x"))
    with pytest.raises(StorageError):
        store.list_keys()


def test_s3_unreachable_endpoint_is_storage_error(bucket: str) -> None:
    # The explicit endpoint_url wins over MODELPRESS_S3_ENDPOINT_URL (which points at moto).
    store = S3Storage(f"s3://{bucket}", endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError):
        store.check()
    with pytest.raises(StorageError) as excinfo:
        store.exists("k")  # must not be mistaken for a missing object
    assert not isinstance(excinfo.value, ObjectNotFound)


def test_s3_endpoint_env_precedence(monkeypatch: pytest.MonkeyPatch, aws_env: str, bucket: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    S3Storage(f"s3://{bucket}").check()  # MODELPRESS_S3_ENDPOINT_URL wins

    monkeypatch.delenv("MODELPRESS_S3_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", aws_env)
    S3Storage(f"s3://{bucket}").check()  # falls back to AWS_ENDPOINT_URL_S3
