"""What jobs report as `error: …` instead of a traceback: bad input (exit 2), a run that stopped (exit 1)."""


class InputError(ValueError):
    """A config value, folder, file or flag that cannot be used; raised before the cluster does any work."""


class DataError(InputError):
    """A dataset that cannot be used (prepared shards, an image folder, CIFAR-10's batches); the
    message says what is wrong and what to do."""


class TrainingFailed(RuntimeError):
    """A run that stopped on a failure it could not restart from; the message says what and how to resume."""


class TrainingDiverged(TrainingFailed):
    """Training stopped being finite (or a checkpoint is not): nothing is registered; the message says
    where, the last finite checkpoint and what to change."""
