import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Contribution-analysis caches go to a fresh folder: tests never see a developer's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TINYTRAIN_CACHE", str(tmp_path_factory.mktemp("tinytrain-cache")))
    mp.setenv("TINYTRAIN_PROGRESS", "0")
    yield
    mp.undo()
