import pytest

from server.clock import FakeClock
from server.engine.engine import Engine
from tests.engine.support import new_engine


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def engine(clock: FakeClock) -> Engine:
    return new_engine(clock)
