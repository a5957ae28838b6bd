"""GGUF files, the one place both serving (`dialogue.local`) and training (`dialogue.train`) read
and write them, so neither has to import the other.

- `files`: a cached reader of a GGUF's metadata and tensors (a base's tensor index is parsed
  once per file and process), gguf-py's HF -> GGUF tensor name map.
- `lora`: GGUF LoRA adapters: read and check one, check it against a base's tensor shapes,
  write one atomically, and convert PEFT / Hugging Face LoRA factors into one. `AdapterError`.
- `templates`: the built-in chat templates and the rule that picks a model's template.
- `models`: which GGUF file a `local:` name means (bundled, packaged, registered, a path) and a
  fast content hash of a model file.

Importing this package imports none of them; `gguf` (gguf-py) and numpy load with `files` and
`lora`, never torch.
"""
