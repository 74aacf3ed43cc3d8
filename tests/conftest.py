import pytest

from tests.helpers import small_model

pytest_plugins = ["tests.services"]


@pytest.fixture(scope="session")
def tiny_model():
    return small_model()
