"""Moved to the `features.labeling` package; this re-export is kept for one release."""

import warnings

from features.labeling import LabelConfig, label, load_entities, run_label  # noqa: F401

warnings.warn("features.label moved to features.labeling", DeprecationWarning, stacklevel=2)
