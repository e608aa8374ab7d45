"""Shared test fixtures: seeds, NaN-poisoned allocations, hypothesis profiles, lane markers."""
import inspect
import os

import pytest
import torch

try:
    from hypothesis import HealthCheck, settings
    settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("gpu", max_examples=30, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is a test extra; tests that need it import it themselves
    pass

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (GPU lane)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


_REAL = {"empty": torch.empty, "empty_like": torch.empty_like, "new_empty": torch.Tensor.new_empty}


def _from_library() -> bool:
    frame = inspect.currentframe().f_back.f_back
    name = frame.f_globals.get("__name__", "") if frame is not None else ""
    return name.startswith("fastattn")


def _poison(t):
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def nan_poison(request, monkeypatch):
    """Library allocations through torch.empty* come back full of NaN, so unwritten outputs show.

    Tests marked ``no_poison`` (torch.compile tests: dynamo must not trace this patch) opt out."""
    if request.node.get_closest_marker("no_poison"):
        yield
        return
    def empty(*a, **kw):
        t = _REAL["empty"](*a, **kw)
        return _poison(t) if _from_library() else t

    def empty_like(*a, **kw):
        t = _REAL["empty_like"](*a, **kw)
        return _poison(t) if _from_library() else t

    def new_empty(self, *a, **kw):
        t = _REAL["new_empty"](self, *a, **kw)
        return _poison(t) if _from_library() else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)
    yield


def load_bench_module(name: str):
    """Import bench/<name>.py as a module (bench/ is a folder of scripts, not a package)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
