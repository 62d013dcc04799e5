"""The shared error convention of every command (bunny.cli)."""

import pytest

from bunny.cli import UserError, run_cli


def _fails_with(error):
    def body():
        raise error
    return body


def test_user_error_is_one_line_and_status_2(capsys, monkeypatch):
    monkeypatch.delenv("BUNNY_DEBUG", raising=False)
    assert run_cli("prog", _fails_with(UserError("bad --flag", ["a.json: record 3: no answer", "b.png: truncated"]))) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["prog: error: bad --flag", "  - a.json: record 3: no answer", "  - b.png: truncated"]
    assert "Traceback" not in err


def test_debug_flag_or_env_reraises(monkeypatch):
    monkeypatch.delenv("BUNNY_DEBUG", raising=False)
    with pytest.raises(UserError):
        run_cli("prog", _fails_with(UserError("x")), debug=True)
    monkeypatch.setenv("BUNNY_DEBUG", "1")
    with pytest.raises(UserError):
        run_cli("prog", _fails_with(UserError("x")))


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    monkeypatch.delenv("BUNNY_DEBUG", raising=False)
    with pytest.raises(ZeroDivisionError):
        run_cli("prog", _fails_with(ZeroDivisionError("boom")))


def test_success_returns_zero():
    assert run_cli("prog", lambda: None) == 0
    assert run_cli("prog", lambda: 3) == 3
