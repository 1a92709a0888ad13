"""Writing files and folders so that a crash never leaves half of one: a temporary name, then os.replace.

    with atomic.path("report.png") as tmp:    # any writer: savefig, save_pretrained, open(...)
        fig.savefig(tmp)
    atomic.write_text("report.json", text)
    with atomic.folder("merged_model") as tmp:
        model.save_pretrained(tmp)

The temporary name sits in the same folder (os.replace is atomic only within one file system) and
keeps the extension (writers such as savefig choose the format from it). On an exception the
temporary file or folder is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def path(target: str, fsync: bool = False) -> Iterator[str]:
    """Yield a temporary path beside `target`; on success it replaces `target` (flushed to disk first if fsync)."""
    root, ext = os.path.splitext(target)
    tmp = f"{root}.tmp-{os.getpid()}{ext}"
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(target: str, text: str, fsync: bool = False) -> None:
    """Write UTF-8 text to `target` atomically."""
    with path(target, fsync) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)


@contextlib.contextmanager
def folder(target: str) -> Iterator[str]:
    """Yield a fresh temporary folder beside `target`; on success it becomes `target` (which must not exist yet)."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        yield tmp
        os.replace(tmp, target)  # fails, keeping target, if another process created a non-empty target meanwhile
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
