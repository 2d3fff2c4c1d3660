"""A small client for OpenAI-compatible chat-completions servers (vLLM, llama.cpp's server,
Ollama, hosted APIs), on the standard library alone.

Retries with exponential backoff on HTTP 429 and 5xx and on dropped connections (honouring
`Retry-After`); everything else that goes wrong is one `ExplainError` line: the server is down, has
no such model, refuses the request, or answers something that is not a chat completion. Thread
safe: `explain` calls it from a few worker threads at once and reads its counters.

>>> client = ChatClient("http://127.0.0.1:8080/v1", "gemma")
>>> client.chat([{"role": "user", "content": "Hi"}], max_tokens=8)
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from lmscope.interp.explain import ExplainError

RETRY_STATUS = (429, 500, 502, 503, 504)
TAG_HEADER = "X-Lmscope-Item"  # `<sae id>:<latent>:<explain|detection|fuzzing>` of a request


def _snippet(text: str, n: int = 120) -> str:
    return " ".join(text.split())[:n]


class ChatClient:
    """POSTs to `<base_url>/chat/completions`; counts requests, tokens and seconds."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 4, backoff: float = 0.5, structured: bool = True) -> None:  # fmt: skip
        self.base = base_url.rstrip("/")
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.retries, self.backoff, self.structured = retries, backoff, structured
        self.requests = self.prompt_tokens = self.completion_tokens = 0
        self.seconds = 0.0
        self._lock = threading.Lock()

    def _open(self, path: str, body: dict[str, Any] | None, tag: str | None = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if tag:
            headers[TAG_HEADER] = tag
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, headers=headers)
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (a URL the user gave)
            return resp.read().decode("utf-8", "replace")

    def models(self) -> list[str] | None:
        """The model ids the server lists at `/models`, or None when it lists none."""
        try:
            data = json.loads(self._open("/models", None))
            return [str(m["id"]) for m in data["data"]]
        except urllib.error.URLError as e:
            if isinstance(e, urllib.error.HTTPError):
                return None
            raise ExplainError(
                f"cannot reach the chat server at {self.base} ({e.reason}); is it running?"
            ) from e
        except (ValueError, KeyError, TypeError, OSError):
            return None

    def check(self) -> None:
        """Fail now, in one line, when the server is down or does not serve the model."""
        served = self.models()
        if served is not None and served and self.model not in served:
            raise ExplainError(f"the chat server at {self.base} has no model {self.model!r}; it serves: {', '.join(served)}")  # fmt: skip

    def chat(self, messages: list[dict[str, str]], *, max_tokens: int = 256, schema: dict[str, Any] | None = None,
             tag: str | None = None) -> str:  # fmt: skip
        """The reply's text; `schema` asks for JSON output of that shape where the server can;
        `tag` (what the request is for, e.g. `3:17:detection`) goes in the `X-Lmscope-Item` header,
        for server logs and proxies."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": 0.0}  # fmt: skip
        if schema is not None and self.structured:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "answer", "schema": schema}}  # fmt: skip
        url = self.base + "/chat/completions"
        for attempt in range(self.retries + 1):
            t0 = time.perf_counter()
            wait = self.backoff * 2**attempt
            with self._lock:
                self.requests += 1
            try:
                text = self._open("/chat/completions", body, tag)
            except urllib.error.HTTPError as e:
                detail = _snippet(e.read().decode("utf-8", "replace"))
                if e.code in RETRY_STATUS and attempt < self.retries:
                    after = e.headers.get("Retry-After") if e.headers else None
                    time.sleep(min(30.0, float(after)) if after and after.isdigit() else wait)
                    continue
                if e.code in RETRY_STATUS:
                    raise ExplainError(f"{url} kept answering HTTP {e.code} after {attempt + 1} tries: {detail}") from e  # fmt: skip
                if "response_format" in body and any(w in detail.lower() for w in ("response_format", "schema", "grammar")):  # fmt: skip
                    self.structured = False  # a server without structured output: ask in prose
                    body.pop("response_format")
                    continue
                if e.code == 404 or "model" in detail.lower():
                    served = self.models()
                    if served is not None and self.model not in served:
                        raise ExplainError(f"the chat server at {self.base} has no model {self.model!r}; it serves: {', '.join(served)}") from e  # fmt: skip
                raise ExplainError(f"{url} refused the request: HTTP {e.code} {detail}") from e
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                if attempt < self.retries:
                    time.sleep(wait)
                    continue
                reason = getattr(e, "reason", e)
                raise ExplainError(f"cannot reach the chat server at {self.base} ({reason}); is it running?") from e  # fmt: skip
            finally:
                with self._lock:
                    self.seconds += time.perf_counter() - t0
            return self._content(url, text)
        raise AssertionError("unreachable")

    def _content(self, url: str, text: str) -> str:
        try:
            data = json.loads(text)
            content = data["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError(type(content).__name__)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ExplainError(f"{url} answered something that is not a chat completion: {_snippet(text, 80)!r}") from e  # fmt: skip
        usage = data.get("usage") or {}
        with self._lock:
            self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.completion_tokens += int(usage.get("completion_tokens") or 0)
        return content
