"""Translation of volumes at rest (OME-Zarr on ``file://`` or ``s3://``), staged, then published whole.

One :class:`~msgan.volumes.pinning.PinnedModel` per batch, pinned once where the batch starts
(:func:`~msgan.volumes.pinning.pin`): the model reference pinned (``models:/NAME@ALIAS`` ->
``models:/NAME/VERSION``, a folder -> its manifest's hash), the inference overrides, the run id. Every
step of every volume receives it, never the alias.

A volume (:class:`~msgan.volumes.tasks.VolumeTask`: input, output, staging, lease) goes through four steps,
each a plain function of its task, so Ray Data (:mod:`msgan.distributed.translate`) and the local
``msgan translate`` (:func:`msgan.volumes.local.translate_volume`) run the same code:

1. :mod:`~msgan.volumes.staging`: the input is checked (geometry, every chunk present) and its
   :class:`~msgan.volumes.staging.VolumePlan` made (shapes, tile cores, geometry, source attributes); the
   windowed input and its edge pyramid are written block by block (dask) into the run's own staging folder;
   the output levels are created, chunked by each scale's tile;
2. + 3. :mod:`~msgan.volumes.steps`: the staged volume as the target of the one per-scale loop
   (:mod:`msgan.scale_loop`): scale 0 on the whole LR edge image, then each HR scale tile by tile; a tile's
   core is exactly one output chunk, so no two tiles ever write the same chunk;
4. :mod:`~msgan.volumes.publishing`: every level is checked complete (staged arrays read NaN where never
   written) and checksummed, the manifest is written, and the output appears at once: an atomic exchange
   with the old output on ``file://``; on ``s3://`` a copy whose ``manifest.json`` is written last.

A volume is published iff ``<output>/manifest.json`` exists. A rerun skips outputs published by the
same model version and translates again (and replaces) those of another version
(:mod:`~msgan.volumes.tasks`). A lease per output (:mod:`msgan.lease`) keeps two runs from publishing the
same output at once. This package imports nothing at import time: import its modules.
"""
