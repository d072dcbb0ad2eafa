"""Fixtures of the model-file vetting tests: a real pt2 to plant payloads in, and a marker file that only an
executed payload would create."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.app.core.vetting.modelfile_builders import TinyMLP


@pytest.fixture(scope="module")
def pt2_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "model.pt2"
    exported = torch.export.export(TinyMLP(), (torch.randn(2, 16),))
    torch.export.save(exported, path)
    return path


@pytest.fixture()
def marker(tmp_path: Path) -> Iterator[Path]:
    """A file that only a successfully executed payload would create."""
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a payload was executed"
