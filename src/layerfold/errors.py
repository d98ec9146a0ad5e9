"""The exceptions a user sees as one line, and the exit code each ends with.

Exit codes of the ``layerfold`` command (README, "Errors and exit codes"):

    0    success
    1    an internal error (a bug: rerun with --debug and report it)
    2    bad input: an option, a file or a model that cannot work; found before any work
         where it can be (``layerfold.validation``)
    3    a runtime failure of a valid run: training diverged, the disk filled up while
         saving, a weight file that breaks while being read; nothing half-written is left
    130  interrupted (Ctrl-C, SIGINT)
    143  stopped by SIGTERM
"""

EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_RUNTIME = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class LayerfoldError(Exception):
    """A user-facing error: bad input, missing file, unsupported model (exit code 2)."""

    exit_code = EXIT_USAGE


class RuntimeFailure(LayerfoldError):
    """A valid run that failed while working: diverged training, a full disk (exit code 3)."""

    exit_code = EXIT_RUNTIME


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C, so every temporary folder is removed on the way."""
