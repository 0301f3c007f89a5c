"""How an actor's failed start reaches the driver as one line (the run then stops with RunFailed,
dense_rl.config.errors). No Ray here: the actors' constructors use `start_errors` before any Ray call
is made."""

from __future__ import annotations

import functools
import re


class ActorStartFailed(RuntimeError):
    """An actor's constructor raised; the message is its cause in one line (see `start_errors`)."""


def describe(error: BaseException) -> str:
    """`Type: first line` of an error and, when it was raised while handling another, of the innermost
    one too: the innermost often says what is wrong (a missing file), the outer one where."""
    chain = [error]
    while len(chain) < 20:
        last = chain[-1]
        inner = last.__cause__ or (None if last.__suppress_context__ else last.__context__)
        if inner is None or inner in chain:
            break
        chain.append(inner)
    text = _line(error)
    if len(chain) > 1 and _line(chain[-1]) != text:
        text += f" (cause: {_line(chain[-1])})"
    return text[:600]


def _line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def start_errors(init):
    """Decorate an actor's __init__: whatever it raises comes out as ActorStartFailed with the cause in
    one line. Ray hands the driver only the text of a failed constructor's traceback, so the driver
    finds that line by its marker (`start_failure`)."""

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except Exception as error:
            raise ActorStartFailed(describe(error)) from error

    return wrapper


def start_failure(error_text: str) -> str | None:
    """The one-line cause an ActorStartFailed carried, from the text of Ray's error; None if absent."""
    found = re.findall(r"ActorStartFailed: (.*)", error_text)
    return found[-1].strip() if found else None
