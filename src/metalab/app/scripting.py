"""The scripts' refusal path: an argparse whose errors are one sentence, the checks of path
arguments and outputs, and ``script_main``, which makes a script's ``main`` print
``error: <sentence>`` and return 2 (a bad input) or 1 instead of raising a traceback.

    @script_main
    def main(argv: list[str]) -> int: ...
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from metalab.errors import ConfigError, MetalabError

__all__ = ["ScriptParser", "exit_status", "path_argument", "positive_int", "refusal", "require_writable", "script_main"]


class ScriptParser(argparse.ArgumentParser):
    """argparse whose refusals are ConfigErrors of one sentence ending with ``usage`` (the
    script's usage line), for ``script_main`` to print."""

    def __init__(self, usage_line: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.usage_line = usage_line

    def error(self, message: str) -> NoReturn:
        for action in self._actions:  # argparse lists optional positionals among the missing ones
            if action.nargs in ("*", "?") and not action.option_strings:
                message = message.replace(f", {action.dest}", "")
        raise ConfigError(f"{message}: usage is {self.usage_line}")


def exit_status(code: int) -> int:
    """A child process's exit status as a shell reports it: one killed by signal n (code -n) as 128 + n."""
    return 128 - code if code < 0 else code


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (got {text!r})")
    return int(text)


def path_argument(text: str) -> Path:
    """argparse type: a path, "~" expanded; an empty argument is refused (not read as ".")."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: pass a path")
    return Path(text).expanduser()


def require_writable(path: Path, option: str, folder: bool = False) -> None:
    """Refuse, before any work, a file (``folder``: a folder to write files into) that this process
    cannot write: "cannot write <path> (<why>): pass <option> to write elsewhere." Nothing is left behind."""
    if path.is_dir() and not folder:
        raise ConfigError(f"cannot write {path} (a folder, not a file): pass {option} to write elsewhere.")
    try:
        if folder:
            with tempfile.TemporaryFile(dir=path):
                pass
        elif path.exists():
            with path.open("a"):  # appends nothing: the file stays as it is
                pass
        else:
            with path.open("x"):
                pass
            path.unlink()
    except OSError as error:
        raise ConfigError(f"cannot write {path} ({error.strerror}): pass {option} to write elsewhere.") from None


def refusal(error: BaseException) -> tuple[str, int] | None:
    """(the sentence a user should read for ``error``, the exit status) or None for anything else (a
    bug, which keeps its traceback): metalab's own sentence where one is in its chain of causes (Hydra
    wraps them), 2 for a ConfigError and 1 for another MetalabError; Hydra's config errors on one line,
    2; an OSError's file and reason, 1."""
    from hydra.errors import HydraException  # here: only a failing script needs it

    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and all(link is not seen for seen in chain):
        chain.append(link)
        link = link.__cause__
    for link in chain:
        if isinstance(link, MetalabError):
            return str(link), 2 if isinstance(link, ConfigError) else 1
    for link in chain:
        if isinstance(link, HydraException):
            return _one_line(str(link)).rstrip(".") + ": check the overrides against the config tree.", 2
        if isinstance(link, OSError) and link.strerror:
            return f"cannot use {link.filename or 'a file'} ({link.strerror}): check that path and its permissions.", 1
    return None


def _one_line(message: str) -> str:
    """Hydra's several-line message on one line: its search path, documentation links and caret
    lines left out, the tab-indented list under a line ending in ":" joined with commas."""
    parts: list[str] = []
    listing = False
    for line in message.split("Config search path:")[0].splitlines():
        text = line.strip()
        if not text or text.startswith("See https://") or set(text) <= {"^"}:
            continue
        if listing and line.startswith("\t"):
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + text
        else:
            parts.append(text)
            listing = text.endswith(":")
    return "; ".join(part.rstrip(".") for part in parts)


def script_main(main: Callable[[list[str]], int | None]) -> Callable[[Sequence[str] | None], int]:
    """Decorates a script's ``main(argv) -> exit status``: called without argv it reads the command
    line, and a refusal is printed as ``error: <sentence>`` on stderr and returned as its exit status
    (see ``refusal``) instead of a traceback."""

    @functools.wraps(main)
    def refusing(argv: Sequence[str] | None = None) -> int:
        try:
            return main(list(sys.argv[1:] if argv is None else argv)) or 0
        except Exception as error:
            refused = refusal(error)
            if refused is None:
                raise
            print(f"error: {refused[0]}", file=sys.stderr)
            return refused[1]

    return refusing
