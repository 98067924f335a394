"""The one exception the engine raises for problems a user can fix (bad path, bad file, bad setting)."""


class ModelError(Exception):
    """A problem with the model or its files, worded as one line the user can act on."""
