"""A local server speaking vLLM's OpenAI-compatible endpoints for runtime LoRA, as its docs describe
them (docs.vllm.ai, "LoRA Adapters": dynamically serving LoRA adapters):

- ``GET /v1/models``: the base model, then each loaded adapter with ``parent`` = the base.
- ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}``: reads the PEFT directory from
  the path (its own disk), refuses a rank over ``--max-lora-rank`` with vLLM's message, and a name
  loaded twice with vLLM's 400.
- ``POST /v1/chat/completions``: ``model`` is the base or a loaded adapter's name (else vLLM's
  404, "The model `x` does not exist."); streams an answer naming the model it was served by.

The real engine needs a GPU; this checks our side of the protocol. Requests are recorded."""
from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class VLLMServer:
    def __init__(self, base: str = "meta-llama/Llama-3.1-8B-Instruct", max_lora_rank: int = 16,
                 runtime_updates: bool = True) -> None:
        self.base, self.max_lora_rank, self.runtime_updates = base, max_lora_rank, runtime_updates
        self.adapters: dict[str, dict[str, Any]] = {}  # name -> {"path", "config"}
        self.requests: list[tuple[str, str, Any]] = []
        self._httpd: ThreadingHTTPServer | None = None

    # -------------------------------------------------------------- lifecycle
    def __enter__(self) -> "VLLMServer":
        owner = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _body(self) -> Any:
                n = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    return json.loads(raw) if raw else None
                except ValueError:
                    return None

            def _json(self, status: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                owner.requests.append(("GET", self.path, None))
                if self.path == "/v1/models":
                    data = [{"id": owner.base, "object": "model", "root": owner.base, "parent": None}]
                    data += [{"id": n, "object": "model", "root": a["path"], "parent": owner.base}
                             for n, a in owner.adapters.items()]
                    return self._json(200, {"object": "list", "data": data})
                self._json(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                body = self._body()
                owner.requests.append(("POST", self.path, body))
                if self.path == "/v1/load_lora_adapter":
                    return self._load(body or {})
                if self.path == "/v1/chat/completions":
                    return self._chat(body or {})
                self._json(404, {"detail": "Not Found"})

            def _error(self, status: int, message: str, type: str = "BadRequestError") -> None:
                self._json(status, {"object": "error", "message": message, "type": type,
                                    "param": None, "code": status})

            def _load(self, body: dict[str, Any]) -> None:
                if not owner.runtime_updates:
                    return self._json(404, {"detail": "Not Found"})
                name, path = body.get("lora_name"), body.get("lora_path")
                if not name or not path:
                    return self._error(400, "Both 'lora_name' and 'lora_path' must be provided.")
                if name in owner.adapters:
                    return self._error(400, f"The lora adapter '{name}' has already been loaded.")
                cfg_path = Path(path) / "adapter_config.json"
                if not cfg_path.is_file() or not (Path(path) / "adapter_model.safetensors").is_file():
                    return self._error(400, f"No adapter found for {path}", "NotFoundError")
                cfg = json.loads(cfg_path.read_text())
                if int(cfg["r"]) > owner.max_lora_rank:
                    return self._error(400, f"LoRA rank {cfg['r']} is greater than max_lora_rank "
                                            f"{owner.max_lora_rank}.")
                owner.adapters[name] = {"path": path, "config": cfg}
                data = f"Success: LoRA adapter '{name}' added successfully.".encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _chat(self, body: dict[str, Any]) -> None:
                model = body.get("model")
                if model != owner.base and model not in owner.adapters:
                    return self._error(404, f"The model `{model}` does not exist.", "NotFoundError")
                text = f"served by {model}"
                cid, now = "chatcmpl-" + uuid.uuid4().hex, int(time.time())

                def chunk(delta: dict[str, Any] | None, finish: str | None = None,
                          usage: dict[str, Any] | None = None) -> bytes:
                    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                         "finish_reason": finish}]
                    obj = {"id": cid, "object": "chat.completion.chunk", "created": now,
                           "model": model, "choices": choices, "usage": usage}
                    return b"data: " + json.dumps(obj).encode() + b"\n\n"

                parts = [chunk({"role": "assistant", "content": ""})]
                parts += [chunk({"content": w}) for w in text.split(" ") for w in (w + " ",)]
                parts.append(chunk({}, "stop"))
                parts.append(chunk(None, usage={"prompt_tokens": 10, "completion_tokens": 3,
                                                "total_tokens": 13}))
                parts.append(b"data: [DONE]\n\n")
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for p in parts:
                    self.wfile.write(f"{len(p):x}\r\n".encode() + p + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"
