"""Serving local models: llama.cpp in a worker (`runtime`), the persistent prefix KV cache
(`kvcache`), the adapter registry (`adapters`) and adapter merging (`merge`). Which file a
`local:` name means, and everything that reads or writes GGUF files, is `dialogue.gguf`.

Importing this package does not import llama.cpp: `dialogue models` and `dialogue cache stats`
stay fast. The provider that streams `local:` models is `dialogue.llm.local`.
"""
from .kvcache import KVCache, default_cache_dir

__all__ = ["KVCache", "default_cache_dir"]
