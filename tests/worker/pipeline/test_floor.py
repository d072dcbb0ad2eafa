from worker.pipeline.floor import DEFAULT_MIN_FIDELITY, judge


def metrics(cosine: float, steps=(), before=None, after=None) -> dict:
    return {"fidelity": {"cosine_mean": cosine}, "baseline": {"accuracy": before},
            "compressed": {"accuracy": after}, "steps": list(steps)}


def step(op: str, cosine: float | None) -> dict:
    return {"op": op, **({"fidelity": {"cosine_mean": cosine}} if cosine is not None else {})}


def test_a_faithful_model_passes_the_default_floor():
    verdict = judge(metrics(0.995), None)
    assert verdict == {"min_fidelity": DEFAULT_MIN_FIDELITY, "cosine_mean": 0.995, "source": "default",
                       "passed": True}


def test_a_collapse_names_the_step_where_fidelity_fell_most():
    steps = [step("prune", 0.97), step("finetune", 0.99), step("quantize", 0.15), step("export", None)]
    verdict = judge(metrics(0.15, steps), None)
    assert not verdict["passed"]
    assert verdict["worst_step"]["index"] == 2 and verdict["worst_step"]["op"] == "quantize"
    assert "below the floor 0.9" in verdict["message"] and "step 2 (quantize: 0.9900 -> 0.1500)" in verdict["message"]


def test_the_jobs_floor_replaces_the_default():
    assert judge(metrics(0.85), 0.8)["passed"]
    verdict = judge(metrics(0.97), 0.98)
    assert not verdict["passed"] and verdict["source"] == "job"


def test_accuracy_may_drop_at_most_five_points():
    assert judge(metrics(0.99, before=0.90, after=0.86), None)["passed"]
    verdict = judge(metrics(0.99, before=0.90, after=0.80), None)
    assert not verdict["passed"] and "accuracy fell from 0.9000 to 0.8000" in verdict["message"]
    assert verdict["accuracy_drop"] == 0.1


def test_a_tuned_model_without_measured_steps_still_gets_a_message():
    verdict = judge(metrics(0.5, [step("quantize", None)]), None)
    assert verdict["worst_step"] is None and verdict["message"].startswith("the compressed model collapsed")
