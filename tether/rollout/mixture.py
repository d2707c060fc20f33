"""Sampling from the geometric mixture π_θ^{1−β} π_ref^{β} of two causal LMs, token by token.

Nash-MD's opponent (Munos et al. 2024, eq. 6) is the geometric mixture of the current policy and the
reference. Over whole sequences it has no closed form; the paper (§7) samples it token by token, each next
token from softmax((1−β) log π_θ(·|x, y_<t) + β log π_ref(·|x, y_<t)), which is what this sampler does: one
KV cache per model, both fed the same drawn token. Same SamplingParams and RolloutBatch as every engine
(completion_logprobs are the mixture's).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from tether.preference_game import geometric_mixture
from tether.rollout.engine import RolloutBatch, Sampler, default_eos_ids, encode_prompts
from tether.rollout.params import SamplingParams
from tether.rollout.sampler import ModelDecoder, make_generator, select_tokens


class GeometricMixtureSampler(Sampler):
    """Samples π_θ^{1−β} π_ref^{β} / Z token by token; `load_weights` updates π_θ (the reference stays)."""

    def __init__(self, policy, reference, tokenizer, *, beta: float):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"geometric mixture: beta must be in [0, 1], got {beta}")
        self.policy, self.reference, self.tokenizer, self.beta = policy, reference, tokenizer, beta
        self.eos_ids = default_eos_ids(policy, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def load_weights(self, model) -> None:
        self.policy = model

    def _prefill(self, model, input_ids, attention_mask, position_ids, n: int):
        cache = DynamicCache(config=model.config)
        P = input_ids.shape[1]
        logits = model(input_ids=input_ids, attention_mask=attention_mask[:, :P], position_ids=position_ids,
                       past_key_values=cache, use_cache=True).logits[:, -1]  # (U, V)
        cache.batch_repeat_interleave(n)
        return logits.repeat_interleave(n, dim=0), ModelDecoder(model, cache, attention_mask.repeat_interleave(n, 0), P)

    @torch.inference_mode()
    def generate(self, prompts, params: SamplingParams) -> RolloutBatch:
        prompt_ids = encode_prompts(self.tokenizer, prompts)
        device = next(self.policy.parameters()).device
        generator = make_generator(params.seed, device)
        n, max_new = params.n, params.max_new_tokens
        U, P = len(prompt_ids), max(len(p) for p in prompt_ids)
        input_ids = torch.full((U, P), self.pad_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros(U, P + max_new, dtype=torch.long, device=device)
        for i, ids in enumerate(prompt_ids):  # left-padded, as the builtin engine
            input_ids[i, P - len(ids):] = torch.tensor(ids, device=device)
            attention_mask[i, P - len(ids):] = 1
        position_ids = (attention_mask[:, :P].cumsum(-1) - 1).clamp(min=0)  # (U, P)
        training = self.policy.training
        self.policy.eval()
        policy_logits, policy_decoder = self._prefill(self.policy, input_ids, attention_mask, position_ids, n)
        ref_logits, ref_decoder = self._prefill(self.reference, input_ids, attention_mask, position_ids, n)
        next_position = position_ids[:, -1].repeat_interleave(n) + 1  # (N,)
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=device)
        N = U * n
        tokens_out, logprobs_out = [], []
        finished = torch.zeros(N, dtype=torch.bool, device=device)
        lengths = torch.full((N,), max_new, dtype=torch.long, device=device)
        for step in range(max_new):
            mixed = geometric_mixture(policy_logits, ref_logits, self.beta)  # (N, V) log-probs of the mixture
            banned = eos if step < params.min_new_tokens else None
            tokens, logprobs = select_tokens(mixed, params, generator, banned)  # (N,), (N,)
            tokens = torch.where(finished, torch.full_like(tokens, self.pad_id), tokens)
            tokens_out.append(tokens)
            logprobs_out.append(logprobs)
            ended = torch.isin(tokens, eos) & ~finished
            lengths[ended] = step + 1
            finished |= ended
            if bool(finished.all()) or step + 1 == max_new:
                break
            policy_logits = policy_decoder.step(tokens, next_position)
            ref_logits = ref_decoder.step(tokens, next_position)
            next_position = next_position + 1
        self.policy.train(training)
        tokens_host = torch.stack(tokens_out, 1).tolist()  # (N, steps)
        logprobs_host = torch.stack(logprobs_out, 1).tolist()
        lengths, ended = lengths.tolist(), finished.tolist()
        completion_ids = [tokens_host[i][:lengths[i]] for i in range(N)]
        texts = self.tokenizer.batch_decode([ids[:-1] if ended[i] else ids for i, ids in enumerate(completion_ids)],
                                            skip_special_tokens=True)
        return RolloutBatch(prompt_ids=prompt_ids, completion_ids=completion_ids,
                            completion_logprobs=[logprobs_host[i][:lengths[i]] for i in range(N)],
                            finish_reasons=["eos" if e else "length" for e in ended], completions=texts,
                            prompt_index=[i for i in range(U) for _ in range(n)])
