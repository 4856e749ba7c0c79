"""Text to ids: reading a corpus into documents (:mod:`.corpus`), the byte-level BPE tokenizer that
the Rust core trains and runs (:mod:`.tokenizer`, :mod:`.training`), what its special tokens do
(:mod:`.roles`) and how a conversation becomes text (:mod:`.chat`)."""
