"""Runs POT's tests with transferops.compat.pot in place of POT's names (see README.md).

Swapping happens at import, before the test modules run ``import ot`` and ``from ot.x import
y``. Each swapped function counts its calls; a test reaches compat when the count moves while it
runs. With TRANSFEROPS_POT_SUITE_REPORT set, each test's outcome and whether it reached compat
are written there as JSON at the end of the session.
"""
import functools
import importlib
import json
import os

import numpy as np
import pytest

import ot
from ot.backend import get_backend_list

from transferops.compat import pot as compat

np.set_printoptions(legacy="1.25")  # as POT's own conftest: some tests compare printed numbers

CALLS = [0]
SUBMODULES = ("bregman", "unbalanced", "utils", "lp", "da")


def _counted(obj):
    if isinstance(obj, type):
        init = obj.__init__

        @functools.wraps(init)
        def counted_init(self, *args, **kwargs):
            CALLS[0] += 1
            init(self, *args, **kwargs)
        return type(obj.__name__, (obj,), {"__init__": counted_init, "__module__": obj.__module__})

    @functools.wraps(obj)
    def counted(*args, **kwargs):
        CALLS[0] += 1
        return obj(*args, **kwargs)
    return counted


SWAPPED = []
for name in ("",) + SUBMODULES:
    ours = importlib.import_module(f"transferops.compat.pot{'.' + name if name else ''}")
    theirs = importlib.import_module(f"ot{'.' + name if name else ''}")
    for attr in ours.__all__:
        if attr in SUBMODULES:
            continue
        setattr(theirs, attr, _counted(getattr(ours, attr)))
        SWAPPED.append(f"ot.{name + '.' if name else ''}{attr}")
assert compat.sinkhorn is not ot.sinkhorn


@pytest.fixture(params=get_backend_list())
def nx(request):
    yield request.param


def skip_arg(arg, value, reason=None, getter=lambda x: x):
    """POT's skip decorator: skip the test when its parameters ``arg`` take ``value``."""
    args = arg if isinstance(arg, (tuple, list)) else (arg,)
    values = value if len(args) != 1 and isinstance(value, (tuple, list)) else (value,)
    getters = getter if isinstance(getter, (tuple, list)) else [getter] * len(args)

    def wrapper(function):
        @functools.wraps(function)
        def wrapped(*a, **kw):
            if all(n in kw and g(kw[n]) == v for n, v, g in zip(args, values, getters)):
                pytest.skip(reason or f"Param {args} should be skipped for value {values}")
            return function(*a, **kw)
        return wrapped
    return wrapper


def pytest_configure(config):
    pytest.skip_arg = skip_arg
    pytest.skip_backend = functools.partial(skip_arg, "nx", getter=str)


# Tests of POT functions compat does not provide (2-D convolutional and free-support
# barycenters) that call nothing of compat's either: deselected, they would test POT alone.
POT_ONLY = ("test_convolutional_barycenter_non_square", "test_free_support_sinkhorn_barycenter",
            "test_wasserstein_bary_2d")


def pytest_collection_modifyitems(config, items):
    pot_only = [item for item in items if item.originalname.startswith(POT_ONLY)]
    if pot_only:
        config.hook.pytest_deselected(items=pot_only)
        items[:] = [item for item in items if item not in pot_only]


CALLS_BEFORE = pytest.StashKey[int]()
RESULTS = {}  # node id -> {"outcome": passed | failed | skipped, "reached": bool}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    item.stash[CALLS_BEFORE] = CALLS[0]
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    # user_properties travel with the report to pytest-xdist's controller
    report.user_properties.append(("reached", CALLS[0] > item.stash[CALLS_BEFORE]))
    return report


def pytest_runtest_logreport(report):
    entry = RESULTS.setdefault(report.nodeid, {"outcome": "passed", "reached": False})
    entry["reached"] = entry["reached"] or dict(report.user_properties).get("reached", False)
    if report.failed:
        entry["outcome"] = "failed"
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("TRANSFEROPS_POT_SUITE_REPORT")
    if path and not hasattr(session.config, "workerinput"):  # pytest-xdist's controller writes it
        with open(path, "w") as fh:
            json.dump({"swapped": SWAPPED, "tests": RESULTS}, fh, indent=1)
