"""The testbed's one error type."""

from __future__ import annotations


class TestbedError(Exception):
    """A testbed could not be planned, built, changed or torn down; the message says what and why.

    (pytest would try to collect a class named ``Test*`` imported into a test module; the
    ``__test__`` flag tells it this is not a test class.)
    """

    __test__ = False
