"""Exit codes of `python -m megatron_qwen2.train` and the tools, and the errors that map to them.

One place for every code a script or the Slurm launcher may act on (README, "Exit codes").
A `TrainingError` is an expected stop: the entry point prints its message as one line (a
traceback only with HYDRA_FULL_ERROR=1) and exits with its `exit_code`.
"""

EXIT_OK = 0  # finished: the last step is saved
EXIT_INTERNAL = 1  # an unexpected error (a bug): the traceback is printed
EXIT_CONFIG = 2  # bad input: a config value, a data file, an unusable checkpoint, a resume that does not match
EXIT_NONFINITE = 3  # non-finite loss or grad norm (train.on_nonfinite=stop, or past train.max_skipped_steps)
EXIT_IO = 74  # EX_IOERR: the run directory cannot be written (read-only, full disk); the last checkpoint stays
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: SIGTERM/SIGUSR1 saved a checkpoint at a step boundary; requeue
EXIT_HANG = 76  # the hang watchdog fired (no step within train.hang_timeout_min); stacks in RUN_DIR/hang/; requeue

REQUEUE_CODES = (EXIT_PREEMPTED, EXIT_HANG)  # the launcher requeues the job on these


class TrainingError(Exception):
    """An expected stop, reported as one line; subclasses set the exit code."""

    exit_code = EXIT_INTERNAL


class ConfigError(TrainingError, ValueError):
    """A bad config value, or a resume whose config does not match its checkpoint's."""

    exit_code = EXIT_CONFIG


class DataError(ConfigError):
    """A data file that is missing, truncated, corrupt or malformed (the message names it)."""


class NonFiniteError(TrainingError):
    """Non-finite loss, gradient norm or optimizer state; training stops without saving it."""

    exit_code = EXIT_NONFINITE


class RunDirError(TrainingError):
    """The run directory (metrics, checkpoints) cannot be written: read-only or full."""

    exit_code = EXIT_IO
