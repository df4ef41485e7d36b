"""The one exception type that launchers turn into a one-line message instead of a traceback."""
import contextlib
import sys
from collections.abc import Iterator


class UserError(Exception):
    """Bad input or a missing file; the message says what to do about it."""


class DatasetError(UserError):
    """A dataset that cannot be read as its manifest says (damaged, altered, truncated): the message names the
    shard and the fix, on one line."""

    def __init__(self, message: str):
        # A DataLoader worker's exception comes back as type(e)("Caught DatasetError in DataLoader worker process
        # 0.\nOriginal Traceback ...\nrcdm.errors.DatasetError: <message>"): keep the message alone.
        if message.startswith("Caught ") and "Original Traceback" in message:
            lines = [ln for ln in message.splitlines() if ln.startswith(f"{__name__}.DatasetError: ")]
            message = lines[-1].split(": ", 1)[1] if lines else message
        super().__init__(message)


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
