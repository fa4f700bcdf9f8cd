"""Fixtures of the optorch tests (the problem they share: helpers.py)."""

import pytest

from .helpers import make_params


@pytest.fixture
def params():
    return make_params()
