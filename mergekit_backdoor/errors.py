"""One exception type per family of user error. The CLI prints each as one line and exits 2."""


class BackdoorError(Exception):
    """Base class: a problem with the user's input that a one-line message explains."""


class IncompatibleModelError(BackdoorError):
    """A suspect or donor cannot be merged with the others (architecture, labels, vocab...)."""


class RecipeError(BackdoorError):
    """A merge recipe or its parameters are invalid."""


class OutputExistsError(BackdoorError):
    """The output path exists and overwriting was not asked for."""


class OutputOverlapsInputError(BackdoorError):
    """The output is, contains or lies inside an input (a model or the data folder)."""


class DataError(BackdoorError):
    """A data set is missing, malformed, unknown or fails its checksum."""


class EvalError(BackdoorError):
    """An evaluation cannot run as asked (unknown task, unloadable model...)."""
