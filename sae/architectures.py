"""Moved to `sae.saes` (one architecture per file); this re-export is kept for one release."""

import warnings

from sae.saes import *  # noqa: F403 - the whole public surface, as before
from sae.saes import __all__  # noqa: F401

warnings.warn("sae.architectures moved to sae.saes", DeprecationWarning, stacklevel=2)
