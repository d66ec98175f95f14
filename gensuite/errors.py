"""User-facing errors: one line, exit code 2, no traceback."""

import signal


class GensuiteError(Exception):
    """Bad input the user can fix (a job field, a file, a missing shard set).

    The message is a single line that names the field or file and says how to fix it.
    """

    exit_code = 2


class ConfigError(GensuiteError):
    def __init__(self, path: str, message: str):
        self.path, self.message = path, message
        super().__init__(f"{path}: {message}" if path else message)


class DiskFull(GensuiteError):
    """No space left while writing a run's file; the partial file is gone, earlier checkpoints stay."""


class AlreadyReported(GensuiteError):
    """The run stopped and another process said why (rank 0, which writes the files, or the ranks of
    a local multi-rank run): exit with ``exit_code`` without a line of its own."""

    def __init__(self, exit_code: int = 2):
        super().__init__("")
        self.exit_code = exit_code


class TrainingDiverged(Exception):
    """A loss term became NaN or inf; the last good checkpoint is kept."""

    exit_code = 3


class Interrupted(Exception):
    """Training stopped on a signal after checkpointing at ``step``; the job can be resumed.

    The exit code is the shell's for that signal (128 + its number: 143 for SIGTERM, 130 for SIGINT).
    """

    def __init__(self, signum: int, step: int, checkpoint, requeue: bool, announce: bool = True):
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal_name} at step {step}; checkpoint {checkpoint}")
        self.signum, self.step, self.checkpoint, self.requeue = signum, step, checkpoint, requeue
        self.announce = announce  # rank 0 says it; the other ranks exit with the same code, silently
        self.exit_code = 128 + signum
