"""Path and query parameters the routes share, described (with examples) for /docs and generated clients."""

from typing import Annotated

from fastapi import Path, Query

from app.api.pagination import MAX_LIMIT


def _id(kind: str, example: str) -> object:
    return Path(description=f"the {kind}'s id (another tenant's answers 404)", examples=[example])


Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description=f"items per page, 1-{MAX_LIMIT}", examples=[50])]
Cursor = Annotated[str | None, Query(description="the `next_cursor` of the previous page; omit for the first page",
                                     examples=["am9iXzAxOTNhMWIyYzNkNWEwYjFjMmQzZTRmNQ"])]
ModelId = Annotated[str, _id("model", "mdl_0193a1b2c3d4e5f60718293a")]
DatasetId = Annotated[str, _id("dataset", "ds_0193a1b2c3d4f0e1d2c3b4a5")]
JobId = Annotated[str, _id("job", "job_0193a1b2c3d5a0b1c2d3e4f5")]
ArtifactId = Annotated[str, _id("artifact", "art_0193a1b2c3d6a1b2c3d4e5f6")]
KeyId = Annotated[str, _id("key", "key_0193a1b2c3d7b2c3d4e5f6a7")]
