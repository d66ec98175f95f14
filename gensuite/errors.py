"""User-facing errors: one line, exit code 2, no traceback."""


class GensuiteError(Exception):
    """Bad input the user can fix (a job field, a file, a missing shard set).

    The message is a single line that names the field or file and says how to fix it.
    """

    exit_code = 2


class ConfigError(GensuiteError):
    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class TrainingDiverged(Exception):
    """A loss term became NaN or inf; the last good checkpoint is kept."""

    exit_code = 3


class Interrupted(Exception):
    """Training stopped on a signal after checkpointing at ``step``; the job can be resumed."""

    exit_code = 4

    def __init__(self, step: int, checkpoint, requeue: bool):
        super().__init__(f"stopped by a signal at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint, self.requeue = step, checkpoint, requeue
