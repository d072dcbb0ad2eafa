"""What the pipeline adds for sharing: provenance in the report, the model card and HTML report among the outputs,
and, while a tune job runs, "this trial's file is the best so far" each time a trial beats the ones before."""

import hashlib
from pathlib import Path

import numpy as np

from app.core.config import Settings
from app.core.recipe import Recipe, Target, TuneSpec
from tests.helpers import save_onnx
from worker.pipeline import provenance
from worker.pipeline.files import StagedJob
from worker.pipeline.runner import run_pipeline

FP16 = {"steps": [{"op": "quantize", "method": "dynamic", "dtype": "fp16"}]}
INT8 = {"steps": [{"op": "quantize", "method": "dynamic", "dtype": "int8"}]}
PRUNED = {"steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.95}]}
UNFIT = {"steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.5, "pattern": "2:4"}]}


class Recorder:
    """A job context that keeps what the pipeline tells the worker (the sandbox's ChildContext sends the same)."""

    def __init__(self):
        self.trials: list[int] = []
        self.announced: list[tuple[int, Path, int]] = []  # the best so far: trial, file, its size then

    def progress(self, fraction, step, message, **counters):
        pass

    def check(self):
        pass

    def trial(self, index, path, figures):
        self.trials.append(index)

    def best(self, index, path):
        assert self.trials[-1] == index  # announced right after that trial finished
        self.announced.append((index, Path(path), Path(path).stat().st_size))


def _run(tmp_path, recipe=None, tune=None, datasets=None, name="m.onnx", widths=(32, 128, 8)):
    model = save_onnx(tmp_path / "m.onnx", *widths)
    staged = StagedJob(recipe=Recipe.model_validate(recipe) if recipe else None,
                       tune=TuneSpec.model_validate(tune) if tune else None, target=Target(), model_path=model,
                       model_format="onnx", model_name=name, dataset_files=datasets or {}, job_id="job_t",
                       model_id="mdl_t")
    workdir = tmp_path / "work"
    workdir.mkdir()
    ctx = Recorder()
    settings = Settings(home=tmp_path / "home", latency_runs=6, latency_warmup=1)
    return run_pipeline(staged, workdir, settings, ctx), ctx, model


def test_a_tune_job_announces_each_better_trial_as_the_best_so_far(tmp_path):
    """A failed first trial (2:4 pruning of a width not divisible by 4) once made every later trial fail too (each
    reused the failed one's folder)."""
    result, ctx, _ = _run(tmp_path, tune={"metric": "fidelity", "max_loss": 0.02, "objective": "size",
                                          "max_trials": 4, "search": [UNFIT, FP16, INT8, PRUNED]}, widths=(30, 130, 8))
    tuning = result.metrics["tuning"]
    assert [t["meets_tolerance"] for t in tuning["trials"]] == [False, True, True, False]
    assert "divisible by 4" in tuning["trials"][0]["error"] and ctx.trials == [1, 2, 3]
    assert [index for index, _, _ in ctx.announced] == [1, 2]  # int8 beat fp16; the collapsed pruning beat nothing
    assert tuning["best"] == 2 and tuning["metric"] == "fidelity"
    (_, fp16_file, fp16_size), (_, int8_file, int8_size) = ctx.announced
    assert int8_size < fp16_size and fp16_file.suffix == int8_file.suffix == ".onnx"
    assert result.metrics["compressed"]["size_bytes"] == int8_size
    kinds = sorted((o.kind, o.format) for o in result.outputs)
    assert kinds == [("card", "md"), ("model", "onnx"), ("report", "html")]
    page = next(o for o in result.outputs if o.format == "html").path.read_text()
    assert page.count("<svg") == 5 and "Tuning trials" in page


def test_a_recipe_job_announces_no_best_trial_and_reports_its_provenance(tmp_path):
    data = tmp_path / "eval.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((16, 32)).astype(np.float32), labels=rng.integers(0, 8, 16))
    result, ctx, model = _run(tmp_path, recipe=INT8, datasets={"eval": (data, "npz")}, name="<i>model.onnx")
    assert ctx.announced == [] and ctx.trials == []
    found = result.metrics["provenance"]
    assert found["inputs"]["model"] == {"id": "mdl_t", "format": "onnx", "size_bytes": model.stat().st_size,
                                        "sha256": hashlib.sha256(model.read_bytes()).hexdigest()}
    assert found["inputs"]["datasets"]["eval"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert found["recipe"]["steps"][0]["granularity"] == "per_channel"  # the defaults, resolved
    assert found["seeds"] == {"generated_inputs": None, "training": 0, "held_out_split": 0}  # real eval data
    assert set(found["versions"]) == {"modelpress", "torch", "onnxruntime", "onnx", "transformers", "numpy",
                                      "python"} and found["versions"]["numpy"] == np.__version__
    assert found["hardware"]["cpu"] and found["hardware"]["gpu"] is None and found["threads"]["measurement"] == 1
    for which in ("baseline", "compressed"):
        spread = found["latency"][which]
        assert spread["min"] <= spread["p50"] <= spread["p95"] <= spread["max"] and spread["stdev"] >= 0
        assert spread == {k: result.metrics[which]["latency_ms"][k] for k in spread}
    assert found["latency"]["runs"] == 6
    card = next(o for o in result.outputs if o.kind == "card").path.read_text()
    assert found["inputs"]["model"]["sha256"] in card and "<i>" not in card
    assert "&lt;i&gt;model\\-compressed\\.onnx" in card  # the download name, quoted in the card


def test_the_cpu_is_named_from_cpuinfo_or_the_platform(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) 8480+\n\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n\nHardware\t: BCM2835\nModel\t: Raspberry Pi 4\n")
    assert provenance.cpu_model(x86) == "Intel(R) Xeon(R) 8480+"
    assert provenance.cpu_model(arm) == "BCM2835"
    assert provenance.cpu_model(tmp_path / "missing")  # the platform's word for it
    assert provenance.resolved_recipe({"steps": [{"op": "prune", "sparsity": 0.5}]})["steps"][0]["scope"] == "layer"
