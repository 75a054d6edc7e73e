"""The one exception type that prostlab raises for bad input."""


class ProstlabError(ValueError):
    """Bad input: a file, shape, value or config field that is not what was expected.

    The message names the offending thing and the expected form. The command line prints it on
    one line and exits with status 2.
    """
