"""fxsparse/config.py: every switch read at call time, settable in code, invalid values refused."""
import pytest

from fxsparse import config
from fxsparse.errors import FxsparseError


def test_switches_are_read_at_call_time(monkeypatch):
    monkeypatch.setenv("FXSPARSE_DEBUG", "1")
    assert config.is_debug()
    monkeypatch.setenv("FXSPARSE_DEBUG", "no")
    assert not config.is_debug()
    monkeypatch.setenv("FXSPARSE_SPATIAL_EXPORT_BUDGET", "3.5")
    assert config.spatial_export_budget() == 3.5
    monkeypatch.setenv("FXSPARSE_CACHE", "/somewhere")
    assert config.cache_dir() == "/somewhere"


def test_a_value_set_in_code_wins_until_unset(monkeypatch):
    monkeypatch.setenv("FXSPARSE_DEBUG", "0")
    try:
        config.set_debug(True)
        assert config.is_debug()
        config.set_spatial_export_budget(7)
        assert config.spatial_export_budget() == 7.0
    finally:
        config.set_debug(None)
        config.set_spatial_export_budget(None)
    assert not config.is_debug()


@pytest.mark.parametrize("value", ["soon", "0", "-1"])
def test_a_bad_budget_is_refused(monkeypatch, value):
    monkeypatch.setenv("FXSPARSE_SPATIAL_EXPORT_BUDGET", value)
    with pytest.raises(FxsparseError, match="FXSPARSE_SPATIAL_EXPORT_BUDGET"):
        config.spatial_export_budget()


def test_the_bounds_check_switch(monkeypatch):
    monkeypatch.setenv("FXSPARSE_CHECK_BOUNDS", "0")
    assert not config.is_check_bounds()
    monkeypatch.setenv("FXSPARSE_CHECK_BOUNDS", "1")
    assert config.is_check_bounds()
    try:
        config.set_check_bounds(False)
        assert not config.is_check_bounds()
    finally:
        config.set_check_bounds(None)
