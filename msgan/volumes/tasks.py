"""A volume's task (its input, its output, its run's staging folder and lease) and what an output may be:
absent, or msgan's own published translation (its ``manifest.json``), checked before any work."""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from msgan import lease, storage
from msgan.io import outputs
from msgan.io.volume import VolumeError

MANIFEST = "manifest.json"
PUBLISHING = ".publishing.json"  # on s3://, beside an output whose manifest is being replaced (ours, mid-publish)
MANIFEST_KEYS = ("volume", "model", "shape", "tiles", "checksum_sha256")


@dataclass(frozen=True)
class VolumeTask:
    name: str
    input: str  # URI of the input OME-Zarr group
    output: str  # URI of the published output group
    staging: str  # URI of this run's staging folder for this volume
    model: str  # what translates it, pinned, e.g. "msgan-cascade/3"
    run: str = ""  # the run id (leases)

    @property
    def inputs_uri(self) -> str:
        return storage.join(self.staging, "inputs.zarr")

    @property
    def result_uri(self) -> str:
        return storage.join(self.staging, "output.zarr")

    @property
    def lease(self) -> lease.Lease:
        parent, base = posixpath.split(self.output.rstrip("/"))
        return lease.Lease(f"{parent}/.leases/{base}.json", self.run)


def parent_of(uri: str) -> str:
    """The folder (prefix) an output lives in: its ``.leases`` and ``.staging`` are there."""
    return posixpath.dirname(uri.rstrip("/"))


def volume_task(
    input_uri: str, out_prefix: str, model: str, output: str | None = None, run: str | None = None
) -> VolumeTask:
    """The task of translating ``input_uri`` into ``<out_prefix>/<name>.zarr`` (or ``output``);
    staging lives beside the output, under ``.staging/``, one folder per volume and run."""
    src = storage.normalize_uri(input_uri)
    base = posixpath.basename(src.rstrip("/"))
    name = base[: -len(".zarr")] if base.endswith(".zarr") else base
    dest = output if output else storage.join(storage.normalize_uri(out_prefix), f"{name}.zarr")
    dest = outputs.resolve_output(dest, [src])  # a symlink leaving its folder, or the input itself: refused
    run = run or lease.new_run_id()
    return VolumeTask(name, src, dest, staging=f"{parent_of(dest)}/.staging/{name}-{run}", model=model, run=run)


def check_collisions(tasks: Sequence[VolumeTask]) -> None:
    """Refuse (before any work) inputs that would be translated into the same output."""
    by_output: dict[str, list[str]] = {}
    for t in tasks:
        by_output.setdefault(t.output, []).append(t.input)
    clashes = {out: ins for out, ins in by_output.items() if len(ins) > 1}
    if clashes:
        out, ins = next(iter(clashes.items()))
        raise VolumeError(
            f"{len(ins)} inputs map to one output {out}: {', '.join(ins)}; give volumes distinct names "
            f"or translate them into different output prefixes ({len(clashes)} such output(s))"
        )


def expand_inputs(items: Sequence[str]) -> list[str]:
    """Volumes named directly (``*.zarr``) or every ``*.zarr`` directly under a prefix."""
    out: list[str] = []
    for item in items:
        uri = storage.normalize_uri(item)
        if uri.rstrip("/").endswith(".zarr"):
            out.append(uri)
            continue
        fs, path = storage.filesystem(uri)
        if not fs.isdir(path):
            raise VolumeError(f"{item}: neither a .zarr volume nor a prefix holding them")
        scheme = "s3://" if storage.is_s3(uri) else "file://"
        found = sorted(p.rstrip("/") for p in fs.ls(path, detail=False) if p.rstrip("/").endswith(".zarr"))
        if not found:
            raise VolumeError(f"{item}: no .zarr volumes under this prefix")
        out += [scheme + p.lstrip("/") if scheme == "s3://" else scheme + p for p in found]
    return out


# ----------------------------------------------------------------------------- what an output may be


def _json_at(output: str, name: str, keys: Sequence[str]) -> dict[str, Any] | None:
    """``<output>/<name>`` as a JSON object holding ``keys``; None when absent. A malformed one is a
    :class:`VolumeError`: the output is then nobody's to replace."""
    uri = storage.join(output, name)
    if not storage.exists(uri):
        return None
    try:
        return storage.json_object(storage.read_bytes(uri), keys)
    except ValueError as err:
        raise VolumeError(
            f"{uri}: malformed manifest: {err}; {output} is not replaced: check it and remove it yourself "
            "to translate it again"
        ) from err


def read_manifest(task: VolumeTask) -> dict[str, Any] | None:
    """The published output's manifest, None when unpublished; a malformed one is a :class:`VolumeError`."""
    return _json_at(task.output, MANIFEST, MANIFEST_KEYS)


def is_ours(output: str) -> bool:
    """Whether ``output`` is msgan's own translation: published (its manifest) or caught mid-publish on
    ``s3://`` (the marker written before an old manifest is removed). Only such an output is ever replaced."""
    return _json_at(output, MANIFEST, MANIFEST_KEYS) is not None or _json_at(output, PUBLISHING, ("run",)) is not None


def check_output(task: VolumeTask, replace: bool = True, volumes: bool = False) -> dict[str, Any] | None:
    """Before any work: the output is absent, or msgan's own (its manifest, returned). Another model
    version's output is replaced only with ``replace`` (the batch job's rule; ``msgan translate`` asks for
    ``--replace``), a zarr volume msgan wrote without a manifest only with ``volumes`` (``--replace``);
    anything else there is refused, never emptied (:class:`msgan.io.outputs.OutputError`)."""
    previous = read_manifest(task)  # read once: it decides both whose the output is and which model made it

    def ours(uri: str) -> bool:
        return previous is not None or is_ours(uri) or (volumes and outputs.is_msgan_volume(uri))

    outputs.refuse_foreign(task.output, ours, hint="; a translation goes to a new path or to msgan's own output")
    if previous is not None and previous["model"] != task.model and not replace:
        raise outputs.OutputError(
            f"{task.output}: holds msgan's translation by {previous['model']}; pass --replace to replace it with "
            f"{task.model}'s"
        )
    return previous


def is_published(task: VolumeTask, by_same_model: bool = True) -> bool:
    """Published (by ``task.model`` unless ``by_same_model`` is false)."""
    manifest = read_manifest(task)
    return manifest is not None and (not by_same_model or manifest["model"] == task.model)
