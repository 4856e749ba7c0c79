"""The ecosystem: one export entry (:mod:`.export`) to a ``transformers`` folder (:mod:`.hf_export`) or a
GGUF file for llama.cpp (:mod:`.gguf_export`); importing ``transformers`` models (:mod:`.hf_import`); and
the Hugging Face Hub (:mod:`.hub`)."""
