"""What a command may write over: nothing it did not write.

Every command that writes a named output (``translate``, ``export``, ``ingest``, ``phantom``, the batch
job) asks this module first:

- :func:`resolve_output`: the output as a URI, with a symlinked last component resolved and refused
  when it leaves the output's folder, and refused when it is, holds or lies inside one of the inputs;
- :func:`refuse_foreign`: an existing output is replaced only when it is msgan's own published output
  (the caller says how to recognise one: a ``manifest.json`` for translations, the series UID for a
  DICOM export) and the rules of the command allow it; a single file only with ``--replace``. Anything
  else (a folder of someone's files, a zarr store we did not publish) is refused with what is there,
  never emptied.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from msgan import storage


class OutputError(ValueError):
    """An output that would replace or destroy what msgan did not write; the message says what is there."""


def _local(uri: str) -> Path | None:
    return None if storage.is_s3(uri) else storage.local_path(uri)


def _listed(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def describe(uri: str) -> str:
    """What is at ``uri`` now, in a few words (for refusals)."""
    path = _local(uri)
    if path is None:
        fs, key = storage.filesystem(uri)
        try:
            found = fs.find(key)
        except OSError:
            found = []
        names = sorted(p[len(key.rstrip("/")) + 1 :] for p in found)
        return f"a prefix holding {len(names)} object(s) ({_listed(names)})" if names else "an object"
    if path.is_symlink():
        return f"a symlink to {os.readlink(path)}"
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir())
        return f"a folder holding {len(names)} entries ({_listed(names)})" if names else "an empty folder"
    if path.is_file():
        return f"a file of {path.stat().st_size} bytes"
    return "something that is not a file or folder"


def exists(uri: str) -> bool:
    path = _local(uri)
    if path is None:
        return storage.exists(uri)
    return path.exists() or path.is_symlink()


def _same_or_nested(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _real(uri: str) -> str:
    path = _local(uri)
    return uri if path is None else storage.normalize_uri(os.path.realpath(path))


def resolve_output(output: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]] = ()) -> str:
    """``output`` as a URI to write. A local output that is a symlink is followed when it stays in the
    output's own folder and refused when it leaves it; an output that is an input, holds one or lies inside
    one is refused (both compared after resolving symlinks)."""
    uri = storage.normalize_uri(output)  # resolves symlinks: look at the path as given first
    given = str(output)[len("file://") :] if str(output).startswith("file://") else str(output)
    path = None if storage.is_s3(uri) else Path(os.path.abspath(Path(given).expanduser()))
    if path is not None and path.is_symlink():
        target = Path(os.path.realpath(path))
        if target.parent != Path(os.path.realpath(path.parent)):
            raise OutputError(
                f"{output}: is a symlink to {target}, outside its folder {path.parent}; msgan does not write "
                "through it (give the real path)"
            )
        uri = storage.normalize_uri(target)
    real = _real(uri)
    for item in inputs:
        if _same_or_nested(real, _real(storage.normalize_uri(item))):
            raise OutputError(
                f"{output}: is the input {item} (or holds it, or lies inside it); write the result elsewhere: "
                "an input is never replaced by its own translation"
            )
    return uri


def refuse_foreign(
    uri: str, ours: Callable[[str], bool], replace: bool = False, what: str = "output", hint: str = ""
) -> bool:
    """Refuse an existing ``uri`` that is not msgan's own output (``ours(uri)`` false); a single regular file
    is accepted with ``replace``. Returns whether something exists there (to be replaced)."""
    if not exists(uri):
        return False
    if ours(uri):
        return True
    path = _local(uri)
    if replace and path is not None and path.is_file() and not path.is_symlink():
        return True
    flag = " (pass --replace to replace this file)" if path is not None and path.is_file() and not replace else ""
    raise OutputError(
        f"{uri}: the {what} exists and is {describe(uri)}, not an output msgan published; it is never replaced "
        f"or emptied{flag}{hint}. Give a new path"
    )


def refuse_unless_replace(uri: str, ours: Callable[[str], bool], replace: bool, what: str = "") -> None:
    """A command's single output: absent, or replaced only with ``--replace`` and only when it is ``ours`` or a
    single file (:func:`refuse_foreign`); ``what`` says what is there, for the refusal."""
    if refuse_foreign(uri, ours, replace=replace) and not replace:
        raise OutputError(f"{uri}: exists{f' ({what})' if what else ''}; pass --replace to replace it")


def is_msgan_volume(uri: str) -> bool:
    """Whether ``uri`` is a zarr volume msgan wrote (its ``msgan`` attribute holds a geometry): what
    ``--replace`` may replace besides a published translation."""
    from msgan.io.volume import VolumeError, open_group

    try:
        meta = open_group(uri, "r").attrs.get("msgan")
    except (VolumeError, OSError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("geometry"), dict)


def remove_empty_dirs(*uris: str) -> None:
    """Remove the given local folders if they are empty (``.leases``, ``.staging`` beside an output)."""
    for uri in uris:
        path = _local(uri)
        if path is None:
            continue
        with contextlib.suppress(OSError):
            path.rmdir()
