"""Choosing for the user: which backbone (``rank``) and how much data (``curve``'s power law).

- :mod:`~.logme`: LogME, the training-free transferability score (pure NumPy).
- :mod:`~.probe`: stratified k-fold linear-probe accuracy with its Wilson interval.
- :mod:`~.rank`: candidates → cached features → both scores, ``rank.json`` and ``rank.png``.
- :mod:`~.powerlaw`: a learning curve's ``error(n) = a·n^(−b) + c`` and its inversion.
- :mod:`~.output`, :mod:`~.curve_output`: output-folder guard, charts and pages.

Nothing is imported here, so ``import transferlab.selection.logme`` stays light.
"""
