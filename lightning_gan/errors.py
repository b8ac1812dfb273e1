"""How the ``lightning-gan`` command ends: the package's own errors as one clean line, exit codes for interruptions.

Exit codes: 0 a finished run; 1 an unexpected error (a bug: the full traceback is printed); 2 bad input (a usage
error, or an error the package raised on purpose, whose message names the problem and the fix); 130 a run stopped by
Ctrl-C; 143 a run stopped by SIGTERM. Set ``LIGHTNING_GAN_TRACEBACK=1`` to see the traceback of a bad-input error too.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = [
    "BAD_INPUT",
    "CTRL_C",
    "SIGTERM",
    "TRACEBACK_VARIABLE",
    "LightningGANError",
    "is_package_error",
    "one_line",
    "run_command",
]

TRACEBACK_VARIABLE = "LIGHTNING_GAN_TRACEBACK"
BAD_INPUT, CTRL_C, SIGTERM = 2, 130, 143  # 128 + the signal's number, as a shell reports a process it killed
_PACKAGE = Path(__file__).resolve().parent
# the kinds of error the package's checks raise; any other kind (KeyError, AttributeError, ...) is a bug
_CHECK_KINDS = (ValueError, TypeError, OSError, RuntimeError, ArithmeticError)


class LightningGANError(Exception):
    """An error whose message names the problem and the fix: the command prints it as one line (exit code 2)."""


def is_package_error(error: BaseException) -> bool:
    """Whether ``error`` reports bad input: a :class:`LightningGANError`, or one of the kinds the package's checks
    raise, raised by a ``raise`` statement of the package itself (a failure deeper down, in torch or Python, is not)."""
    if isinstance(error, LightningGANError):
        return True
    if not isinstance(error, _CHECK_KINDS) or error.__traceback__ is None:
        return False
    frame = traceback.extract_tb(error.__traceback__)[-1]
    in_package = Path(frame.filename).resolve().is_relative_to(_PACKAGE)
    return in_package and (frame.line or "").lstrip().startswith("raise")


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (its lines joined), without a traceback."""
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return message or type(error).__name__


def run_command(command: Callable[[], Any], finish: Callable[[], None] = lambda: None) -> None:
    """Run ``command``, then ``finish``; end the process as the module's docstring says when it fails or is stopped.

    A bad-input error prints one line, ``lightning-gan: error: <message> (...)``, and exits with 2 (the traceback
    too when ``LIGHTNING_GAN_TRACEBACK`` is set); a run stopped by SIGTERM exits with 143, by Ctrl-C with 130 (the
    interruption checkpoint sets that code, see :class:`~lightning_gan.checkpointing.InterruptCheckpoint`);
    Lightning exits with 1 after a second Ctrl-C. Any other error propagates: its traceback, exit code 1.
    """
    try:
        command()
        finish()
    except SIGTERMException as stopped:
        sys.exit(SIGTERM if stopped.code in (None, 0) else stopped.code)
    except KeyboardInterrupt:
        sys.exit(CTRL_C)
    except Exception as error:
        if not is_package_error(error):
            raise
        _report(error)


def _report(error: BaseException) -> NoReturn:
    if os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
        traceback.print_exception(error)
    print(f"lightning-gan: error: {one_line(error)} ({TRACEBACK_VARIABLE}=1 shows the traceback)", file=sys.stderr)
    sys.exit(BAD_INPUT)
