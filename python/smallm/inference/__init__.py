"""Using a model: sampling with a KV cache (:mod:`.generate`), a conversation (:mod:`.chat_session`),
losses and bits per byte (:mod:`.evaluate`), reward scores (:mod:`.scoring`) and best-of-N rejection
sampling (:mod:`.rejection`)."""
