"""WebDataset tars read as a stream, judged member by member before any member is read whole.

A WebDataset sample is a run of consecutive members sharing a key (``dir/name.ext``: key ``dir/name``,
extension ``ext`` lower-cased). Only regular files are read, and only up to ``max_member_bytes``: links,
devices, FIFOs, sparse members (which claim a size the archive does not hold) and oversized members are
reported with their reason, unread. A tar that ends inside a member raises ``TruncatedTar`` after the
samples before it. A tar is someone else's file: it is trusted for its bytes only.
"""
from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass, field
from typing import IO, Iterator

DEFAULT_MAX_MEMBER_BYTES = 512 * 2 ** 20  # far above any real image or embedding, far below a sparse-file bomb
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_KINDS = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a character device",
          tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO", tarfile.CONTTYPE: "a contiguous file"}


class TruncatedTar(Exception):
    """The tar ends inside a member (or its header): everything after ``after`` is missing."""

    def __init__(self, after: str | None, detail: str):
        super().__init__(f"the tar is truncated or corrupt after {after or 'its start'} ({detail})")
        self.after = after


@dataclass
class Sample:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes
    problems: list[str] = field(default_factory=list)  # why members of this sample were not read


def _problem(info: tarfile.TarInfo, max_bytes: int) -> str | None:
    if info.issparse():
        return f"member {info.name} is a sparse file claiming {info.size} bytes"
    if not info.isreg():
        return f"member {info.name} is {_KINDS.get(info.type, f'not a regular file (type {info.type!r})')}"
    if info.size > max_bytes:
        return f"member {info.name} has {info.size} bytes, more than max_member_bytes={max_bytes}"
    return None


def read_samples(fileobj: IO[bytes], max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[Sample]:
    """The samples of a tar in order. A sample whose key comes back after other samples is yielded again (the
    caller decides what a repeated key means); a repeated extension within a sample is a problem of it."""
    current: Sample | None = None
    last_name = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for info in tar:
                if info.isdir():
                    continue  # a folder entry carries nothing
                m = _KEY_EXT.match(info.name)
                key, ext = (m[1], m[2].lower()) if m else (info.name, "")
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = Sample(key)
                problem = _problem(info, max_member_bytes) or (None if m else f"member {info.name} has no extension")
                if problem is None and ext in current.members:
                    problem = f"member {info.name} appears twice in the sample"
                if problem:
                    current.problems.append(problem)
                else:
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        raise TruncatedTar(last_name, f"{info.name} holds {len(data)} of its {info.size} bytes")
                    current.members[ext] = data
                last_name = info.name
    except TruncatedTar:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise TruncatedTar(last_name, f"{type(e).__name__}: {e}") from None
    if current is not None:
        yield current
