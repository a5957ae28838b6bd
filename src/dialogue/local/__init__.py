"""Local models: the bundled GGUF and any other (`models`), llama.cpp in a worker thread
(`runtime`), the persistent prefix KV cache (`kvcache`).

Importing this package does not import llama.cpp: `dialogue models` and `dialogue cache stats`
stay fast. The provider that streams `local:` models is `dialogue.llm.local`.
"""
from .kvcache import KVCache, default_cache_dir
from .models import ModelSpec, bundled_model_path, list_models, model_hash, resolve

__all__ = ["KVCache", "default_cache_dir", "ModelSpec", "bundled_model_path", "list_models",
           "model_hash", "resolve"]
