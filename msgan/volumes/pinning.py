"""Model pinning: what translates a batch, resolved once where the batch starts (:func:`pin`), so every
task and actor loads the same model version with the same overrides, never an alias."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from msgan import lease
from msgan.cascade import Cascade, CascadeError, ManifestChangedError, read_manifest_raw


class ModelError(ValueError):
    """A model reference that cannot be pinned or loaded; the message names it and says why."""


@dataclass(frozen=True)
class PinnedModel:
    """What translates a batch, resolved once: every task and actor gets this, never an alias."""

    model: str  # what loads: models:/NAME/VERSION, runs:/..., or an absolute cascade folder
    model_id: str  # what manifests record: NAME/VERSION, or folder-name/manifest-hash
    run: str  # this batch's run id (staging folder, leases)
    overrides: dict[str, Any] = field(default_factory=dict)  # inference.* settings, without the prefix
    tile: int | None = None  # every HR scale's tile core (else each scale's from the memory budget)
    digest: str | None = None  # sha256 of a folder model's manifest.json, checked at every load

    def load(self, device: str | torch.device = "cpu") -> Cascade:
        """The pinned cascade with the overrides (a folder changed since pinning is refused)."""
        if self.model.startswith(("models:/", "runs:/")):
            from msgan.registry import load_cascade

            cascade = load_cascade(self.model, str(device))
        else:
            try:  # the manifest bytes it reads must be the pinned ones; every weight file is checked against them
                cascade = Cascade.load(self.model, device, manifest_sha256=self.digest)
            except ManifestChangedError as err:
                raise ModelError(
                    f"{self.model}: the cascade changed since this batch pinned it ({err}); rerun the batch"
                ) from None
            except CascadeError as err:
                raise ModelError(str(err)) from None
        return with_overrides(cascade, self.overrides)


RUN_KEYS = {"amp": "train.amp"}  # inference overrides whose config key lives elsewhere (the spec's inference.amp)


def with_overrides(cascade: Cascade, overrides: dict[str, Any]) -> Cascade:
    """``cascade`` with the inference settings ``overrides`` (keys without the ``inference.`` prefix; ``amp`` is
    the spec's ``inference.amp``, a config's ``train.amp``)."""
    if overrides:
        keys = {RUN_KEYS.get(k, f"inference.{k}"): v for k, v in overrides.items()}
        cascade.config = cascade.config.replace(**keys)
    return cascade


def _folder_manifest(folder: str) -> tuple[str, dict[str, Any]]:
    """(sha256, content) of a cascade folder's manifest, read once with the folder's confinement rules
    (:func:`msgan.cascade.read_manifest_raw`); :class:`ModelError` naming the file when unusable."""
    try:
        raw, content = read_manifest_raw(folder)
    except CascadeError as err:
        raise ModelError(str(err)) from None
    return hashlib.sha256(raw).hexdigest(), content


def _pin_alias(model: str) -> str:
    """``models:/NAME@ALIAS`` -> ``models:/NAME/VERSION`` (:func:`msgan.registry.pin_model`)."""
    from msgan.registry import pin_model

    try:
        return pin_model(model)
    except ValueError as err:
        raise ModelError(str(err)) from err
    except Exception as err:  # MLflow's own errors for an unknown name or alias
        raise ModelError(f"{model}: cannot be resolved to a registered version ({type(err).__name__}: {err})") from err


def pin(
    model: str, overrides: dict[str, Any] | None = None, tile: int | None = None, run: str | None = None
) -> PinnedModel:
    """Pin ``model`` (registry alias -> version, folder -> manifest hash) for one batch."""
    over = dict(overrides or {})
    if model.startswith("models:/"):
        pinned = _pin_alias(model)
        return PinnedModel(pinned, pinned[len("models:/") :], run or lease.new_run_id(), over, tile)
    if model.startswith("runs:/"):
        return PinnedModel(model, model[len("runs:/") :], run or lease.new_run_id(), over, tile)
    folder = str(Path(model).expanduser().resolve())
    digest, _ = _folder_manifest(folder)
    return PinnedModel(folder, f"{Path(folder).name}/{digest[:12]}", run or lease.new_run_id(), over, tile, digest)
