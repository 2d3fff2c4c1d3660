"""A local OpenAI-compatible chat server for `explain`: `transformers serve` (transformers' FastAPI
server, from its `serving` extra: openai, fastapi, uvicorn) running lmscope's cached Gemma 3 270M.

The converted base model has no chat template, so the folder served links the cached weights and
adds Gemma's turn format and `<end_of_turn>` as a stop token. Used by the integration test and
`benchmarks/explain.py --serve`; the model is tiny, so its labels are poor.

>>> with LocalServer(tmp_dir) as spec:           # "openai:http://127.0.0.1:PORT/v1#gemma-3-270m"
...     explain("runs/quick", explainer=spec, latents=20, items=4)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from lmscope.interp.explain import ExplainError

MODEL = "gemma-3-270m"  # served from a folder of that name (relative to the server's cwd): its id
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
END_OF_TURN = 106  # Gemma's <end_of_turn> token id


def available() -> bool:
    """Whether transformers' serving extra is installed."""
    from transformers.utils.import_utils import is_serve_available

    return bool(is_serve_available())


def serving_folder(root: Path) -> Path:
    """`root/gemma-3-270m`: the cached converted model's files (linked), with a chat template and
    `<end_of_turn>` as a second end-of-sequence token."""
    from lmscope.model.loading import gemma_270m_folder

    src = gemma_270m_folder()
    out = root / MODEL
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        if not (out / name).exists():
            os.symlink(src / name, out / name)
    gen = json.loads((src / "generation_config.json").read_text())
    gen["eos_token_id"] = [gen.get("eos_token_id", 1), END_OF_TURN]
    (out / "generation_config.json").write_text(json.dumps(gen))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalServer:
    """`transformers serve` pinned to the model in `root`, on a free loopback port; the context
    value is the explainer spec. Its output goes to `root/server.log`."""

    def __init__(self, root: Path, *, startup: float = 300.0, threads: int | None = None,
                 dtype: str = "bfloat16", args: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.root, self.startup, self.threads = Path(root), startup, threads
        self.dtype, self.args = dtype, args
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def spec(self) -> str:
        return f"openai:{self.base_url}#{MODEL}"

    def __enter__(self) -> str:
        if not available():
            raise ExplainError("transformers serve needs its serving extra: pip install 'transformers[serving]'")  # fmt: skip
        serving_folder(self.root)
        cmd = [sys.executable, "-c", "from transformers.cli.transformers import app; app()", "serve",
               MODEL, "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu",
               "--dtype", self.dtype, *self.args]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        with (self.root / "server.log").open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
        deadline = time.time() + self.startup
        while True:
            try:
                with urllib.request.urlopen(
                    self.base_url.removesuffix("/v1") + "/health", timeout=5
                ) as r:  # noqa: S310 (loopback)
                    if json.loads(r.read()).get("status") == "ok":
                        return self.spec
            except (OSError, ValueError):
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                tail = (self.root / "server.log").read_text(errors="replace")[-1500:]
                self.close()
                raise ExplainError(f"transformers serve did not come up: {tail}")
            time.sleep(1)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()
