"""Image sets: the source domain's images and the target domain's images, for training without pairs.

Training without pairs (``data.source: unpaired``, ``train.objective: unpaired``) takes two sets of images,
usually of different subjects: ``data.sources`` (what a site has: a sharp-kernel archive) and ``data.targets``
(what it wants: the reference soft kernel). Each set is either

- a CSV (local or ``s3://``), the pairs manifest's sibling (:mod:`msgan.data.pairs`): the column ``image``
  and optionally ``split`` (``train``, the default, or ``holdout``: translated at the end of the job and never
  scored, for there is no target) and ``patient``. A row names the same formats as a side of a pair (NIfTI,
  MHA, NRRD, a folder holding one DICOM series, a CR/DX DICOM file, an OME-Zarr volume, local or ``s3://``),
  relative paths resolve against the CSV's own folder, and every refusal is an :class:`ImagesError` naming
  the CSV and its line (the header is line 1); or
- a local folder ("two folders of images"): every image file (NIfTI, MHA, NRRD, DICOM), every OME-Zarr volume
  and every other sub-folder (one DICOM series each) directly inside it is one ``train`` image, in name order.
  Hidden entries and files of no image format (a README, a CSV) are skipped.

Scores need pairs, so validation and held-out scoring come from a pairs manifest (``data.pairs``, rows
``validation`` or ``holdout``). :func:`check_sets` checks both sets together, and against those pairs, before
any work: every image readable and of the model's dimensionality, one modality, no image in both sets or in a
scored pair, one patient in one split.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from msgan import storage
from msgan.config import ConfigError
from msgan.data.pairs import (
    PairCheck,
    PairsError,
    SideInfo,
    Splits,
    csv_uri,
    decode_csv,
    manifest_rows,
    pair_patient_id,
    read_csv_bytes,
    ref_exists,
    ref_key,
    resolve_ref,
    side_info,
)
from msgan.io.volume import ITK_SUFFIXES, ZARR_SUFFIXES

KIND = "an image-set CSV"  # what refusals call the file

SPLITS = ("train", "holdout")
COLUMNS = ("image", "split", "patient")
DICOM_SUFFIXES = (".dcm", ".dicom")
_HEADER_HINT = "an image-set CSV starts with the header 'image[,split][,patient]'"


class ImagesError(ConfigError):
    """An image set that cannot be used; the message is ``<csv> row <N>: <reason>`` (or ``<set>: <reason>`` for
    the set as a whole)."""


@dataclass(frozen=True)
class Image:
    """One image of a set, its path resolved."""

    row: int  # the CSV line number (the header is line 1); a folder's entries count from 1 in name order
    ref: str  # a local path or an s3:// URI
    split: str = "train"
    patient: str = ""  # "" when the column is absent or empty (and always for a folder's entries)
    label: str = ""  # what a person reads: "<csv name> row <N>" or "<folder name>/<entry>"
    in_folder: bool = False  # an entry of a folder set (not a CSV row)


# ----------------------------------------------------------------------------- a set


def is_folder(uri: str | os.PathLike[str]) -> bool:
    """Whether ``uri`` names a local folder of images (rather than a CSV)."""
    text = str(uri)
    if storage.is_s3(text) or ("://" in text and not text.startswith("file://")):
        return False
    path = text[len("file://") :] if text.startswith("file://") else text
    return os.path.isdir(os.path.expanduser(path))


def read_images(uri: str | os.PathLike[str], check_files: bool = True) -> list[Image]:
    """The images of a set: a CSV (:func:`read_manifest`) or a local folder (:func:`read_folder`)."""
    return read_folder(uri) if is_folder(uri) else read_manifest(uri, check_files)


def _is_dicom_file(path: str) -> bool:
    """A DICOM Part 10 file: the ``DICM`` magic after the 128-byte preamble (or a .dcm/.dicom name)."""
    if path.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def read_folder(uri: str | os.PathLike[str]) -> list[Image]:
    """The images directly inside a local folder, in name order (deterministic across machines): files of an
    image format (NIfTI, MHA, NRRD, DICOM), OME-Zarr volumes (``*.zarr``) and every other sub-folder (one
    DICOM series each; :func:`check_sets` refuses one that holds none or several). Hidden entries and other
    files are skipped; a link to nothing (a missing image) and a folder with no image are refused."""
    shown = str(uri)
    text = shown[len("file://") :] if shown.startswith("file://") else shown
    folder = os.path.expanduser(text)
    if folder.rstrip("/").lower().endswith(ZARR_SUFFIXES):
        raise ImagesError(f"{shown}: one OME-Zarr volume; a set is a folder of images or a CSV that lists them")
    try:
        names = sorted(os.listdir(folder))
    except OSError as err:
        raise ImagesError(f"{shown}: cannot list the folder ({err.strerror or err})") from None
    base = Path(os.path.normpath(folder)).name
    images: list[Image] = []
    for name in names:
        if name.startswith("."):
            continue
        path = os.path.join(folder, name)
        low = name.lower()
        if os.path.isdir(path):
            keep = True  # an OME-Zarr volume or a folder holding one DICOM series
        elif os.path.isfile(path):
            keep = low.endswith(ITK_SUFFIXES) or _is_dicom_file(path)
        elif os.path.islink(path):  # a link to nothing: an image of the set that is missing (an unmounted archive)
            raise ImagesError(
                f"{shown}: {name} is a link to {os.readlink(path)!r}, which does not exist; an image of the set is "
                "missing (a set never leaves one out silently: restore it or remove the link)"
            )
        else:
            keep = False  # a FIFO, a device
        if keep:
            images.append(Image(len(images) + 1, os.path.normpath(path), "train", "", f"{base}/{name}", True))
    if not images:
        raise ImagesError(
            f"{shown}: no image in this folder (image files {', '.join(ITK_SUFFIXES)}, DICOM files, *.zarr volumes "
            "or one sub-folder per DICOM series, directly inside it)"
        )
    return images


def _text_of(uri: str | os.PathLike[str]) -> str:
    """The CSV's text, read and decoded with the pairs manifest's limits (size, NUL bytes, UTF-8)."""
    try:
        return decode_csv(str(uri), read_csv_bytes(uri, KIND), KIND)
    except PairsError as err:  # the same rules, named for what this file is
        raise ImagesError(str(err)) from None


def _header(shown: str, first: list[str], row: int) -> list[str]:
    names = [c.strip().lower() for c in first]
    for i, name in enumerate(names):
        if name not in COLUMNS:
            hint = "; this looks like a pairs manifest: name it in data.pairs" if name in ("source", "target") else ""
            raise ImagesError(
                f"{shown} row {row}: unknown column {first[i].strip()!r} (column {i + 1}); the columns are "
                f"{', '.join(COLUMNS)} (image required){hint}"
            )
        if name in names[:i]:
            raise ImagesError(f"{shown} row {row}: column {name!r} appears twice")
    if "image" not in names:
        raise ImagesError(f"{shown} row {row}: no 'image' column; {_HEADER_HINT}")
    return names


def read_manifest(uri: str | os.PathLike[str], check_files: bool = True) -> list[Image]:
    """The images an image-set CSV names, checked: known columns, an image on every row, a known split, no image
    twice, one patient in one split, and (``check_files``) every file there."""
    shown = str(uri)
    text = _text_of(uri)
    base_uri = csv_uri(uri)
    images: list[Image] = []
    seen: dict[str, int] = {}
    patient_split: dict[str, tuple[str, int]] = {}
    for row, where, cells in manifest_rows(shown, text, _header, ImagesError, _HEADER_HINT):
        if not cells["image"]:
            raise ImagesError(f"{where}: no image (every row names one)")
        split = cells.get("split", "").lower() or "train"
        if split == "validation":
            raise ImagesError(
                f"{where}: split 'validation': an image set has train and holdout rows; validation scores need a "
                "target, so validation pairs go in a pairs manifest (data.pairs)"
            )
        if split not in SPLITS:
            raise ImagesError(f"{where}: split {cells['split']!r} is not one of {', '.join(SPLITS)}")
        try:
            ref = resolve_ref(shown, row, "image", cells["image"], base_uri)
        except PairsError as err:
            raise ImagesError(str(err)) from None
        key = ref_key(ref)
        if key in seen:
            raise ImagesError(f"{where}: the same image as row {seen[key]} (one image is listed once)")
        patient = cells.get("patient", "")
        if patient:
            first = patient_split.setdefault(patient, (split, row))
            if first[0] != split:
                raise ImagesError(
                    f"{where}: patient {patient!r} is in split {split!r} here and in split {first[0]!r} at row "
                    f"{first[1]}; one patient's images belong to one split"
                )
        if check_files and not ref_exists(ref):
            raise ImagesError(f"{where}: image {ref} does not exist")
        seen[key] = row
        images.append(Image(row, ref, split, patient, f"{Path(shown).name} row {row}"))
    if not images:
        raise ImagesError(f"{shown}: no images below the header")
    return images


# ----------------------------------------------------------------------------- both sets together


@dataclass(frozen=True)
class ImageCheck:
    """Whether an image of a set can be used, and what its header says."""

    image: Image
    role: str  # "sources" or "targets"
    info: SideInfo | None
    problems: tuple[str, ...]

    @property
    def usable(self) -> bool:
        return not self.problems


def _info(ref: str) -> tuple[SideInfo | None, str | None]:
    from msgan.io.dicom import DicomError
    from msgan.io.volume import VolumeError

    try:
        return side_info(ref), None
    except (VolumeError, DicomError, ValueError, FileNotFoundError, OSError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return None, f"unreadable ({reason if ref in reason else f'{ref}: {reason}'})"


def check_sets(
    sources: Sequence[Image],
    targets: Sequence[Image],
    dims: int | None = None,
    pairs: Sequence[PairCheck] = (),
    pairs_name: str = "pairs",
) -> list[ImageCheck]:
    """Every image of both sets checked, alone and together (``pairs``: the checked validation and held-out
    pairs of ``data.pairs``, :func:`msgan.data.pairs.check_pairs`). An image's problems: unreadable; not of
    ``dims`` dimensions; a modality other than the sets' first known one; the same image in both sets or as a
    side of a scored pair (its score would be of a training image); its patient (the ``patient`` column, else
    the DICOM PatientID) in another split, in either set or among the pairs (held-out figures leak otherwise;
    the same patient in the training split of both sets is fine)."""
    if dims is not None and dims not in (2, 3):
        raise ValueError(f"dims {dims}: 2 or 3")
    entries = [("sources", im) for im in sources] + [("targets", im) for im in targets]
    pair_sides: dict[str, tuple[str, str]] = {}
    splits = Splits()  # the scored pairs' patients first: their own clashes are check_pairs' to say
    for c in pairs:
        where = f"{pairs_name} row {c.pair.row} ({c.pair.split})"
        for ref in (c.pair.source, c.pair.target):
            pair_sides.setdefault(ref_key(ref), (where, c.pair.split))
        splits.place(c.pair.patient, pair_patient_id(c), c.pair.split, where)
    seen: dict[str, str] = {}
    modality: tuple[str, str] | None = None
    out = []
    for role, im in entries:
        problems: list[str] = []
        info, why = _info(im.ref)
        if why:
            problems.append(why)
        if info is not None and dims is not None and len(info.shape) != dims:
            hint = " (a folder set holds one image per entry: a file, or one sub-folder per DICOM series)"
            problems.append(f"a {len(info.shape)}D image, the model is {dims}D" + (hint if im.in_folder else ""))
        if info is not None and info.modality:
            if modality is None:
                modality = (info.modality, im.label)
            elif info.modality != modality[0]:
                problems.append(f"modality {info.modality}, but {modality[1]} is {modality[0]}: one modality per job")
        key = ref_key(im.ref)
        if key in seen:
            problems.append(f"the same image as {seen[key]}: an image belongs to one set")
        seen.setdefault(key, f"{im.label} ({role})")
        if key in pair_sides:
            problems.append(f"also a side of {pair_sides[key][0]}: a scored pair must not be a training image")
        patient_id = info.patient if info is not None and info.patient else ""
        clash = splits.place(im.patient, patient_id, im.split, f"{im.label} ({role}, {im.split})")
        if clash:
            problems.append(clash)
        out.append(ImageCheck(im, role, info, tuple(problems)))
    return out


def describe(check: ImageCheck) -> str:
    """One line for a person: the image's label, set, split, size and spacing, problems or ok."""
    info = check.info
    size = "?"
    if info is not None:
        size = "x".join(str(s) for s in info.shape[::-1]) + " @ "
        size += "x".join(f"{s:.3g}" for s in info.geometry.spacing) + " mm"
        size += f" {info.modality}" if info.modality else ""
    tail = f"UNUSABLE: {'; '.join(check.problems)}" if check.problems else "ok"
    return f"{check.image.label} ({check.role}, {check.image.split}) {size}  {tail}"


__all__ = [
    "COLUMNS",
    "SPLITS",
    "Image",
    "ImageCheck",
    "ImagesError",
    "check_sets",
    "describe",
    "is_folder",
    "read_folder",
    "read_images",
    "read_manifest",
]
