"""A run directory on disk: its layout, lock and the one rule for what a new run may replace
(:mod:`.layout`), the checkpoint format (:mod:`.checkpoint`, RNG state in :mod:`.rng`), opening a run's
model and tokenizer (:mod:`.load`) and writing a run of weights only (:mod:`.write`)."""
