"""The ``prunelab`` command: a Hydra app over ``conf/``.

    prunelab                                   # the default run (digits, LeNet-300-100, magnitude, 90%)
    prunelab model=lenet5 data=mnist prune.sparsity=0.98
    prunelab --multirun method=magnitude,random prune.compression=10,100
    prunelab --cfg job                         # print the composed config
    prunelab --version                         # prunelab's version (and Hydra's)

Exit status: 0 done (or already done); 2 bad input, printed as one line ``prunelab: error: <message>``
(``--verbose``, ``PRUNELAB_VERBOSE=1`` or ``HYDRA_FULL_ERROR=1`` add the traceback); 1 a bug (with its
traceback) or a ``--multirun`` in which a job failed (the table at the end lists it); 130 interrupted
(Ctrl-C: the message names the stage and the command that resumes it).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import sysconfig
import traceback
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from prunelab.config import register_configs
from prunelab.runinfo import register_resolvers

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
if not Path(CONFIG_DIR).is_dir():  # installed without the repo: configs shipped inside the package
    CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")

register_configs()
register_resolvers()
log = logging.getLogger("prunelab")

# Lightning and torch warnings that say nothing about a prunelab run (small datasets, in-memory batches,
# prunelab's own checkpoint and log folders that a resumed run reuses on purpose).
HARMLESS_WARNINGS = (
    r".*LeafSpec.*",
    r".*smaller than the logging interval.*",
    r".*does not have many workers.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*Experiment logs directory .* exists and is not empty.*",
    r".*GPU available but not used.*",
    r".*`isinstance\(treespec, LeafSpec\)`.*",
)


def quiet_lightning() -> None:
    """Lightning's INFO banners (GPU available, tips, 'fit stopped') drown the run's own log."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("lightning", "pytorch_lightning")):
            logging.getLogger(name).setLevel(logging.WARNING)


def silence_harmless_warnings() -> None:
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from prunelab import sweep

    if _is_multirun():
        sweep.watch_main_process()  # in a launcher's worker: stop when the sweep's main process is gone
    from prunelab.pipeline.run import objective, run_pipeline

    quiet_lightning()
    silence_harmless_warnings()
    if not _is_multirun():
        try:
            results = run_pipeline(cfg)
        except Exception as e:
            message = user_error_message(e)
            if message is not None:  # the run's log file says why it stopped (the console: main())
                from prunelab.pipeline.console import log_to_file

                log_to_file(f"prunelab: error: {message}")
                raise Refused(e, message) from e
            raise
        _report(results)
        return objective(results, cfg)  # a validation metric (optimized_metric), never test accuracy
    # In a sweep a failing job must not stop the others: its traceback goes to <job dir>/error.txt and the
    # log, its first line to the sweep's table, and the sweep goes on (re-running the sweep retries it).
    try:
        results = run_pipeline(cfg)
    except Exception as e:
        trace = traceback.format_exc()
        message = user_error_message(e)
        if message is not None:  # the traceback of a user error only in error.txt
            log.error("job failed: %s (traceback: %s)", message, Path(cfg.paths.output_dir) / "error.txt")
        else:
            log.error("job failed:\n%s", trace)
        try:
            out = Path(cfg.paths.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "error.txt").write_text(trace)
        except OSError:
            pass
        sweep.record_job("failed", error=message or e)
        return float("nan")
    error_file = Path(cfg.paths.output_dir) / "error.txt"
    if error_file.exists():
        error_file.unlink()
    sweep.record_job("skipped" if results.get("skipped") else "done", results=results)
    _report(results)
    return objective(results, cfg)  # a validation metric (optimized_metric), never test accuracy


def _report(results: dict) -> None:
    """The summary table on the console and the final metrics in the log file, on global rank 0 only."""
    from prunelab.pipeline.console import final_block, log_to_file
    from prunelab.pipeline.context import is_rank_zero
    from prunelab.report.summary import print_summary

    if not is_rank_zero():
        return
    print_summary(results)
    log_to_file(final_block(results))


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


# -- errors -------------------------------------------------------------------------------------------------
class Refused(BaseException):
    """A run refused by a user error, carried out of Hydra's job (a BaseException: Hydra neither records it
    as the job's failure nor prints its "Error executing job" line) to ``main()``, which prints it."""

    def __init__(self, error: BaseException, message: str):
        super().__init__(message)
        self.error, self.message = error, message


_PRUNELAB_DIR = str(Path(__file__).resolve().parent)
_STDLIB_DIRS = tuple(str(Path(sysconfig.get_paths()[k]).resolve()) for k in ("stdlib", "platstdlib"))


def _origin(e: BaseException) -> str | None:
    """The file of the innermost frame outside the standard library where ``e`` was raised."""
    frames = []
    tb = e.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    for filename in reversed(frames):
        path = str(Path(filename).resolve())
        if not path.startswith(_STDLIB_DIRS) or "site-packages" in path:
            return path
    return None


def _config_error_message(e: BaseException) -> str:
    """Hydra's and OmegaConf's config errors, on one line, naming the option."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    cause = e if isinstance(e, OmegaConfBaseException) else e.__cause__
    full_key = getattr(cause, "full_key", None)
    obj_type = getattr(cause, "object_type", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and full_key:
        import dataclasses

        parent = full_key.rsplit(".", 1)[0] if "." in full_key else "the top level"
        options = [f.name for f in dataclasses.fields(obj_type)] if dataclasses.is_dataclass(obj_type) else []
        return (f"{full_key} is not a prunelab option (misspelt?)"
                + (f"; the options of {parent} are: {', '.join(options)}" if options else ""))
    text = str(e)
    if cause is not None and cause is not e and str(cause) not in text:
        text += "\n" + str(cause)
    text = text.split("Config search path")[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("full_key:", "object_type=", "reference_type=", "Set the "))]
    if lines and lines[0].startswith("In 'config': Could not find"):  # method=nope
        group_opt = lines[0].split("'")[3] if lines[0].count("'") >= 4 else ""
        rest = [ln for ln in lines[1:] if not ln.startswith("Available options")]
        return f"{group_opt.replace('/', '=')}: no such option; Available options: {', '.join(rest)}"
    message = "; ".join(lines)
    if full_key and full_key not in message:
        message = f"{full_key}: {message}"
    return message


def user_error_message(e: BaseException) -> str | None:
    """The one-line message of a user error, or None for a bug (which keeps its traceback).

    User errors: :class:`~prunelab.errors.UserError`; Hydra's and OmegaConf's config errors (unknown key,
    bad override, missing option); a ``ValueError``/``TypeError``/``OSError`` raised by prunelab's own code
    (its checks name the option); an ``OSError`` raised while Hydra creates the run or sweep folder."""
    from hydra.errors import HydraException, InstantiationException
    from omegaconf.errors import OmegaConfBaseException

    from prunelab.errors import UserError

    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, InstantiationException):
        return user_error_message(e.__cause__) if e.__cause__ is not None else None
    if isinstance(e, (HydraException, OmegaConfBaseException)):
        return _config_error_message(e)
    origin = _origin(e) or ""
    if isinstance(e, OSError) and f"{os.sep}hydra{os.sep}" in origin:
        option = "hydra.sweep.dir" if any(a in ("-m", "--multirun") for a in sys.argv[1:]) else "hydra.run.dir"
        return (f"cannot create or write the run folder {e.filename or ''} ({e.strerror or e}); set {option} "
                "to a writable directory")
    if isinstance(e, (ValueError, TypeError, OSError)) and origin.startswith(_PRUNELAB_DIR):
        return str(e)
    return None


_INTERRUPTED = {"signal": False}


def _on_sigint(signum, frame):
    """Ctrl-C: remember it (Lightning turns the KeyboardInterrupt inside a training stage into exit(1))."""
    _INTERRUPTED["signal"] = True
    raise KeyboardInterrupt


def _resume_command() -> str:
    return f"cd {shlex.quote(os.getcwd())} && " + shlex.join(["prunelab", *sys.argv[1:]])


def _interrupted_message() -> str:
    what = "the run"
    console = sys.modules.get("prunelab.pipeline.console")
    if console is not None and console.CURRENT.get("stage"):
        what = f"stage {console.CURRENT['stage']}"
        if console.CURRENT.get("run_dir"):
            what += f" of {console.CURRENT['run_dir']}"
    if _argv_multirun():
        what = f"the sweep ({what})"
    return (f"prunelab: interrupted: {what}. Finished stages and jobs are kept; this command resumes the rest "
            f"(an interrupted training stage from its last epoch):\n  {_resume_command()}")


def _exit_interrupted() -> None:
    from prunelab import sweep

    sweep.stop_workers()
    print(_interrupted_message(), file=sys.stderr)
    sys.exit(130)


def _argv_multirun() -> bool:
    return any(a in ("-m", "--multirun") for a in sys.argv[1:])


def version() -> str:
    from prunelab import __version__

    return f"prunelab {__version__} (Hydra {hydra.__version__})"


def main() -> None:
    args = sys.argv[1:]
    if "--version" in args:
        print(version())
        return
    truthy = ("1", "true", "yes")
    verbose = ("--verbose" in args or os.environ.get("PRUNELAB_VERBOSE", "").lower() in truthy
               or os.environ.get("HYDRA_FULL_ERROR", "").lower() in truthy)
    sys.argv = [sys.argv[0], *(a for a in args if a != "--verbose")]
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises; main() decides what is printed
    from prunelab import sweep

    os.environ[sweep.MAIN_PID_ENV] = str(os.getpid())
    sweep.install_signal_handlers()
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        _main()
    except KeyboardInterrupt:
        _exit_interrupted()
    except SystemExit:
        if _INTERRUPTED["signal"]:  # Lightning's exit(1) after a Ctrl-C in a training stage
            _exit_interrupted()
        raise
    except Refused as r:
        if verbose:
            traceback.print_exception(r.error)
        print(f"prunelab: error: {r.message}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        message = user_error_message(e)
        if message is None:
            raise
        if verbose:
            traceback.print_exc()
        print(f"prunelab: error: {message}", file=sys.stderr)
        sys.exit(2)
    if sweep.LAST is not None and sweep.LAST["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
