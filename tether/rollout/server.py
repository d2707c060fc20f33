"""Server mode: the rollout engine in another process (or machine), the trainer talking to it over HTTP.

    tether rollout-server --model runs/sft/final --engine vllm --port 8000        # the engine's process
    sampler = RemoteSampler("http://127.0.0.1:8000")                               # in the trainer
    batch = sampler.generate(prompt_ids, SamplingParams(n=8))                     # a RolloutBatch, as locally
    sampler.load_weights(policy)                                                  # after each optimizer step

Weights travel as one safetensors blob over HTTP (the policy's tensors, LoRA merged, under the base model's
names): the CPU fallback, simple and exact; it moves the whole model each push, so it suits small models or
infrequent pushes. On GPUs the fast path is vLLM's own weight transfer over NCCL (not wired here: no GPU to test
it on). The server runs one request at a time, so a push never lands mid-generation. Loopback by default.

Endpoints: GET /health; POST /generate {"prompts": [[ids] | str], "params": {SamplingParams fields}} ->
RolloutBatch fields as JSON; POST /load_weights (body: safetensors bytes) -> {"tensors": count}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer

from tether.rollout.engine import RolloutBatch, Sampler
from tether.rollout.factory import get_sampler
from tether.rollout.params import SamplingParams

log = logging.getLogger("tether")


def state_dict_bytes(state: dict) -> bytes:
    """Tensors as a safetensors blob (contiguous CPU copies, so tied tensors are written twice, not refused)."""
    from safetensors.torch import save

    return save({name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state.items()})


class RemoteSampler(Sampler):
    """A `Sampler` whose engine is a `tether rollout-server` at `url`."""

    def __init__(self, url: str, *, timeout_s: float = 600.0):
        self.url, self.timeout_s = url.rstrip("/"), timeout_s

    def _post(self, path: str, body: bytes, content_type: str) -> dict:
        request = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return json.loads(response.read())

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams) -> RolloutBatch:
        body = json.dumps({"prompts": prompts, "params": dataclasses.asdict(params)}).encode()
        return RolloutBatch(**self._post("/generate", body, "application/json"))

    def load_weights(self, model) -> None:
        from tether.rollout.vllm_engine import policy_state_dict  # torch and peft only; vLLM is not imported

        self._post("/load_weights", state_dict_bytes(policy_state_dict(model)), "application/octet-stream")


class EngineServer:
    """The engine side: a model and its sampler, answering RemoteSampler's requests one at a time."""

    def __init__(self, model_name: str, engine: str = "vllm", **sampler_options):
        from tether.models import load

        self.model, self.tokenizer = load(model_name)
        self.model.eval()
        self.engine = engine
        self.sampler = get_sampler(engine, self.model, self.tokenizer, **sampler_options)

    def generate(self, request: dict) -> dict:
        batch = self.sampler.generate(request["prompts"], SamplingParams(**request.get("params", {})))
        return dataclasses.asdict(batch)

    def load_weights(self, blob: bytes) -> dict:
        from safetensors.torch import load

        state = load(blob)
        if hasattr(self.sampler, "load_state_dict"):  # vLLM: straight into the engine
            self.sampler.load_state_dict(state)
        else:  # the built-in engine samples from self.model
            self.model.load_state_dict(state, strict=False)
        return {"tensors": len(state)}

    def handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/health":
                    self._reply(200, {"engine": server.engine})
                else:
                    self._reply(404, {"error": f"no such endpoint {self.path}: GET /health"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    if self.path == "/generate":
                        self._reply(200, server.generate(json.loads(body)))
                    elif self.path == "/load_weights":
                        self._reply(200, server.load_weights(body))
                    else:
                        self._reply(404, {"error": f"no such endpoint {self.path}: /generate, /load_weights"})
                except (ValueError, TypeError, KeyError) as err:  # a bad request, not a dead server
                    self._reply(400, {"error": str(err)})

            def log_message(self, format, *args):  # one line per request at debug level, not stderr
                log.debug("rollout-server: " + format, *args)

        return Handler


def server_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tether rollout-server",
                                     description="Serve a rollout engine over HTTP for RemoteSampler (server mode).")
    parser.add_argument("--model", required=True, help="model folder, hub name or tiny[:...] to start from")
    parser.add_argument("--engine", choices=("builtin", "vllm"), default="vllm", help="sampling engine")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one")
    args = parser.parse_args(argv)
    try:
        server = EngineServer(args.model, args.engine)
    except ImportError as err:  # --engine vllm without vLLM: say how to install it
        print(f"tether rollout-server: {err}", file=sys.stderr)
        return 2
    http = HTTPServer((args.host, args.port), server.handler())
    print(f"rollout-server: {args.engine} engine listening on http://{args.host}:{http.server_address[1]}",
          flush=True)
    try:
        http.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        http.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(server_main(sys.argv[1:]))
