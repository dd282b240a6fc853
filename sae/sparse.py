"""Moved to `sae.saes.kernels`; this re-export is kept for one release."""

import warnings

from sae.saes.kernels import SparseActs, batchtopk_pattern, bf16_is_faster, sparse_decode, sparse_encode  # noqa: F401

warnings.warn("sae.sparse moved to sae.saes.kernels", DeprecationWarning, stacklevel=2)
