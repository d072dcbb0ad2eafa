"""Look-ups by tenant: a resource that belongs to another tenant is reported exactly like a missing one.

The API and the workers share these, so both see the same rules for what a job may refer to.
"""

from collections.abc import Iterable, Iterator

from sqlalchemy.orm import Session

from app.core.errors import ErrorCode, ServiceError
from app.core.recipe import DatasetRefs, Recipe
from app.core.tables import Dataset, Model


def owned(session: Session, table, resource_id: str, tenant_id: str):
    """The tenant's row, or None (missing, or another tenant's)."""
    row = session.get(table, resource_id)
    return row if row is not None and row.tenant_id == tenant_id else None


def get_owned(session: Session, table, resource_id: str, tenant_id: str, kind: str):
    """The tenant's row, or 404: another tenant's resource is reported as missing, never as forbidden."""
    row = owned(session, table, resource_id, tenant_id)
    if row is None:
        raise ServiceError(ErrorCode.NOT_FOUND, f"{kind} {resource_id!r} not found")
    return row


def job_students(session: Session, tenant_id: str,
                 recipes: Iterable[Recipe]) -> Iterator[tuple[str, str, Model | None]]:
    """(field, model id, the tenant's model or None) for every uploaded student the recipes name."""
    for recipe in recipes:
        for index, step in enumerate(recipe.steps):
            student_id = getattr(getattr(step, "student", None), "model_id", None)
            if student_id is not None:
                student = owned(session, Model, student_id, tenant_id)
                yield f"recipe.steps.{index}.student.model_id", student_id, student


def job_datasets(session: Session, tenant_id: str, refs: DatasetRefs) -> Iterator[tuple[str, str, Dataset | None]]:
    """(role, dataset id, the tenant's dataset or None) for every dataset a job names."""
    for role, dataset_id in refs.model_dump().items():
        if dataset_id is not None:
            yield role, dataset_id, owned(session, Dataset, dataset_id, tenant_id)
