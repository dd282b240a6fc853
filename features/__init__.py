"""Feature analysis, the SQLite feature store, entity-attribute labelling and monosemanticity scores."""
