"""The fidelity floor: a job's final model is judged against the original before it is handed back, so a recipe
that destroys the model ends `failed` with `fidelity_collapse` instead of `succeeded` with a number nobody reads.

Only the final model is judged; the steps before it are reported, not judged (a pruning step before a recovery
step may dip). The floor is the job's `min_fidelity`, else its preset's, else DEFAULT_MIN_FIDELITY; with labelled
eval data the accuracy may also drop at most MAX_ACCURACY_DROP (absolute) from the original's.
"""

from typing import Any

from app.core.recipe import DEFAULT_MIN_FIDELITY

MAX_ACCURACY_DROP = 0.05


def judge(metrics: dict[str, Any], min_fidelity: float | None) -> dict[str, Any]:
    """metrics["fidelity_floor"]: the floor, what was measured, whether it held and, when not, why in words."""
    floor = DEFAULT_MIN_FIDELITY if min_fidelity is None else min_fidelity
    cosine = metrics["fidelity"]["cosine_mean"]
    verdict: dict[str, Any] = {"min_fidelity": floor, "cosine_mean": cosine,
                               "source": "default" if min_fidelity is None else "job"}
    failures = []
    if cosine < floor:
        failures.append(f"output cosine {cosine:.4f} is below the floor {floor:g}")
    before, after = metrics["baseline"].get("accuracy"), metrics["compressed"].get("accuracy")
    if before is not None and after is not None:
        verdict.update(accuracy_drop=round(before - after, 6), max_accuracy_drop=MAX_ACCURACY_DROP)
        if before - after > MAX_ACCURACY_DROP:
            failures.append(f"accuracy fell from {before:.4f} to {after:.4f}, more than "
                            f"{MAX_ACCURACY_DROP * 100:g} points")
    verdict["passed"] = not failures
    if failures:
        verdict["worst_step"] = worst_step(metrics.get("steps") or [])
        where = f"; fidelity fell most at {verdict['worst_step']['where']}" if verdict["worst_step"] else ""
        verdict["message"] = "the compressed model collapsed: " + " and ".join(failures) + where
    return verdict


def worst_step(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The measured step whose output cosine fell most from the one before it (the original counts as 1.0)."""
    previous, worst = 1.0, None
    for index, step in enumerate(steps):
        fidelity = step.get("fidelity")
        if not isinstance(fidelity, dict) or fidelity.get("cosine_mean") is None:
            continue
        drop = previous - fidelity["cosine_mean"]
        if worst is None or drop > worst["drop"]:
            worst = {"index": index, "op": step.get("op"), "drop": round(drop, 6),
                     "where": f"step {index} ({step.get('op')}: {previous:.4f} -> {fidelity['cosine_mean']:.4f})"}
        previous = fidelity["cosine_mean"]
    return worst
