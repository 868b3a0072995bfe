from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.api.fakes import ServerThread, our_segments, serving


@pytest.fixture
def api() -> Iterator[ServerThread]:
    before = our_segments()
    with serving() as server:
        yield server
    assert our_segments() <= before, "the server left segments behind"
