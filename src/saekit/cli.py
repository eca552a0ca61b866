"""`saekit train | sweep | bench | cache | eval | finetune | hooks | convert | report | pipeline
| export | import`."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

from saekit.commands import (
    bench,
    cache,
    convert,
    evaluate,
    finetune,
    hooks,
    interop,
    pipeline,
    report,
    sweep,
    train,
)

# Nothing here imports torch at module level: `saekit --help` answers without it.

COMMANDS = (
    train,
    sweep,
    bench,
    cache,
    evaluate,
    finetune,
    hooks,
    convert,
    report,
    pipeline,
    interop,
)
"""The command modules, in the order ``saekit --help`` lists them. Each exposes
``add_parser(subparsers)`` (its parser(s), with ``func=run``) and ``run(args) -> int``."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)

    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # for --nproc
    try:
        with _warnings_as_lines():
            return args.func(args)
    except ValueError as exc:  # configuration and input errors: one clear line, no traceback
        print(f"saekit: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # a loss went NaN/inf mid-run (checkpoint kept)
        print(f"saekit: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:  # read-only directory, full disk, missing file
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"saekit: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except MemoryError:
        print("saekit: error: out of memory (try a smaller batch_size or d_sae)", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


@contextlib.contextmanager
def _warnings_as_lines():
    """saekit's own warnings (warnings.warn in the library) as one line each, every time:
    ``saekit: warning: ...``, not a file name, line number and source line."""
    with warnings.catch_warnings():
        warnings.filterwarnings("always", module=r"saekit\.")
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if f"{os.sep}saekit{os.sep}" in filename:
                print(f"saekit: warning: {message}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


if __name__ == "__main__":
    sys.exit(main())
