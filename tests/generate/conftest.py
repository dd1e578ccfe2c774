"""The target-side tests share ``one_thread`` with the devkit tests."""

from tests.devkit.conftest import one_thread  # noqa: F401  (re-exported fixture)
