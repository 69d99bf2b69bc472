"""What the commands share: a user's mistake (`mmgpt.errors.UserError`) ends the command with its message and exit
status 1, not a traceback. Bugs (any other exception, a bare ValueError too) keep their traceback."""
from __future__ import annotations

import sys

from mmgpt.errors import UserError
from mmgpt.files import terminated


def run_command(fn):
    try:
        return fn()
    except BaseException as e:
        if terminated.is_set():  # SIGTERM, whatever a library wrapped the exception raised for it into
            print("terminated by SIGTERM; nothing half-written was left behind", file=sys.stderr)
            raise SystemExit(143) from None  # 128 + SIGTERM, as if the signal had ended the process
        if isinstance(e, UserError):
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        raise
