"""The errors that mean bad input, not a failure: every entry point reports them as one line and exit 2.

Its own module so that both the command line and the Ray Train driver (which re-raises a worker's
bad-input error as it is) can name them without importing each other.
"""

from cache_schema import CacheError
from trainer.config import ConfigError
from trainer.methods.errors import MethodError

USER_ERRORS = (CacheError, ConfigError, MethodError, FileNotFoundError)
