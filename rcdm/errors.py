"""The one exception type that launchers turn into a one-line message instead of a traceback."""
import contextlib
import sys
from collections.abc import Iterator


class UserError(Exception):
    """Bad input or a missing file; the message says what to do about it."""


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """In a launcher: a UserError or a missing mandatory config value becomes one `error:` line and exit 2."""
    from omegaconf.errors import MissingMandatoryValue

    try:
        yield
    except MissingMandatoryValue as e:
        print(f"error: {e.full_key} is required: add {e.full_key}=... to the command", file=sys.stderr)
        sys.exit(2)
    except UserError as e:
        from rcdm.redaction import scrub

        print(f"error: {scrub(str(e))}", file=sys.stderr)
        sys.exit(2)
