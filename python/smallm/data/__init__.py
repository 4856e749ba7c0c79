"""Ids on disk and in batches: packing a corpus into token shards (:mod:`.shards`), reading them back
zero-copy (:mod:`.shardset`), the batches training draws from them (:mod:`.loader`, :mod:`.sampling`,
mixtures of sources in :mod:`.sources`), conversations and preference pairs for fine-tuning
(:mod:`.conversations`) and the built-in demo corpus (:mod:`.builtin`)."""
