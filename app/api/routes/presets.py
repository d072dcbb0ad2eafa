"""/v1/presets: the named recipes a job can use with `"preset": name`."""

from fastapi import APIRouter

from app.api.deps import CurrentTenant
from app.api.schemas import PresetsPublic
from app.core.presets import PRESETS

router = APIRouter(prefix="/v1/presets", tags=["presets"])


@router.get("", response_model=PresetsPublic)
def list_presets(_: CurrentTenant) -> dict:
    """Every preset with its recipe, the datasets it needs and its fidelity floor."""
    return {"data": [preset.public(name) for name, preset in PRESETS.items()]}
