"""Settings: the data directory follows the XDG base directory spec unless told otherwise."""

from pathlib import Path

import pytest

from statehost.server.settings import Settings, resolve_data_dir


def test_xdg_data_home_is_the_default_data_dir(tmp_path):
    env = {"XDG_DATA_HOME": str(tmp_path / "share")}
    assert Settings.from_env(env).data_dir == tmp_path / "share" / "statehost"


def test_statehost_data_dir_wins_over_xdg_data_home(tmp_path):
    env = {"XDG_DATA_HOME": str(tmp_path / "share"), "STATEHOST_DATA_DIR": str(tmp_path / "mine")}
    assert Settings.from_env(env).data_dir == tmp_path / "mine"
    # and a flag (an override) wins over both
    assert Settings.from_env(env, data_dir=tmp_path / "flag").data_dir == tmp_path / "flag"


@pytest.mark.parametrize("xdg", [None, "", "relative/dir"])
def test_without_a_usable_xdg_data_home_it_is_local_share(xdg, tmp_path, monkeypatch):
    """The spec: an unset, empty or relative XDG_DATA_HOME means ~/.local/share."""
    monkeypatch.setenv("HOME", str(tmp_path))
    env = {} if xdg is None else {"XDG_DATA_HOME": xdg}
    assert Settings.from_env(env).data_dir == tmp_path / ".local" / "share" / "statehost"


def test_settings_made_directly_read_xdg_data_home_when_made(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "one"))
    assert Settings().data_dir == tmp_path / "one" / "statehost"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "two"))
    assert Settings().data_dir == tmp_path / "two" / "statehost"


def test_resolve_data_dir_says_where_the_directory_came_from(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_data_dir(None, {}) == (tmp_path / ".local/share/statehost",
                                         "the default, ~/.local/share/statehost")
    xdg = {"XDG_DATA_HOME": str(tmp_path / "x")}
    assert resolve_data_dir(None, xdg) == (tmp_path / "x/statehost",
                                          "$XDG_DATA_HOME/statehost")
    both = {**xdg, "STATEHOST_DATA_DIR": "~/d"}
    assert resolve_data_dir(None, both) == (tmp_path / "d", "STATEHOST_DATA_DIR")
    assert resolve_data_dir(Path("/srv/s"), both) == (Path("/srv/s"), "--data-dir")


def test_scheduler_limits_default_from_workers(tmp_path):
    assert Settings(data_dir=tmp_path).session_workers == 2  # 4 workers
    assert Settings(data_dir=tmp_path, workers=1).session_workers == 1
    assert Settings(data_dir=tmp_path, workers=7).session_workers == 3
    default = Settings(data_dir=tmp_path)
    assert (default.call_timeout, default.stuck_after) == (3600.0, 60.0)


def test_scheduler_limits_from_the_environment(tmp_path):
    env = {"STATEHOST_DATA_DIR": str(tmp_path), "STATEHOST_CALL_TIMEOUT": "0",
           "STATEHOST_SESSION_WORKERS": "3", "STATEHOST_STUCK_AFTER": "2.5",
           "STATEHOST_WORKERS": "8"}
    settings = Settings.from_env(env)
    assert (settings.call_timeout, settings.session_workers, settings.stuck_after,
            settings.workers) == (0.0, 3, 2.5, 8)
    assert Settings.from_env(env, session_workers=5, call_timeout=10).session_workers == 5


@pytest.mark.parametrize(("field", "value", "message"), [
    ("session_workers", 0, "session_workers=0 must be >= 1"),
    ("call_timeout", -1.0, r"call_timeout=-1.0 must be >= 0 seconds \(0: no default"),
    ("call_timeout", float("nan"), "call_timeout=nan must be >= 0"),
    ("stuck_after", 0.0, "stuck_after=0.0 must be > 0 seconds"),
    ("workers", 0, "workers=0 must be >= 1"),
])
def test_scheduler_limits_are_checked(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=f"statehost settings: {message}"):
        Settings(data_dir=tmp_path, **{field: value})


def test_a_bad_scheduler_variable_names_itself(tmp_path):
    with pytest.raises(ValueError, match="STATEHOST_CALL_TIMEOUT='soon' is invalid"):
        Settings.from_env({"STATEHOST_CALL_TIMEOUT": "soon", "STATEHOST_DATA_DIR": str(tmp_path)})
