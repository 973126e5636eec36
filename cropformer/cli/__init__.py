"""The command-line layer, in one place: `cropformer train | eval | infer | convert | export | info`.

Each subcommand is a module here with `build_parser()` and `main(argv) -> int`; `train.py`, `eval.py` and
`infer.py` at the repository root and `python -m cropformer` are thin wrappers over the same functions,
so every entry point takes the same options. Library modules hold no `main()`.

Errors: a problem with the user's input (a path, a JSON file, an option, a checkpoint) is raised as
:class:`UserError` (or one of the library's own input errors, `user_errors()`) and printed as one line,
`error: <file>: <problem>`, with exit status 2 and no traceback; so is an OSError naming a file (missing,
unreadable, not a folder) and a full disk. `--debug` or `CROPFORMER_DEBUG=1` re-raises it with the
traceback. Anything else is a bug and keeps its traceback: a JSON syntax error in particular must be
caught where the file is read, so that the message names the file.
"""
from __future__ import annotations

import errno
import importlib
import logging
import os
import sys
import time
from typing import Callable, Sequence

from ..cpu_share import allowed_cpus, cpu_times

COMMANDS = {
    "train": "train CropFormer or the Mask2Former baseline (torchrun for several GPUs)",
    "eval": "AP^e of a checkpoint (or of a predictions file) on a COCO-style set",
    "infer": "segment every entity of a folder of images (id maps, COCO RLE JSON, overlays)",
    "convert": "convert an official / HuggingFace / ImageNet checkpoint to ours",
    "export": "export the network as a torch.export program / AOTInductor package",
    "info": "versions, compiled extension, and the backend `auto` picks for each op",
    "synthetic": "write a synthetic entity dataset (the demo's data, the crop-ensemble detail set)",
}


class UserError(Exception):
    """A problem with the user's input, to be shown as one line (exit status 2), not a traceback.

    The message names the file (or option) and the problem, and when useful what to do.
    """


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input, not a bug in our code (imported lazily: no torch at import)."""
    from ..checkpoint import WeightsMismatch
    from ..config import ConfigError

    extra = []
    for mod, name in (("cropformer.checkpoint", "CheckpointError"), ("cropformer.data.decode", "ImageDecodeError"),
                      ("cropformer.data.dataset", "DatasetError"), ("cropformer.evaluation", "EvaluationInputError"),
                      ("cropformer.inference", "PrecisionUnsupported")):
        cls = getattr(importlib.import_module(mod), name, None)
        if cls is not None:
            extra.append(cls)
    return (UserError, ConfigError, WeightsMismatch, *extra)


def debug_requested(argv: Sequence[str] | None) -> bool:
    return os.environ.get("CROPFORMER_DEBUG", "") not in ("", "0") or "--debug" in (argv or sys.argv[1:])


def add_common_options(p) -> None:
    """Options every subcommand takes."""
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (or CROPFORMER_DEBUG=1)")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


# OSErrors that are the environment's doing even when they name no file.
_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError: 'X: Permission denied', 'no space left on device writing X' etc."""
    reason = exc.strerror or str(exc)
    if exc.filename is None:
        return reason
    if exc.errno == errno.ENOSPC:
        return f"no space left on device writing {exc.filename}"
    return f"{exc.filename}: {reason}"


def is_user_error(exc: BaseException) -> bool:
    """Bad input or a hostile environment (shown as one line), as opposed to a bug (a traceback)."""
    if isinstance(exc, user_errors()):
        return True
    return isinstance(exc, OSError) and (exc.filename is not None or exc.errno in _ENVIRONMENT_ERRNOS)


def busy_cpu(load: float, cpus: int) -> bool:
    """Whether other processes keep the CPU busy: at least half the cores' worth of others' work."""
    return load >= 0.5 * cpus


def others_cpu_use(cpus: set[int], window_s: float = 0.2, stat_path: str = "/proc/stat") -> float | None:
    """Cores' worth of CPU time used by others on `cpus` right now: /proc/stat sampled over `window_s`
    while this process sleeps. None where there is no /proc/stat (macOS, Windows)."""
    try:
        busy0, total0 = cpu_times(cpus, stat_path)
        time.sleep(window_s)
        busy1, total1 = cpu_times(cpus, stat_path)
    except (OSError, ValueError):
        return None
    if total1 <= total0:
        return None
    return (busy1 - busy0) / (total1 - total0) * len(cpus)


def configure_cpu_runtime() -> None:
    """OpenMP settings for a CPU that others are using, set before torch (and its OpenMP runtime) loads.

    torch's OpenMP threads spin at every barrier waiting for each other; when another busy process holds
    one of the cores, the spinning thread starves the one doing the work: a training iteration ran at 34%
    of its idle speed beside one busy process, and at 63-75% with passive waiting (threads sleep at
    barriers; docs/BENCHMARKS.md, "Training beside a busy process"). Passive waiting also cost 17-38% on
    the idle machine, so it is chosen only when others use at least half the cores now (`busy_cpu`;
    measured over 0.2 s from /proc/stat, the 1-minute load average where there is none), and logged
    then. Not the load average on Linux: it still counts a job that finished a minute ago, and a
    training run started right after one ran 1.5x slower than it had to (docs/BENCHMARKS.md, 2026-12-03).
    A value the user set is kept (`OMP_WAIT_POLICY=PASSIVE` always, `ACTIVE` never); once torch is
    imported the runtime has read its settings, so this does nothing then.
    Also keeps freed memory for reuse (`cropformer.allocator.tune_cpu_allocator`), at any time.
    """
    from ..allocator import tune_cpu_allocator

    tune_cpu_allocator()
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    cpus = allowed_cpus()
    load, what = others_cpu_use(cpus), "other processes use"
    if load is None:
        try:
            load, what = os.getloadavg()[0], "load average"
        except (OSError, AttributeError):  # Windows
            return
    if busy_cpu(load, len(cpus)):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        print(f"note: {what} {load:.1f} of {len(cpus)} cores: OpenMP threads will wait passively "
              "(OMP_WAIT_POLICY=PASSIVE; set OMP_WAIT_POLICY=ACTIVE to override)", file=sys.stderr)


def run(main_fn: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call a subcommand's `main`, turning user errors into one line on stderr and exit status 2."""
    configure_cpu_runtime()
    try:
        return main_fn(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug_requested(argv) or not is_user_error(exc):
            raise
        print(f"error: {describe_os_error(exc) if isinstance(exc, OSError) else exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """`cropformer COMMAND [options]`: dispatch to `cropformer.cli.<command>.main`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
        print("usage: cropformer COMMAND [options]   (cropformer COMMAND --help for its options)\n\ncommands:\n"
              + "\n".join(lines))
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"cropformer.cli.{command}")
    return run(module.main, rest)
