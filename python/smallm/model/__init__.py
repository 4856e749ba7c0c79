"""The network: a LLaMA-family decoder with Hugging Face's module names (:mod:`.config` its shape and
presets, :mod:`.layers` its parts, :mod:`.lm` the language model), LoRA/QLoRA adapters over it
(:mod:`.lora`) and a reward model with a scalar head (:mod:`.reward`)."""
