import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Contribution-analysis caches go to a fresh folder: tests never see a developer's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TINYTRAIN_CACHE", str(tmp_path_factory.mktemp("tinytrain-cache")))
    mp.setenv("TINYTRAIN_PROGRESS", "0")
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _environment_restored():
    """Every test leaves the process environment as it found it. Flower's in-process simulation
    sets PYTHONPATH, RAY_* and KMP_* for its workers and never unsets them; a later test that starts
    another interpreter (the PyTorch peer) then loaded the wrong NumPy."""
    import os

    before = dict(os.environ)
    yield
    for name in set(os.environ) - set(before):
        del os.environ[name]
    for name, value in before.items():
        if os.environ.get(name) != value:
            os.environ[name] = value
