"""The methods' error, apart from their torch code: `trainer --help` and the CLI's error handling
import it without paying for torch."""


class MethodError(Exception):
    """The cache or config does not fit the method (missing feature, wrong width, bad option)."""
