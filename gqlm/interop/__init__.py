"""Interop with other ecosystems: HF transformers checkpoints (Llama / Mixtral) both ways.

`hf.py` holds the parameter name table and the export / import of safetensors, `hf_config.py`
the config.json mapping and what is refused, `hf_tokenizer.py` the tokenizer files. This layer
sits above models and below train: it may import config, tokenizers and models, never train.
"""
