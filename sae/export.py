"""Moved to `sae.formats`; this re-export is kept for one release."""

import warnings

from sae.formats import export_sparsify, load_sae, load_sparsity, save_sae  # noqa: F401

warnings.warn("sae.export moved to sae.formats", DeprecationWarning, stacklevel=2)
