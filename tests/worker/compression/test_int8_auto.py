import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import save_foreign_cnn, save_onnx
from worker.compression.int8_auto import Candidate, auto_int8, decide, model_family
from worker.compression.normalize import normalize


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """The foreign conv net, normalized, and generated-like eval batches."""
    folder = tmp_path_factory.mktemp("cnn")
    rng = np.random.default_rng(0)
    batches = [[rng.standard_normal((2, 3, 32, 32)).astype(np.float32)] for _ in range(3)]
    path, _ = normalize(save_foreign_cnn(folder / "cnn.onnx"), folder / "normalized.onnx", batches)
    return path, batches


def auto(source, destination, batches, calibration=None):
    return auto_int8(source, destination, granularity="per_channel", exclude=[], calibration_method="minmax",
                     calibration=calibration, eval_batches=batches, eval_inputs="generated", threads=1, warmup=1,
                     runs=5)


def lstm_graph(path):
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in [("W", (1, 32, 8)), ("R", (1, 32, 8))]]
    node = helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=8)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 1, 8])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), str(path))
    return path


def test_family_follows_the_dominant_ops(tmp_path, cnn):
    assert model_family(cnn[0]) == ("convolutional", {"recurrent": 0, "convolution": 4, "matmul": 1})
    assert model_family(save_onnx(tmp_path / "mlp.onnx"))[0] == "transformer"
    assert model_family(lstm_graph(tmp_path / "lstm.onnx"))[0] == "recurrent"


def test_a_cnn_is_tried_first_as_static_calibrated_on_the_eval_inputs(tmp_path, cnn):
    source, batches = cnn
    details = auto(source, tmp_path / "q.onnx", batches)
    names = [c["name"] for c in details["candidates"]]
    assert details["family"] == "convolutional" and names[:2] == ["static_conv", "static_conv_depthwise"]
    assert all("error" not in c for c in details["candidates"])
    assert all(c["cosine"] >= 0.99 for c in details["candidates"])
    assert details["kept"] in names and (tmp_path / "q.onnx").exists()
    if details["chosen_method"] == "static":
        assert details["calibrated_on"] == {"data": "the job's evaluation inputs (generated)", "samples": 6}
        assert "calibrated on generated inputs" in details["warning"]  # no silent collapse on real inputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]  # the other candidates are removed


def test_a_given_calibration_dataset_is_used(tmp_path, cnn):
    source, batches = cnn
    calibration = [[np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)]]
    details = auto(source, tmp_path / "q.onnx", batches, calibration)
    static = details["chosen"] if details["chosen_method"] == "static" else None
    assert static is None or static["calibration_samples"] == 4
    assert static is None or details["calibrated_on"] == {"data": "calibration dataset", "samples": 4}
    assert "calibrated on generated inputs" not in details.get("warning", "")


def test_a_matmul_net_is_tried_first_as_dynamic(tmp_path):
    source = save_onnx(tmp_path / "mlp.onnx", 64, 128, 8)
    batches = [[np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)]]
    details = auto(source, tmp_path / "q.onnx", batches)
    assert details["family"] == "transformer" and details["candidates"][0]["name"] == "dynamic"


def test_the_faster_faithful_candidate_is_kept_when_the_first_is_slower():
    first, second = Candidate("static_conv", speedup=0.7, cosine=0.999), Candidate("dynamic", speedup=1.3,
                                                                                     cosine=0.995)
    assert decide([first, second]) == (1, "dynamic: faster than fp32 and faithful", None)


def test_faster_but_unfaithful_loses_to_faithful_and_says_so():
    fast, faithful = Candidate("static", speedup=2.0, cosine=0.9), Candidate("dynamic", speedup=0.8, cosine=0.999)
    index, _, warning = decide([fast, faithful])
    assert index == 1 and "no int8 candidate is faster than fp32" in warning and "0.80x" in warning


def test_when_nothing_is_faithful_the_most_faithful_is_kept_with_a_warning():
    index, reason, warning = decide([Candidate("static", speedup=2.0, cosine=0.5),
                                     Candidate("dynamic", speedup=0.5, cosine=0.9),
                                     Candidate("static_conv", error="quantization failed")])
    assert index == 1 and "most faithful" in reason and "cosine >= 0.99" in warning


def test_among_good_candidates_the_fastest_wins():
    assert decide([Candidate("static_conv", speedup=1.3, cosine=0.999),
                   Candidate("static_conv_depthwise", speedup=1.6, cosine=0.998)])[0] == 1
    with pytest.raises(ValueError):
        decide([Candidate("static", error="failed")])


def test_int8_weight_storage_is_kept_when_no_int8_computation_beats_fp32():
    """Timings as measured on the OCR angle classifier: every int8 computation slower than fp32; int8 storage with
    float compute measures at par (the same graph once folded) and is kept without a warning."""
    measured = [Candidate("static_conv", speedup=0.63, cosine=0.9998), Candidate("static", speedup=0.44, cosine=0.996),
                Candidate("dynamic", speedup=0.06, cosine=0.9956), Candidate("weights_int8", speedup=0.96,
                                                                             cosine=0.99995)]
    index, reason, warning = decide(measured)
    assert (index, warning) == (3, None) and "fp32 speed" in reason
    assert decide([Candidate("static_conv", speedup=1.4, cosine=0.999), *measured[1:]])[0] == 0
    busy = Candidate("weights_int8", speedup=0.73, cosine=0.99995, folded=True)  # a busy spell, the same graph
    assert decide([*measured[:3], busy])[0] == 3
    index, _, warning = decide([*measured[:3], Candidate("weights_int8", speedup=0.8, cosine=0.99995)])
    assert index == 3 and "not faster" in warning  # well below par: the fastest faithful, said loudly
    index, _, warning = decide([*measured[:3], Candidate("weights_int8", speedup=1.0, cosine=0.95)])
    assert index == 0 and "no int8 candidate is faster" in warning


def test_int8_weight_storage_measured_in_auto_runs_the_fp32_graph(tmp_path, cnn, monkeypatch):
    import worker.compression.int8_auto as int8_auto

    source, batches = cnn
    monkeypatch.setitem(int8_auto.PLANS, "convolutional", ("weights_int8",))
    details = auto(source, tmp_path / "q.onnx", batches)
    (candidate,) = details["candidates"]
    assert candidate["folded"] is True and candidate["cosine"] >= 0.999
    assert details["kept"] == "weights_int8" and "warning" not in details
    assert candidate["size_bytes"] < 0.4 * source.stat().st_size


def test_a_candidate_no_smaller_than_fp32_counts_only_when_every_one_is():
    bigger = Candidate("dynamic", speedup=1.5, cosine=0.999, smaller=False)
    assert decide([bigger, Candidate("static", speedup=1.2, cosine=0.999, smaller=True)])[0] == 1
    assert decide([bigger, Candidate("static", speedup=1.2, cosine=0.999, smaller=False)])[0] == 0


def test_when_no_int8_file_is_smaller_the_model_is_delivered_in_fp32(tmp_path, cnn, monkeypatch):
    """bench/zoo.py: Silero VAD (weights inside If branches) came out of every int8 candidate 1.43x larger."""
    import worker.compression.int8_auto as int8_auto

    source, batches = cnn

    def grown(name, src, dst, **_):
        model = onnx.load(str(src))
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(100_000, np.float32), "padding"))
        onnx.save(model, str(dst))
        return {"method": "static"}

    monkeypatch.setattr(int8_auto, "_quantize", grown)
    monkeypatch.setitem(int8_auto.PLANS, "convolutional", ("static_conv",))
    details = auto(source, tmp_path / "q.onnx", batches)
    assert details["kept"] == "fp32" and "delivered in fp32" in details["warning"]
    assert (tmp_path / "q.onnx").read_bytes() == source.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]


def test_on_generated_inputs_the_faithful_line_is_looser():
    """all-MiniLM-L6-v2's dynamic int8 reads cosine 0.976 on random token ids (0.992 on real sentences): without an
    eval dataset it must still win over int8 weight storage at fp32 speed."""
    from worker.compression.int8_auto import FAITHFUL_COSINE, GENERATED_FAITHFUL_COSINE

    def candidates(line):
        return [Candidate("dynamic", speedup=2.5, cosine=0.976, faithful_line=line),
                Candidate("weights_int8", speedup=1.0, cosine=0.9999, folded=True, faithful_line=line)]

    assert decide(candidates(GENERATED_FAITHFUL_COSINE))[0] == 0
    assert decide(candidates(FAITHFUL_COSINE))[0] == 1


def test_a_matmul_net_without_data_is_judged_on_the_looser_line(tmp_path):
    details = auto(save_onnx(tmp_path / "mlp.onnx"), tmp_path / "q.onnx",
                   [[np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)]])
    assert details["faithful_cosine"] == 0.95


def test_dynamic_int8_under_the_line_but_faster_is_tried_again_with_products_in_float(tmp_path, monkeypatch):
    import worker.compression.int8_auto as int8_auto

    monkeypatch.setattr(int8_auto, "FAITHFUL_COSINE", 0.9999999)  # every int8 candidate misses it
    monkeypatch.setattr(int8_auto, "paired_latency", lambda *args: (2.0, 1.0))  # and all are twice as fast
    source = save_onnx(tmp_path / "mlp.onnx", 64, 128, 8)
    batches = [[np.random.default_rng(i).standard_normal((4, 64)).astype(np.float32)] for i in range(2)]
    details = auto_int8(source, tmp_path / "q.onnx", granularity="per_channel", exclude=[],
                        calibration_method="minmax", calibration=None, eval_batches=batches,
                        eval_inputs="eval dataset", threads=1, warmup=1, runs=5)
    names = [c["name"] for c in details["candidates"]]
    assert names[:2] == ["dynamic", "dynamic_partial"]
    partial = details["candidates"][1]
    assert "error" not in partial and partial["cosine"] >= details["candidates"][0]["cosine"]


def test_products_in_float_are_tried_only_after_a_faster_unfaithful_dynamic_int8():
    from worker.compression.int8_auto import _worth_partial

    assert _worth_partial([Candidate("dynamic", speedup=1.6, cosine=0.9896)])
    assert not _worth_partial([Candidate("dynamic", speedup=1.6, cosine=0.995)])  # faithful: kept as it is
    assert not _worth_partial([Candidate("dynamic", speedup=0.8, cosine=0.98)])  # slower: nothing to keep
    assert not _worth_partial([Candidate("dynamic", error="does not run")])
    assert not _worth_partial([Candidate("static_conv", speedup=1.6, cosine=0.98)])
