"""The two-engine fixture of test_engines, for every test module of the queue."""

from tests.queue.test_engines import make_queue

__all__ = ["make_queue"]
