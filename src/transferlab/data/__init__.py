"""From files on disk to uint8 arrays the backbone can eat.

- :mod:`~transferlab.data.layouts`: the four layouts (split folders, class folders, labels in
  file names, a CSV) → labelled files.
- :mod:`~transferlab.data.discover`: those → a :class:`DatasetIndex` of (path, label, split)
  rows, reproducible carved splits, listed problems, leakage checks.
- :mod:`~transferlab.data.scan` and :mod:`~transferlab.data.prepared`: every file read once
  (digest + decode check) → the :class:`Split` s a strategy trains on, skipped files reported.
- :mod:`~transferlab.data.scan_index`: what the last scan found per file (SQLite under the cache
  dir), so a re-run reads only new or changed files.
- :mod:`~transferlab.data.dataset`: the training engine's ``Dataset`` (augmented views).
- :mod:`~transferlab.data.split`: the ``transferlab split`` command's folder materialiser.
- :mod:`~transferlab.data.images`: safe decoding (clear errors) and the backbone's eval
  geometry; :mod:`~transferlab.data.colour`: any Pillow mode → RGB.
- :mod:`~transferlab.data.loader`: threaded, in-order batch decoding for feature extraction;
  :mod:`~transferlab.data.fast_pixels`: its torch/torchvision decode and resize.

Submodules are imported directly (``from transferlab.data.images import load_image``): this
package imports nothing itself, so scan workers start without loading unrelated code.
"""
