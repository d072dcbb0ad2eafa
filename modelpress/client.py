"""`Client`: the v1 API from Python. Uploads, jobs followed live, downloads that resume; every refusal is one
exception type, `ApiError`, with the service's code and message.

    from modelpress import Client
    with Client("http://127.0.0.1:8000", api_key) as mp:
        model = mp.wait_for_model(mp.upload_model("mlp.pt2", progress=True))
        job = mp.wait(mp.submit(model, preset="int8-cpu"), on_progress=print)
        mp.download(job, "out/")
"""

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, overload

import httpx

from modelpress import config
from modelpress.errors import (
    CHECKSUM_MISMATCH,
    CONNECTION_FAILED,
    UNEXPECTED_RESPONSE,
    ApiError,
    retry_after_seconds,
)
from modelpress.resources import Artifact, Dataset, Job, Model, Progress
from modelpress.sse import parse_events

ProgressCallback = Callable[[Progress], None]
# Upload/download progress: True for a bar (plain lines off a terminal), or a callable(bytes_done, total).
TransferProgress = bool | Callable[[int, int | None], None]

_PAGE = 200
_CHUNK = 1024 * 1024


class _EventsUnavailable(Exception):
    pass


def _id(resource: str | Model | Dataset | Job | Artifact) -> str:
    return resource if isinstance(resource, str) else resource.id


class _CountingReader:
    """A file whose reads report how far they got (httpx reads multipart files in chunks; `fileno` lets it send a
    Content-Length instead of a chunked body)."""

    def __init__(self, file: IO[bytes], report: Callable[[int], None]):
        self._file, self._report = file, report

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        self._report(self._file.tell())
        return chunk

    def fileno(self) -> int:
        return self._file.fileno()

    def tell(self) -> int:
        return self._file.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)


class Client:
    """One service, one API key. `url` and `api_key` default to `MODELPRESS_URL` / `MODELPRESS_API_KEY`, then to
    the key `modelpress serve` saved (`$MODELPRESS_HOME/api_key`) and http://127.0.0.1:8000.

    Requests answered 429 or 503 are retried up to `max_retries` times, waiting what `Retry-After` says (or 1, 2,
    4 ... s without it); a wait longer than `max_retry_wait` is not made: the error is raised instead."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0, *,
                 max_retries: int = 5, max_retry_wait: float = 60.0):
        self.url = config.resolve_url(url)
        api_key = config.resolve_api_key(api_key)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        # The underlying httpx client, for event hooks and transport settings.
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # --- requests ---------------------------------------------------------------------------------------------

    def _retry_delay(self, response: httpx.Response, attempt: int) -> float | None:
        if response.status_code not in (429, 503) or attempt >= self.max_retries:
            return None
        delay = retry_after_seconds(response)
        delay = min(2.0 ** attempt, 30.0) if delay is None else delay
        return delay if delay <= self.max_retry_wait else None

    def _send(self, send: Callable[[], httpx.Response]) -> httpx.Response:
        """`send` makes one attempt; it is called again (a new body each time) while the service asks to retry."""
        attempt = 0
        while True:
            try:
                response = send()
            except httpx.TransportError as exc:
                raise ApiError(CONNECTION_FAILED, f"could not reach {self.url}: {exc or type(exc).__name__}") \
                    from exc
            if response.is_error:
                response.read()
                delay = self._retry_delay(response, attempt)
                if delay is None:
                    raise ApiError.from_response(response)
                response.close()
                time.sleep(delay)
                attempt += 1
                continue
            return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(lambda: self.http.request(method, path, **kwargs))
        try:
            return response.json()
        except ValueError:
            raise ApiError(UNEXPECTED_RESPONSE, f"{method} {path} did not answer JSON: {response.text[:200]!r}",
                           response.status_code) from None

    def _pages(self, path: str, params: dict[str, Any], limit: int | None) -> Iterator[dict[str, Any]]:
        cursor, seen = None, 0
        while True:
            page = self._json("GET", path, params={**params, "limit": min(_PAGE, limit or _PAGE),
                                                   **({"cursor": cursor} if cursor else {})})
            for item in page["data"]:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield item
            cursor = page.get("next_cursor")
            if not cursor:
                return

    # --- uploads ----------------------------------------------------------------------------------------------

    @contextmanager
    def _progress(self, progress: TransferProgress, description: str, total: int | None
                  ) -> Iterator[Callable[[int], None]]:
        if callable(progress):
            yield lambda done: progress(done, total)
        elif progress:
            from modelpress.display import transfer

            with transfer(description, total) as done:
                yield done
        else:
            yield lambda done: None

    def _upload(self, path: str | os.PathLike, route: str, fields: dict[str, str], progress: TransferProgress
                ) -> dict[str, Any]:
        path = Path(path)
        total = path.stat().st_size

        with self._progress(progress, f"uploading {path.name}", total) as done:
            def send() -> httpx.Response:
                with open(path, "rb") as fh:
                    files = {"file": (path.name, _CountingReader(fh, done), "application/octet-stream")}
                    return self.http.post(route, data=fields, files=files)

            response = self._send(send)
        return response.json()

    def upload_model(self, path: str | os.PathLike, name: str | None = None,
                     input_specs: dict[str, Any] | None = None, format: str | None = None,
                     progress: TransferProgress = False) -> Model:
        """Upload a `.pt2`, `.onnx` or Hugging Face archive; it is `uploaded` until a worker inspects it (see
        `wait_for_model`)."""
        fields = {"name": name, "format": format,
                  "input_specs": json.dumps(input_specs) if input_specs is not None else None}
        return Model.from_json(self._upload(path, "/v1/models", {k: v for k, v in fields.items() if v}, progress))

    def upload_dataset(self, path: str | os.PathLike, name: str | None = None,
                       progress: TransferProgress = False) -> Dataset:
        """Upload an `.npz`, `.safetensors` or `.jsonl` dataset (the format is read from the content; its role,
        calibration, train or eval, is chosen per job in `submit(datasets=...)`)."""
        return Dataset.from_json(self._upload(path, "/v1/datasets", {"name": name} if name else {}, progress))

    # --- models and datasets ----------------------------------------------------------------------------------

    def get_model(self, model: str | Model) -> Model:
        return Model.from_json(self._json("GET", f"/v1/models/{_id(model)}"))

    def list_models(self, status: str | None = None, limit: int | None = None) -> list[Model]:
        return [Model.from_json(m) for m in self._pages("/v1/models", {"status": status} if status else {}, limit)]

    def wait_for_model(self, model: str | Model, timeout: float | None = None, poll_interval: float = 0.5) -> Model:
        """The model once inspected: `ready`, or `invalid` with its `error`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            current = self.get_model(model)
            if current.status != "uploaded":
                return current
            _sleep_before(deadline, poll_interval, f"model {current.id} is still being inspected")

    def get_dataset(self, dataset: str | Dataset) -> Dataset:
        return Dataset.from_json(self._json("GET", f"/v1/datasets/{_id(dataset)}"))

    def list_datasets(self, limit: int | None = None) -> list[Dataset]:
        return [Dataset.from_json(d) for d in self._pages("/v1/datasets", {}, limit)]

    # --- jobs -------------------------------------------------------------------------------------------------

    def submit(self, model: str | Model, recipe: dict[str, Any] | None = None, preset: str | None = None,
               datasets: dict[str, str | Dataset] | None = None, tune: dict[str, Any] | None = None,
               idempotency_key: str | None = None, **fields: Any) -> Job:
        """Submit a job: a `recipe`, a `preset` or `tune`; `datasets` by role (`calibration`, `train`, `eval`);
        any other field of the job body (`target`, `name`, `min_fidelity`, `input_specs`, ...) as a keyword."""
        body = {"model_id": _id(model), **fields}
        for key, value in (("recipe", recipe), ("preset", preset), ("tune", tune)):
            if value is not None:
                body[key] = value
        if datasets:
            body["datasets"] = {role: _id(dataset) for role, dataset in datasets.items()}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return Job.from_json(self._json("POST", "/v1/jobs", json=body, headers=headers))

    def get_job(self, job: str | Job) -> Job:
        return Job.from_json(self._json("GET", f"/v1/jobs/{_id(job)}"))

    def list_jobs(self, status: str | None = None, model: str | Model | None = None,
                  limit: int | None = None) -> list[Job]:
        params = {k: v for k, v in (("status", status), ("model_id", model and _id(model))) if v}
        return [Job.from_json(j) for j in self._pages("/v1/jobs", params, limit)]

    def cancel(self, job: str | Job) -> Job:
        """Ask a job to stop (a running job ends `cancelled` at its next check); `job_finished` if it had ended."""
        return Job.from_json(self._json("POST", f"/v1/jobs/{_id(job)}/cancel"))

    def report(self, job: str | Job) -> dict[str, Any]:
        """The job's metrics: baseline and compressed measured alike, fidelity, steps, notes."""
        return self._json("GET", f"/v1/jobs/{_id(job)}/report")

    def artifacts(self, job: str | Job) -> list[Artifact]:
        return [Artifact.from_json(a) for a in self._json("GET", f"/v1/jobs/{_id(job)}/artifacts")["data"]]

    def wait(self, job: str | Job, on_progress: ProgressCallback | None = None, timeout: float | None = None,
             poll_interval: float = 1.0) -> Job:
        """The job once it has finished (`succeeded`, `failed` or `cancelled`: check `status`), following its live
        events (`GET /v1/jobs/{id}/events`) and falling back to polling `GET /v1/jobs/{id}` (with its ETag) where
        the service has no events route. `on_progress` gets each update; TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        notify = on_progress or (lambda update: None)
        try:
            return self._follow_events(_id(job), notify, deadline)
        except _EventsUnavailable:
            return self._poll(_id(job), notify, deadline, poll_interval)

    def _follow_events(self, job_id: str, notify: ProgressCallback, deadline: float | None) -> Job:
        """Reads the stream, reconnecting with `Last-Event-ID` after a drop; a stream that cannot be had at all
        (no route, not an event stream, the first connection refused or reset) raises _EventsUnavailable."""
        last_id: str | None = None
        drops, refusals = 0, 0
        while True:
            _check_deadline(deadline, f"job {job_id} has not finished")
            headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last_id} if last_id else {})}
            read_timeout = 60.0 if deadline is None else max(0.1, min(60.0, deadline - time.monotonic()))
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                      timeout=httpx.Timeout(self.timeout, read=read_timeout)) as response:
                    if response.status_code == 401:
                        response.read()
                        raise ApiError.from_response(response)
                    if response.is_error:
                        # 429 `too_many_streams` and 503 are waited out as asked; past that, and for any other
                        # refusal (no route, a job that is not there), the job is polled: that says what is wrong.
                        response.read()
                        delay = self._retry_delay(response, refusals)
                        if delay is None:
                            raise _EventsUnavailable
                        refusals += 1
                        time.sleep(delay)
                        continue
                    if not response.headers.get("content-type", "").startswith("text/event-stream"):
                        raise _EventsUnavailable
                    for event in parse_events(response.iter_lines()):
                        last_id, drops = event.id or last_id, 0
                        finished = self._on_event(event.event, event.data, notify)
                        if finished is not None:
                            return finished
                        _check_deadline(deadline, f"job {job_id} has not finished")
            except httpx.TransportError:
                if last_id is None:
                    raise _EventsUnavailable from None
            # The stream ended or broke before `end`: resume after the last event seen.
            drops += 1
            if drops > self.max_retries:
                raise _EventsUnavailable
            time.sleep(min(0.25 * 2 ** drops, 5.0))

    @staticmethod
    def _on_event(kind: str, data: str, notify: ProgressCallback) -> Job | None:
        try:
            payload = json.loads(data)
        except ValueError:
            return None
        if kind == "progress":
            notify(Progress.from_event(payload))
        elif kind == "status":
            notify(Job.from_json(payload).progress)
        elif kind == "end":
            job = Job.from_json(payload)
            notify(job.progress)
            return job
        return None

    def _poll(self, job_id: str, notify: ProgressCallback, deadline: float | None, interval: float) -> Job:
        etag, last = None, None
        while True:
            headers = {"If-None-Match": etag} if etag else {}
            response = self._send(lambda: self.http.get(f"/v1/jobs/{job_id}", headers=headers))
            if response.status_code != 304:
                job = Job.from_json(response.json())
                etag = response.headers.get("etag")
                if job.progress != last:
                    notify(job.progress)
                    last = job.progress
                if job.finished:
                    return job
            _sleep_before(deadline, interval, f"job {job_id} has not finished")

    # --- downloads --------------------------------------------------------------------------------------------

    @overload
    def download(self, what: Artifact, directory: str | os.PathLike = ".",
                 progress: TransferProgress = False) -> Path: ...

    @overload
    def download(self, what: str | Job, directory: str | os.PathLike = ".",
                 progress: TransferProgress = False) -> list[Path]: ...

    def download(self, what, directory=".", progress=False):
        """An artifact into `directory` (a Path), or every artifact of a job (a job or its id; a list of Paths).
        A file already there is checked (size, sha256) and kept, and a shorter one is resumed with `Range`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(what, Artifact):
            return self._download_artifact(what, directory, progress)
        return [self._download_artifact(a, directory, progress) for a in self.artifacts(what)]

    def _download_artifact(self, artifact: Artifact, directory: Path, progress: TransferProgress) -> Path:
        name = os.path.basename(artifact.filename.replace("\\", "/")).lstrip(".") or artifact.id
        target = directory / name
        have = target.stat().st_size if target.exists() else 0
        if have == artifact.size_bytes and _sha256(target) == artifact.sha256:
            return target
        if have >= artifact.size_bytes:
            have = 0  # not a prefix of this artifact: start again
        with self._progress(progress, f"downloading {name}", artifact.size_bytes) as done:
            self._fetch(artifact, target, have, done)
            if _sha256(target) != artifact.sha256 and have:
                self._fetch(artifact, target, 0, done)  # the partial file was not this artifact's beginning
        if _sha256(target) != artifact.sha256:
            raise ApiError(CHECKSUM_MISMATCH, f"{target} does not have the sha256 the service reported "
                                              f"({artifact.sha256})")
        return target

    def _fetch(self, artifact: Artifact, target: Path, start: int, done: Callable[[int], None]) -> None:
        headers = {"Range": f"bytes={start}-"} if start else {}
        route = f"/v1/artifacts/{artifact.id}/download"
        response = self._send(lambda: self.http.send(self.http.build_request("GET", route, headers=headers),
                                                     stream=True))
        try:
            resumed = response.status_code == 206
            with open(target, "r+b" if resumed else "wb") as out:
                if resumed:
                    out.seek(start)
                    out.truncate()
                written = start if resumed else 0
                try:
                    for chunk in response.iter_bytes(_CHUNK):
                        out.write(chunk)
                        written += len(chunk)
                        done(written)
                except httpx.TransportError as exc:
                    raise ApiError(CONNECTION_FAILED, f"the download of {artifact.filename} broke off at "
                                                      f"{written} bytes ({exc}); download again to resume") from exc
        finally:
            response.close()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_deadline(deadline: float | None, what: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise TimeoutError(what)


def _sleep_before(deadline: float | None, interval: float, what: str) -> None:
    _check_deadline(deadline, what)
    time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))
    _check_deadline(deadline, what)
