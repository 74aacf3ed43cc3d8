import pytest

from tests.helpers import small_model


@pytest.fixture(scope="session")
def tiny_model():
    return small_model()
