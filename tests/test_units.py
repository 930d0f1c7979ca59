import pytest

from tinytrain.units import format_bytes, parse_bytes


@pytest.mark.parametrize(
    "text,expected",
    [("256KB", 262144), ("256 kb", 262144), ("1MB", 1048576), ("1.5KiB", 1536), ("100", 100), (4096, 4096)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "KB", "12 parsecs", "-3KB", -1, True])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(141 * 1024) == "141.0 KB"
    assert format_bytes(3 * 1024**2) == "3.00 MB"
