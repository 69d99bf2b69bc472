"""One error policy: a UserError ends a command with `error: <message>` and status 1; any other exception, a bare
ValueError included, is a bug and keeps its traceback."""
import subprocess
import sys

import pytest

from helpers import ROOT
from mmgpt.cli import run_command
from mmgpt.errors import UserError


def command(body: str) -> subprocess.CompletedProcess:
    code = ("from mmgpt.cli import run_command\nfrom mmgpt.errors import UserError\n"
            f"def main():\n    {body}\nrun_command(main)")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_a_user_error_prints_one_line_and_a_bug_keeps_its_traceback():
    user = command("raise UserError('engine.strategy=bogus: choose two_engines or shared')")
    assert user.returncode == 1
    assert user.stderr == "error: engine.strategy=bogus: choose two_engines or shared\n"
    bug = command("int('not a number')")  # a ValueError from a bug, not a user's input
    assert bug.returncode == 1 and "Traceback (most recent call last)" in bug.stderr
    assert "ValueError: invalid literal for int()" in bug.stderr and "error:" not in bug.stderr


def test_run_command_reraises_what_is_not_a_user_error():
    with pytest.raises(ValueError, match="a bug"):
        run_command(lambda: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(SystemExit) as stopped:
        run_command(lambda: (_ for _ in ()).throw(UserError("a mistake")))
    assert stopped.value.code == 1
