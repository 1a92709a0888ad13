"""How an entry point runs: a user's mistake is one `error: ...` line and exit code 2, never a traceback.

    from cli import UserError, run_cli
    def run(argv): ...                       # raises UserError("what was wrong and what to do")
    raise SystemExit(run_cli(run, sys.argv[1:]))

`--debug` on any entry point shows the full traceback instead. A multi-process run's process
group is torn down on the way out (`close_process_group`).
"""

from __future__ import annotations

import argparse
import difflib
import sys
import typing


class UserError(Exception):
    """A mistake the user can fix (flags, data, model choice): one line on stderr, exit code 2."""


def die(message: str, code: int = 2) -> typing.NoReturn:
    """Print a one-line user error and exit non-zero (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_cli(run: typing.Callable[[list[str]], object], argv: list[str]) -> int:
    """Run an entry point; a UserError becomes one `error: ...` line and exit 2 (a traceback with --debug)."""
    try:
        run(argv)
    except UserError as err:
        if "--debug" in argv:
            raise
        die(str(err))
    finally:
        close_process_group()
    return 0


def close_process_group() -> None:
    """Tear down torch.distributed before the interpreter exits (multi-process runs only).

    Left to interpreter shutdown, gloo's worker threads can be destroyed while still joinable, and a process that
    finished its work aborts with "terminate called without an active exception" (SIGABRT), failing the launch.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage lists every field): what was wrong, a close flag, --help."""

    def error(self, message: str) -> typing.NoReturn:
        if message.startswith("unrecognized arguments"):
            flags = [a.split("=")[0] for a in message.split(": ", 1)[1].split() if a.startswith("--")]
            known = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
            close = [m for f in flags for m in difflib.get_close_matches(f, known, n=1, cutoff=0.6)]
            message += f" (did you mean {', '.join(close)}?)" if close else ""
        die(f"{message}; `python {self.prog} --help` lists every flag")
