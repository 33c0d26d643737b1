"""Hostile model folders: a cascade folder is untrusted input (DESIGN invariant 7).

Each case builds a tiny saved cascade in tmp_path, makes it hostile (its manifest names files outside the
folder, a FIFO, a device, a symbolic link, a directory; truncated or pickled-code weights whose sha256 the
manifest was edited to match; an oversized or non-object manifest) and asserts :class:`CascadeError`
naming the folder's file and the rule, within a time limit (nothing may hang), with no code run.
"""

import hashlib
import json
import os
import pickle
import shutil
import threading
from pathlib import Path

import pytest
import torch

from msgan.cascade import (
    MANIFEST_MAX_BYTES,
    WEIGHTS_MAX_BYTES,
    Cascade,
    CascadeError,
    CascadeNotFoundError,
    read_manifest,
)
from tests.conftest import tiny_config

SECONDS = 20  # a load that has not answered by then hangs (a FIFO or /dev/zero read would never return)


class _Payload:
    """Unpickling this object runs a shell command creating ``marker``: code an attacker ships as weights."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return Cascade.untrained(tiny_config(), seed=1).save(tmp_path_factory.mktemp("saved") / "model")


@pytest.fixture
def model(saved, tmp_path) -> Path:
    """A fresh copy of a sound tiny cascade folder, for one test to make hostile."""
    return Path(shutil.copytree(saved, tmp_path / "model"))


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _name_file(folder: Path, scale: int, name: str, content: bytes | None = None) -> None:
    """Make the manifest's entry for ``scale`` name ``name`` (sha256 of ``content`` when given: matching)."""
    m = _manifest(folder)
    m["weights"][scale]["file"] = name
    if content is not None:
        m["weights"][scale]["sha256"] = hashlib.sha256(content).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(m))


def _match_checksum(folder: Path, scale: int) -> None:
    """Edit the manifest so the (replaced) weight file of ``scale`` passes its checksum."""
    _name_file(folder, scale, f"scale_{scale}.pt", (folder / f"scale_{scale}.pt").read_bytes())


def _load(folder: Path):
    """``Cascade.load(folder)`` in a thread: its result or exception, failing the test if it hangs."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = Cascade.load(folder)
        except BaseException as err:  # handed to the test
            box["error"] = err

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(SECONDS)
    assert not t.is_alive(), f"Cascade.load({folder}) still running after {SECONDS} s (it hangs)"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _refused(folder: Path, pattern: str) -> CascadeError:
    with pytest.raises(CascadeError, match=pattern) as err:
        _load(folder)
    assert str(folder) in str(err.value), "the message names the model folder"
    return err.value


def test_the_sound_folder_loads(model):
    loaded, want = _load(model), Cascade.untrained(tiny_config(), seed=1)
    for a, b in zip(loaded.generators, want.generators, strict=True):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert ka == kb and torch.equal(va, vb)


# ----------------------------------------------------------------------------- names that leave the folder


def test_a_relative_path_out_of_the_folder_is_refused(model, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(model / "scale_0.pt", outside / "w1.pt")  # sound weights, checksum matching: main loaded them
    _name_file(model, 0, "../outside/w1.pt", (outside / "w1.pt").read_bytes())
    err = _refused(model, r"weights\[0\] names '\.\./outside/w1\.pt'; a model file must be a plain file name")
    assert "inside the model folder" in str(err)


@pytest.mark.parametrize("name", ["/etc/passwd", "/dev/zero", "sub\\scale_0.pt", "..", "", "a\x00b", "x" * 300])
def test_absolute_and_other_non_plain_names_are_refused_before_any_read(model, name):
    _name_file(model, 0, name)
    _refused(model, r"weights\[0\] names .*a model file must be a plain file name")


def test_read_manifest_for_msgan_info_applies_the_same_rules(model):
    assert read_manifest(model)["num_scales"] == 3
    _name_file(model, 1, "/etc/passwd")
    with pytest.raises(CascadeError, match=r"manifest\.json: weights\[1\] names '/etc/passwd'"):
        read_manifest(model)
    with pytest.raises(CascadeNotFoundError, match="not a cascade folder"):
        read_manifest(model / "scale_0.pt")


# ----------------------------------------------------------------------------- files that are not regular files


def test_a_fifo_named_by_the_manifest_is_refused_without_hanging(model):
    (model / "scale_1.pt").unlink()
    os.mkfifo(model / "scale_1.pt")
    _refused(model, r"scale_1\.pt: a FIFO \(named pipe\); a model file must be a regular file")


@pytest.mark.parametrize("where", ["outside", "inside", "dev-zero"])
def test_symbolic_links_are_refused(model, tmp_path, where):
    target = {
        "outside": tmp_path / "elsewhere.pt",
        "inside": model / "copy.pt",
        "dev-zero": Path("/dev/zero"),
    }[where]
    if where != "dev-zero":
        shutil.copy(model / "scale_1.pt", target)  # the same bytes: the checksum would pass
    (model / "scale_1.pt").unlink()
    (model / "scale_1.pt").symlink_to(target)
    _refused(model, r"scale_1\.pt: a symbolic link; a model file must be a regular file")


def test_a_directory_named_as_weights_is_refused(model):
    (model / "scale_2.pt").unlink()
    (model / "scale_2.pt").mkdir()
    _refused(model, r"scale_2\.pt: a directory; a model file must be a regular file")


def test_a_weights_file_above_the_cap_is_refused_before_reading(model):
    with (model / "scale_0.pt").open("r+b") as f:  # sparse: 2 GiB + 1 byte on paper, nothing on disk
        f.truncate(WEIGHTS_MAX_BYTES + 1)
    _refused(
        model, rf"scale_0\.pt: {WEIGHTS_MAX_BYTES + 1} bytes, above the cap of {WEIGHTS_MAX_BYTES} bytes \(2 GiB\)"
    )


# ----------------------------------------------------------------------------- the manifest itself


def test_an_oversized_manifest_is_refused(model):
    m = (model / "manifest.json").read_text()
    (model / "manifest.json").write_text(m[:-1] + " " * MANIFEST_MAX_BYTES + "}")  # valid JSON, 1 MiB of blanks
    _refused(model, rf"manifest\.json: \d+ bytes, above the cap of {MANIFEST_MAX_BYTES} bytes \(1 MiB\) per manifest")


@pytest.mark.parametrize(
    ("content", "rule"),
    [
        ("[1, 2, 3]", "not a JSON object"),
        ('"scale_0.pt"', "not a JSON object"),
        ("{not json", "not valid JSON"),
        ('{"format": "msgan-cascade/1"}', "missing keys config, weights"),
    ],
)
def test_a_manifest_that_is_not_a_cascade_object_is_refused(model, content, rule):
    (model / "manifest.json").write_text(content)
    _refused(model, rf"manifest\.json: malformed cascade manifest: {rule}")


def test_a_manifest_that_is_a_symlink_or_missing_is_refused(model, tmp_path):
    real = tmp_path / "elsewhere.json"
    (model / "manifest.json").rename(real)
    with pytest.raises(CascadeNotFoundError, match="not a cascade folder"):
        _load(model)
    (model / "manifest.json").symlink_to(real)
    _refused(model, r"manifest\.json: a symbolic link")


# ----------------------------------------------------------------------------- weights that are not weights


def test_truncated_weights_with_a_matching_checksum_name_the_file(model):
    data = (model / "scale_1.pt").read_bytes()
    (model / "scale_1.pt").write_bytes(data[: len(data) // 2])
    _match_checksum(model, 1)
    err = _refused(model, r"scale_1\.pt: not a weights file torch can load weights-only \(RuntimeError: ")
    assert "Errno" not in str(err)


def test_an_empty_weights_file_with_a_matching_checksum_names_the_file(model):
    (model / "scale_0.pt").write_bytes(b"")
    _match_checksum(model, 0)
    _refused(model, r"scale_0\.pt: not a weights file torch can load weights-only \(EOFError: the file ends early\)")


@pytest.mark.parametrize("form", ["torch.save", "plain pickle"])
def test_a_malicious_pickle_with_a_matching_checksum_runs_no_code(model, tmp_path, form):
    marker = tmp_path / "code-ran"
    if form == "torch.save":
        torch.save({"head.0.weight": _Payload(marker)}, model / "scale_1.pt")
    else:
        (model / "scale_1.pt").write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    _match_checksum(model, 1)
    err = _refused(model, r"scale_1\.pt: not a weights file torch can load weights-only \(UnpicklingError: ")
    assert not marker.exists(), "loading the model ran code stored in it"
    text = str(err)
    assert "weights_only=False" not in text and "`weights_only` set to `False`" not in text
    assert err.__cause__ is None and err.__suppress_context__, "torch's advice stays out of the traceback too"


def test_weights_with_a_wrong_checksum_are_refused(model):
    with (model / "scale_2.pt").open("ab") as f:
        f.write(b"tampered")
    _refused(model, r"scale_2\.pt: checksum does not match the manifest")


def test_weights_that_do_not_fit_the_config_are_refused(model):
    torch.save({"head.0.weight": torch.zeros(3)}, model / "scale_1.pt")  # tensors, but not this network's
    _match_checksum(model, 1)
    _refused(model, r"scale_1\.pt: the weights do not fit scale 1 of the manifest's config")
    torch.save([torch.zeros(3)], model / "scale_1.pt")
    _match_checksum(model, 1)
    _refused(model, r"scale_1\.pt: holds a list, not a dict of named tensors")


def test_a_config_declaring_a_huge_network_allocates_nothing(model):
    m = _manifest(model)
    m["spec"]["hr_generator"]["width"] = 1 << 16  # ~10^11 parameters: would exhaust memory if built
    (model / "manifest.json").write_text(json.dumps(m))
    _refused(model, r"scale_1\.pt: the weights do not fit scale 1 of the manifest's config")
