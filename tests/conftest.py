import pytest
import torch

from tests.helpers import small_model

pytest_plugins = ["tests.services"]


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny network runs fastest on one thread, and the test machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model():
    return small_model()


@pytest.fixture(params=[2, 1], ids=["in-flight-2", "in-flight-1"])
def batches_in_flight(request) -> int:
    """Every test of real worker processes runs with the default pipelining (2 batches in flight)
    and with one batch at a time; a test that needs another bound parametrizes this name itself."""
    return request.param


@pytest.fixture
def worker_factory(tmp_path_factory, tmp_path, batches_in_flight):
    """``factory(broker, topics, module=..., extra_env=..., **settings)`` starts a small-model
    worker process (``worker.max_batches_in_flight`` from ``batches_in_flight``); every worker
    still running at the end of the test is killed."""
    from tests.streaming import small_weights, small_worker

    weights = small_weights(tmp_path_factory.getbasetemp())
    started = []

    def start(broker, topics, **settings):
        settings = {"worker__max_batches_in_flight": batches_in_flight, **settings}
        worker = small_worker(broker.bootstrap, topics, weights, tmp_path / f"worker{len(started)}.log", **settings)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()
