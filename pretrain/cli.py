"""What every command-line tool does with an error: one line on stderr and an exit code.

    sys.exit(run_cli(lambda: work(args), errors=[(BuildError, FAILED)], interrupted="run it again to resume"))

Exit codes a scheduler can act on (documented in the README):

- 0 (OK): finished;
- 75 (STOPPED, EX_TEMPFAIL of sysexits.h): stopped by a signal with a checkpoint saved: run the same
  command again later to resume;
- 1 (FAILED): failed, do not retry as is (the message says why);
- 2 (USAGE): a bad configuration or flag;
- 130 (INTERRUPTED): Ctrl-C where the tool has no checkpoint to save.

- ``ConfigError`` (a bad key, value, flag or path): ``config error: <message>``, exit 2 (USAGE);
- each ``(exception types, code[, format])`` of ``errors``: ``error: <message>`` (or ``format(err)``);
- KeyboardInterrupt: the ``interrupted`` line, exit 130 (re-raised when no line is given);
- anything else is a bug or an unexpected failure: its traceback, exit 1.

A tool's ``__main__`` block ends with ``exit_process(main())``; ``collector_paused()`` keeps the
garbage collector off while a tool builds its heavy objects.

Used by ``python -m pretrain.train``, ``pretrain.eval``, ``pretrain.export``, ``data_tools`` and
``launch.slurm``. Imports nothing heavy.
"""
from __future__ import annotations

import contextlib
import gc
import sys
from typing import Callable, Iterator, NoReturn, Optional, Sequence

from pretrain.options import ConfigError

OK, FAILED, USAGE, STOPPED, INTERRUPTED = 0, 1, 2, 75, 130


def run_cli(body: Callable[[], Optional[int]], *, errors: Sequence[tuple] = (), prog: str = "",
            interrupted: Optional[str] = None, cleanup: Optional[Callable[[], None]] = None) -> int:
    """``body()``'s exit code (None counts as 0), or the code of the first matching error."""
    lead = f"{prog}: " if prog else ""
    try:
        code = body()
        return OK if code is None else code
    except ConfigError as err:
        print(f"{lead}config error: {err}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"{lead}{interrupted}", file=sys.stderr)
        return INTERRUPTED
    except Exception as err:
        for entry in errors:
            types, code, fmt = (*entry, None)[:3]
            if isinstance(err, types):
                print(f"{lead}error: {fmt(err) if fmt else err}", file=sys.stderr)
                return code
        raise
    finally:
        if cleanup is not None:
            cleanup()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off inside (and back as it was after): importing timm,
    transformers and DeepSpeed and building the model and engine makes ~500k long-lived objects, and
    the collector's full passes over them while they grow cost ~0.7 s of CPU per process; the garbage
    cycles made meanwhile are collected once it is back on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def exit_process(code: int) -> NoReturn:
    """Ends a command-line tool's process with ``code``. The garbage collector is frozen first:
    otherwise the interpreter's shutdown collection walks every object torch, timm, transformers and
    DeepSpeed made (about 600k after a training run: 1-1.5 s of CPU per process). The tool has closed
    what it writes; only the process's own exit follows. (Only here, never in ``run_cli``: a caller
    of a tool's ``main()`` from Python keeps its collector.)"""
    gc.freeze()
    sys.exit(code)
