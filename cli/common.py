"""What every command shares: turning bad input into one stderr line, and the rich console."""

from __future__ import annotations

import errno
import functools
import os
import sys

import click
import typer
from rich.console import Console

console = Console(stderr=False)
MAX_ERROR_CHARS = 400


def fail(message: str, code: int = 2) -> None:
    """Print one line on stderr and exit non-zero (one line: no newline, at most MAX_ERROR_CHARS)."""
    line = " ".join(str(message).split())
    if len(line) > MAX_ERROR_CHARS:
        line = line[: MAX_ERROR_CHARS - 3] + "..."
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def require_finite(**values: float) -> None:
    """Float options typed on the command line (not through a spec) must be finite numbers: --name inf is refused."""
    import math

    from raystack.errors import UserError

    for name, v in values.items():
        if not math.isfinite(v):
            raise UserError(f"--{name.replace('_', '-')} {v}: must be a finite number")


def guarded(fn):
    """Bad input becomes one clear line; a bug keeps its traceback only with IMMUNIZE_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from raystack.errors import UserError

        try:
            check_path_arguments(fn, kwargs)
            return fn(*args, **kwargs)
        except UserError as e:
            fail(str(e), e.exit_code)
        except (SystemExit, click.exceptions.Exit, typer.Exit):
            raise
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:
                from raystack.outputs import shown

                fail(f"{shown(str(e.filename or 'a path'))}: a name in it is too long for the file system", 2)
            if os.environ.get("IMMUNIZE_DEBUG"):
                raise
            fail(f"internal error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]} "
                 "(rerun with IMMUNIZE_DEBUG=1 for the traceback)", 1)
        except Exception as e:  # noqa: BLE001 - the last line of defence against tracebacks
            if os.environ.get("IMMUNIZE_DEBUG"):
                raise
            first = (str(e).splitlines() or [""])[0][:300]
            fail(f"internal error: {type(e).__name__}: {first} (rerun with IMMUNIZE_DEBUG=1 for the traceback)", 1)

    return wrapper


def option_flags(fn) -> dict[str, str]:
    """Each parameter of a command -> the flag a user types (`json_out` -> `--json`; an argument -> its NAME)."""
    import inspect

    flags = {}
    for name, param in inspect.signature(fn).parameters.items():
        decls = [d for d in (getattr(param.default, "param_decls", None) or ()) if d.startswith("--")]
        flags[name] = max(decls, key=len) if decls else name.upper() if type(param.default).__name__ == \
            "ArgumentInfo" else f"--{name.replace('_', '-')}"
    return flags


def command_line(fn, kwargs: dict, flags: dict[str, str]) -> str:
    """The command being run, for the marker of what it writes: the real argv, or (run in-process, as the tests
    do) one rebuilt from the parameters."""
    import shlex

    if os.path.basename(sys.argv[0] if sys.argv else "") == "immunize-cli":
        return shlex.join(["immunize-cli", *sys.argv[1:]])
    group = fn.__module__.rsplit(".", 1)[-1]
    words = ["immunize-cli", *([group] if group not in (fn.__name__, "main") else []), fn.__name__]
    for name, value in kwargs.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is None or v is False:
                continue
            flag = flags.get(name, f"--{name.replace('_', '-')}")
            words += [flag] if v is True else [str(v)] if flag.isupper() else [flag, str(v)]
    return shlex.join(words)


def check_path_arguments(fn, kwargs: dict) -> None:
    """Every path given on the command line is local (no URI) and fits the file system's name limits, checked
    before the command makes any folder or lock; the command line is kept for the marker of what it writes."""
    from pathlib import PurePath

    from raystack import outputs

    flags = option_flags(fn)
    outputs.COMMAND_LINE = command_line(fn, kwargs, flags)
    for name, value in kwargs.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, PurePath):
                outputs.check_local_path(v, flags.get(name, f"--{name.replace('_', '-')}"))


def quiet_libraries(use_gpu: bool = False) -> None:
    """Silence the progress bars and notices of diffusers/transformers/deepspeed; ours are rich. DeepSpeed is
    told it has no GPU only where it surely has none and the run asked for none (`use_gpu`: --use-gpu)."""
    if not use_gpu and not _has_cuda_hint():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*torchvision.*")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetics only
        pass


def _has_cuda_hint() -> bool:
    """A GPU may be here (checked without importing torch): a container's GPU need not be /dev/nvidia0."""
    import glob

    if os.environ.get("CUDA_VISIBLE_DEVICES") or \
            os.environ.get("NVIDIA_VISIBLE_DEVICES", "void").lower() not in ("", "void", "none"):
        return True
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/proc/driver/nvidia/gpus/*"))
