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
def cli_errors(catch_all: bool = True) -> Iterator[None]:
    """In a launcher: a UserError or a missing mandatory config value becomes one `error:` line and exit 2; with
    ``catch_all``, any other exception (a bug, a server's error) its traceback with credentials masked and exit 1,
    so no password in a tracking URI or an exception's text reaches the console. A sweep's job passes False: its
    exceptions go to Hydra's launcher, which masks them itself (pipeline/guard.py) and ends the runs."""
    from omegaconf.errors import MissingMandatoryValue

    from rcdm.redaction import printable

    try:
        yield
    except MissingMandatoryValue as e:
        print(f"error: {e.full_key} is required: add {e.full_key}=... to the command", file=sys.stderr)
        sys.exit(2)
    except UserError as e:
        print(f"error: {printable(str(e))}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - printed masked, then the exit status says it failed
        if not catch_all:
            raise
        import traceback

        text = "".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip()
        print(f"{printable(text)}\nerror: {type(e).__name__}: {printable(str(e))}", file=sys.stderr)
        sys.exit(1)
