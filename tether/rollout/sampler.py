"""The built-in engine: batched KV-cache sampling on any Hugging Face causal LM (interface: tether.rollout.engine).

One interface serves `tether generate`, best-of-N and every online RL recipe:

    sampler = get_sampler("builtin", model, tokenizer)
    batch = sampler.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=128))
    tensors = batch.to_tensors(tokenizer.pad_token_id)

Conventions (the same as TRL and vLLM unless said otherwise):
- `completion_ids` hold every sampled token: the EOS token when the sample ended on EOS, and the token that
  completed a stop string when it ended on a stop. `completions` (text) exclude both: special tokens are
  skipped and the text is cut where the stop string begins.
- `completion_logprobs` are log softmax(logits / temperature) of the FULL distribution at the chosen token,
  before top-k / top-p / min-p filtering and before `min_new_tokens` suppresses EOS: exactly what a
  teacher-forced forward at the same temperature gives, which is what RL ratios need. With temperature 0
  (greedy) they are the log-probs at temperature 1.
- All randomness comes from a `torch.Generator` seeded with `params.seed`; the global RNG is untouched.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from tether.models import cache_kwargs
from tether.rollout.llama_decode import LlamaDecoder, unsupported_reason
from tether.rollout.engine import (FINISH_REASONS, RolloutBatch, Sampler, default_eos_ids,  # noqa: F401
                                   encode_prompts)
from tether.rollout.params import SamplingParams


# --------------------------------------------------------------------------- token selection


def filter_logits(logits: Tensor, *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> Tensor:
    """Set to -inf the logits that top-k, then top-p, then min-p remove (Hugging Face's order).

    logits (B, V) -> (B, V). The most likely token is always kept. Returns `logits` itself when nothing is on.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        sorted_probs = sorted_logits.softmax(-1)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # probability of the tokens ranked above
        # Nucleus (Holtzman et al. 2020): keep the smallest prefix whose mass reaches top_p.
        remove_sorted = mass_before >= top_p  # (B, V); rank 0 has mass_before 0 and is kept
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)  # (B, V)
        threshold = min_p * probs.max(-1, keepdim=True).values  # (B, 1)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def draw(weights: Tensor, generator: torch.Generator) -> Tensor:
    """One token per row with probability proportional to weights (B, V) >= 0 -> (B,) long, by inverse CDF.

    One uniform number per row: u ~ U[0, total), the token is the first v whose prefix sum exceeds u, so v is
    drawn with probability weights_v / total and a weight of 0 (a banned or filtered token) is never drawn.
    The prefix sum is in float64. On CPU this was ~4x cheaper per step than the exponential race
    argmax(p / E), E ~ Exp(1) (V random numbers per row; what torch.multinomial and vLLM do) for 64 rows of a
    103-token vocabulary (docs/benchmarks.md).
    """
    cdf = weights.double().cumsum(-1)  # (B, V)
    total = cdf[:, -1:]  # (B, 1)
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=weights.device) * total
    last_nonzero = (cdf < total).sum(-1, keepdim=True)  # u rounded up to the total never lands past it
    return torch.minimum(torch.searchsorted(cdf, u, right=True), last_nonzero).squeeze(-1)


# From this vocabulary size, unfiltered sampling draws with `draw_inverse_cdf`: no float64 copy of the (B, V)
# weights, whose prefix sum (and an exponential race even more: V random numbers per row, ~0.2 s of one CPU core
# per step at V = 152k and 64 rows) would cost more than the model's forward (docs/benchmarks.md).
INVERSE_CDF_MIN_VOCAB = 8192
INVERSE_CDF_BLOCK = 1024  # entries per block of the two-level prefix sum
_WORKSPACE: dict = {}


def _workspace(like: Tensor) -> Tensor:
    """A (B, V) fp32 scratch buffer kept from step to step: a fresh 40 MB tensor per step is page-faulted in
    and unmapped again by the CPU allocator, which costs as much as filling it."""
    key = (tuple(like.shape), like.device)
    if key not in _WORKSPACE:
        _WORKSPACE.clear()
        _WORKSPACE[key] = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    return _WORKSPACE[key]


def draw_inverse_cdf(scaled: Tensor, generator: torch.Generator,
                     banned_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One token per row of softmax(scaled) (B, V) by inverse CDF, and its log-prob before banning.

    One uniform number per row. The prefix sum is two-level so it stays exact: fp32 sums of blocks of
    INVERSE_CDF_BLOCK entries, a float64 prefix sum over the blocks picks the block, a float64 prefix sum inside
    that one block picks the token. Passes over (B, V): max, exp(z - max) in place, block sums.
    Returns (tokens (B,) long, logprobs (B,) float32); `banned_ids` are never drawn.
    """
    B, V = scaled.shape
    K = INVERSE_CDF_BLOCK
    peak = scaled.amax(-1, keepdim=True)  # (B, 1)
    weights = torch.sub(scaled, peak, out=_workspace(scaled)).exp_()  # (B, V) exp(z - max)
    full = V // K
    block_sums = weights[:, :full * K].view(B, full, K).sum(-1).double()  # (B, full)
    if full * K < V:  # the last, shorter block
        block_sums = torch.cat([block_sums, weights[:, full * K:].sum(-1, keepdim=True).double()], -1)
    log_norm = peak.squeeze(-1).double() + block_sums.sum(-1).log()  # (B,) of the full distribution
    if banned_ids is not None and len(banned_ids):
        block_sums.index_add_(1, banned_ids // K, -weights[:, banned_ids].double())
        block_sums.clamp_(min=0.0)
        weights[:, banned_ids] = 0.0
    prefix = block_sums.cumsum(-1)  # (B, blocks)
    u = torch.rand(B, 1, generator=generator, dtype=torch.float64, device=scaled.device) * prefix[:, -1:]
    block = torch.searchsorted(prefix, u, right=True).clamp_(max=prefix.shape[1] - 1)  # (B, 1)
    before = torch.where(block > 0, prefix.gather(-1, (block - 1).clamp(min=0)), 0.0)  # mass of earlier blocks
    index = block * K + torch.arange(K, device=scaled.device)  # (B, K) the chosen block's entries
    inside = weights.gather(-1, index.clamp(max=V - 1)).double().masked_fill_(index >= V, 0.0).cumsum(-1)
    offset = torch.searchsorted(inside, u - before, right=True)  # (B, 1)
    last_nonzero = (inside < inside[:, -1:]).sum(-1, keepdim=True)  # rounding never lands past it
    tokens = (block * K + torch.minimum(offset, last_nonzero)).squeeze(-1)  # (B,)
    logprobs = scaled.gather(-1, tokens[:, None]).squeeze(-1).double() - log_norm
    return tokens, logprobs.float()


def select_tokens(logits: Tensor, params: SamplingParams, generator: torch.Generator,
                  banned_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Choose the next token of each row and its sampling log-prob.

    logits (B, V) -> (tokens (B,) long, logprobs (B,) float32). `banned_ids` (e.g. EOS before
    min_new_tokens) cannot be chosen, but the log-prob is of the full, unbanned, unfiltered distribution.
    """
    logits = logits.float()
    scaled = logits / params.temperature if params.temperature not in (0.0, 1.0) else logits  # (B, V)
    unfiltered = params.top_k == 0 and params.top_p >= 1.0 and params.min_p == 0.0
    if params.temperature > 0 and unfiltered and scaled.shape[-1] >= INVERSE_CDF_MIN_VOCAB:
        return draw_inverse_cdf(scaled, generator, banned_ids)
    logprobs = torch.log_softmax(scaled, dim=-1)  # (B, V)
    if params.temperature > 0 and unfiltered:
        weights = logprobs.exp()  # softmax(scaled)
        if banned_ids is not None:
            weights.index_fill_(-1, banned_ids, 0.0)
        tokens = draw(weights, generator)
    else:
        if banned_ids is not None:  # banned before filtering: top-k keeps the best tokens that may be drawn
            scaled = scaled.index_fill(-1, banned_ids, float("-inf"))
        if params.temperature == 0:
            tokens = scaled.argmax(-1)
        else:
            filtered = filter_logits(scaled, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p)
            tokens = draw(filtered.softmax(-1), generator)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


# --------------------------------------------------------------------------- tokenizer helpers


class StopStringChecker:
    """Finds stop strings completed by a sample's newest token, decoding only a window of recent tokens."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        # A character is at most 4 tokens (byte-level BPE); the window's first tokens may decode imperfectly.
        self.window = 4 * max((len(s) for s in stop), default=0) + 8

    def _new_stop(self, text: str, before: int) -> tuple[int, int] | None:
        """(start, end) of the earliest stop string in `text` that ends past character `before`."""
        hits = [(i, i + len(s)) for s in self.stop if (i := text.find(s, max(0, before - len(s) + 1))) >= 0]
        return min(hits) if hits else None

    def completed(self, completions: list[list[int]]) -> list[bool]:
        """Per completion: did its last token complete a stop string?"""
        windows = [ids[-self.window:] for ids in completions]
        texts = self.tokenizer.batch_decode(windows, skip_special_tokens=True)
        before = self.tokenizer.batch_decode([w[:-1] for w in windows], skip_special_tokens=True)
        return [self._new_stop(text, len(prev)) is not None for text, prev in zip(texts, before)]

    def cut(self, ids: list[int]) -> tuple[int, int] | None:
        """(start, end) in the full decoded text of the stop string that the last token completed."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return self._new_stop(text, len(self.tokenizer.decode(ids[:-1], skip_special_tokens=True)))


# --------------------------------------------------------------------------- the built-in engine


class ModelDecoder:
    """Decode steps through the model's own forward and a Hugging Face cache: any causal LM.

    attention_mask (B, max_length): 1 on real tokens, including every position still to be generated."""

    def __init__(self, model, cache, attention_mask: Tensor, length: int):
        self.model, self.cache, self.attention_mask = model, cache, attention_mask
        self.length = length  # positions in the cache

    def select(self, keep: Tensor) -> None:
        """Keep only the rows `keep` (B',) of the batch."""
        self.cache.batch_select_indices(keep)
        self.attention_mask = self.attention_mask[keep]

    def step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Feed one token per row at its position: tokens, positions (B,) long -> logits (B, V)."""
        self.length += 1
        out = self.model(input_ids=tokens[:, None], attention_mask=self.attention_mask[:, :self.length],
                         position_ids=positions[:, None], **cache_kwargs(self.model, self.cache), use_cache=True)
        return out.logits[:, -1]


class BuiltinSampler(Sampler):
    """Batched sampling with a KV cache on any Hugging Face causal LM (the default engine).

    Each chunk of up to `batch_size` prompts is left-padded and prefilled once; the cache is then repeated
    n times so the n samples of a prompt share that prefill. Finished samples are dropped from the decode
    batch when at least `drop_finished_fraction` of it has finished (1.0 or more keeps every row to the end).
    `eos_token_ids` replaces the default end ids (the tokenizer's EOS and the model's generation_config ones).
    With `lean_decode` (default) the decode steps of Llama-family models in float32 run `LlamaDecoder`, the
    same arithmetic with far fewer ops per token (`tether.rollout.llama_decode`); every other model, and every
    prefill, runs the model's own forward.
    """

    def __init__(self, model, tokenizer, *, batch_size: int | None = None, drop_finished_fraction: float = 0.1,
                 eos_token_ids: list[int] | None = None, lean_decode: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = batch_size
        self.drop_finished_fraction = drop_finished_fraction
        self.lean_decode = lean_decode
        self.eos_ids = list(eos_token_ids) if eos_token_ids is not None else default_eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PEFT wrapper
        keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
        self._prefill_kwargs = {"logits_to_keep": 1} if keeps_logits else {}  # prefill: last position only

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams) -> RolloutBatch:
        prompt_ids = encode_prompts(self.tokenizer, prompts)
        device = next(self.model.parameters()).device
        generator = make_generator(params.seed, device)
        chunk = self.batch_size or max(len(prompt_ids), 1)
        samples = []  # (completion_ids, logprobs, finish_reason) per sample, grouped prompt by prompt
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(prompt_ids), chunk):
                    samples += self._generate_chunk(prompt_ids[start:start + chunk], params, generator, device)
        finally:
            self.model.train(was_training)
        return self._to_batch(prompt_ids, samples, params)

    def _generate_chunk(self, prompt_ids: list[list[int]], params: SamplingParams, generator, device):
        n, max_new = params.n, params.max_new_tokens
        U, P = len(prompt_ids), max(len(p) for p in prompt_ids)
        N = U * n
        # Prefill the unique prompts, left-padded, with positions counted from each first real token.
        input_ids = torch.full((U, P), self.pad_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros(U, P + max_new, dtype=torch.long, device=device)  # grows to the right
        for i, ids in enumerate(prompt_ids):
            input_ids[i, P - len(ids):] = torch.tensor(ids, device=device)
            attention_mask[i, P - len(ids):] = 1  # generated positions are 1 from the start
        position_ids = (attention_mask[:, :P].cumsum(-1) - 1).clamp(min=0)  # (U, P)
        cache = DynamicCache(config=self.model.config)  # the config gives sliding-window layers their window
        out = self.model(input_ids=input_ids, attention_mask=attention_mask[:, :P], position_ids=position_ids,
                         **cache_kwargs(self.model, cache), use_cache=True, **self._prefill_kwargs)
        logits = out.logits[:, -1]  # (U, V)

        # n samples per prompt: repeat the cache and the last logits instead of re-encoding the prompt.
        logits = logits.repeat_interleave(n, dim=0)  # (N, V)
        attention_mask = attention_mask.repeat_interleave(n, dim=0)  # (N, P + max_new)
        next_position = position_ids[:, -1].repeat_interleave(n) + 1  # (N,)
        if self.lean_decode and unsupported_reason(self.model, P + max_new) is None:
            decoder = LlamaDecoder(self.model, P + max_new)
            decoder.load_cache(cache, attention_mask, repeats=n)
        else:
            cache.batch_repeat_interleave(n)
            decoder = ModelDecoder(self.model, cache, attention_mask, P)

        tokens_out = torch.full((N, max_new), self.pad_id, dtype=torch.long, device=device)
        logprobs_out = torch.zeros(N, max_new, dtype=torch.float32, device=device)
        lengths = torch.full((N,), -1, dtype=torch.long, device=device)  # set when a sample finishes
        reasons = ["length"] * N
        rows = torch.arange(N, device=device)  # (B,) sample id of each row still in the decode batch
        alive = torch.ones(N, dtype=torch.bool, device=device)  # (B,) rows not finished yet
        dense = True  # no sample has finished: row b is sample b and every row is alive
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=device)
        stop_checker = StopStringChecker(self.tokenizer, params.stop) if params.stop else None
        host_tokens = [[] for _ in range(N)]  # completions so far, kept on the host only for stop strings

        for step in range(max_new):
            banned = eos if (step < params.min_new_tokens and len(eos)) else None
            tokens, logprobs = select_tokens(logits, params, generator, banned)  # (B,), (B,)
            if dense:
                tokens_out[:, step], logprobs_out[:, step] = tokens, logprobs
            else:
                live_rows = rows[alive]
                tokens_out[live_rows, step] = tokens[alive]
                logprobs_out[live_rows, step] = logprobs[alive]

            finished = None  # (B,) bool: rows whose sample ended with this token
            if banned is None and not params.ignore_eos and len(eos):  # a banned EOS cannot have been drawn
                finished = torch.isin(tokens, eos) & alive
                for sample in rows[finished].tolist():
                    reasons[sample] = "eos"
            if stop_checker:
                finished = torch.zeros_like(alive) if finished is None else finished
                self._check_stops(stop_checker, host_tokens, tokens, rows, alive & ~finished, finished, reasons,
                                  check=step + 1 >= params.min_new_tokens)
            if finished is not None and bool(finished.any()):
                lengths[rows[finished]] = step + 1
                alive &= ~finished
                dense = False
            if step + 1 == max_new or not bool(alive.any()):
                break

            if not dense and (~alive).sum() >= max(self.drop_finished_fraction * len(alive), 1):
                keep = alive.nonzero().flatten()  # (B',)
                decoder.select(keep)
                rows, alive, tokens, next_position = rows[keep], alive[keep], tokens[keep], next_position[keep]
            logits = decoder.step(tokens, next_position)  # (B, V)
            next_position = next_position + 1

        lengths[lengths < 0] = step + 1  # samples still running when the loop ended
        tokens_host, logprobs_host, lengths = tokens_out.tolist(), logprobs_out.tolist(), lengths.tolist()
        return [(tokens_host[i][:lengths[i]], logprobs_host[i][:lengths[i]], reasons[i]) for i in range(N)]

    @staticmethod
    def _check_stops(checker, host_tokens, tokens, rows, running, finished, reasons, check: bool) -> None:
        """Append this step's tokens to the host copies of the running samples; when `check`, mark those
        whose newest token completed a stop string as finished (in place)."""
        running_rows = running.nonzero().flatten().tolist()
        samples = rows[running_rows].tolist()
        for sample, token in zip(samples, tokens[running_rows].tolist()):
            host_tokens[sample].append(token)
        if not check:
            return
        for row, sample, hit in zip(running_rows, samples, checker.completed([host_tokens[s] for s in samples])):
            if hit:
                finished[row] = True
                reasons[sample] = "stop"

    def _to_batch(self, prompt_ids, samples, params: SamplingParams) -> RolloutBatch:
        completion_ids = [ids for ids, _, _ in samples]
        # The EOS token is not part of the text, even when the tokenizer does not mark it special (as vLLM).
        text_ids = [ids[:-1] if reason == "eos" else ids for ids, _, reason in samples]
        texts = self.tokenizer.batch_decode(text_ids, skip_special_tokens=True)
        if params.stop:
            checker = StopStringChecker(self.tokenizer, params.stop)
            for i, (ids, _, reason) in enumerate(samples):
                if reason == "stop" and (span := checker.cut(ids)):
                    texts[i] = texts[i][:span[1]] if params.include_stop_str_in_output else texts[i][:span[0]]
        return RolloutBatch(
            prompt_ids=prompt_ids,
            completion_ids=completion_ids,
            completion_logprobs=[logprobs for _, logprobs, _ in samples],
            finish_reasons=[reason for _, _, reason in samples],
            completions=texts,
            prompt_index=[i for i in range(len(prompt_ids)) for _ in range(params.n)],
        )
