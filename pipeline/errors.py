"""The one exception type for bad input: jobs print its message (what is wrong, what to do) and exit 2."""


class InputError(ValueError):
    """A config value, folder, file or flag that cannot be used; raised before the cluster does any work."""
