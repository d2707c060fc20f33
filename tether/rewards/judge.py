"""`judge`: an LLM judge read from its next-token probabilities (RLAIF, Lee et al. 2023).

    rewards:
      - {name: judge, model: Qwen/Qwen2.5-7B-Instruct, mode: pointwise}               # expected score 1..5
      - {name: judge, model: path/to/judge, mode: pointwise, scale: yes-no}           # P(Yes)
      - {name: judge, model: path/to/judge, mode: pairwise, reference_column: reference}

The judge (any causal LM folder, hub name, or `tiny`) reads a prompt built from `template` and is not
sampled: one forward gives the probability p_k of each score token at the answer position.

pointwise   reward = Σ_k v_k p_k / Σ_k p_k     ("1".."5" → v = 1..5: the expected score;
                                                "Yes"/"No" → v = 1/0: P(Yes) among {Yes, No})
pairwise    reward = P(A) / (P(A) + P(B)) with the completion as response A and the row's `reference`
            column as response B: the probability the judge prefers the completion. With `swap=True`
            (default) it is also asked with the two swapped, and the two probabilities are averaged to
            cancel position bias (Lee et al. 2023, section 2.1).

Mass outside the score tokens is ignored (renormalised away); when it is below `min_score_mass` the row
gets None ("cannot judge"). With `chat_template="auto"` a judge whose tokenizer has a chat template gets
the filled template as a user message followed by the assistant prefix; otherwise the text is used as is.
"""

from __future__ import annotations

import torch

POINTWISE_TEMPLATE = (
    "Rate how well the response answers the prompt, from 1 (useless) to 5 (excellent).\n\n"
    "Prompt: {prompt}\n\nResponse: {completion}\n\nReply with one digit, 1-5. Score:"
)
YES_NO_TEMPLATE = (
    "Does the response correctly and helpfully answer the prompt?\n\n"
    "Prompt: {prompt}\n\nResponse: {completion}\n\nReply Yes or No. Answer:"
)
PAIRWISE_TEMPLATE = (
    "Which response answers the prompt better?\n\nPrompt: {prompt}\n\nResponse A: {response_a}\n\n"
    "Response B: {response_b}\n\nReply with one letter, A or B. Better response:"
)
SCALES = {"1-5": {str(k): float(k) for k in range(1, 6)}, "yes-no": {"Yes": 1.0, "No": 0.0}}


def _as_text(item) -> str:
    """A prompt/completion as text; a message list becomes "role: content" lines."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        return str(item.get("content") or "")
    if isinstance(item, (list, tuple)):
        if len(item) == 1:
            return _as_text(item[0])
        return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" if isinstance(m, dict) else str(m)
                         for m in item)
    return "" if item is None else str(item)


class Judge:
    """A causal LM read at its next token: `score_token_probs(texts)` → (N, K) over the K score tokens."""

    def __init__(self, model, tokenizer, token_texts: list[str], *, device: str | torch.device = "auto",
                 batch_size: int = 8, chat_template: str = "auto"):
        from tether.runtime.device import choose_device

        self.device = choose_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.use_chat = chat_template == "always" or (chat_template == "auto" and bool(tokenizer.chat_template))
        self.token_ids = [self._single_token(text) for text in token_texts]

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"judge score token {text!r} is {len(ids)} tokens for this tokenizer ({ids}); "
                             f"choose score tokens that are one token each (e.g. with or without a leading space)")
        return ids[0]

    def render(self, text: str) -> str:
        if self.use_chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text

    @torch.no_grad()
    def next_token_logits(self, texts: list[str]) -> torch.Tensor:
        """Logits of the token after each text: (N, V) float32 (left-padded batches)."""
        from tether.data.batching import pad
        from tether.ops import position_ids_from_mask

        out = []
        for start in range(0, len(texts), self.batch_size):
            ids = [self.tokenizer(self.render(t), add_special_tokens=not self.use_chat)["input_ids"]
                   for t in texts[start: start + self.batch_size]]
            input_ids = pad(ids, self.tokenizer.pad_token_id, side="left").to(self.device)  # (b, T)
            attention_mask = pad([[1] * len(i) for i in ids], 0, side="left").to(self.device)
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids_from_mask(attention_mask)).logits  # (b, T, V)
            out.append(logits[:, -1].float().cpu())  # (b, V): left padding puts every last token at T-1
        return torch.cat(out)

    def score_token_probs(self, texts: list[str]) -> torch.Tensor:
        """Probabilities of the score tokens at the answer position, (N, K), NOT renormalised."""
        probs = torch.softmax(self.next_token_logits(texts), dim=-1)  # (N, V)
        return probs[:, self.token_ids]  # (N, K)


def expected_scores(probs: torch.Tensor, values: list[float], min_mass: float = 0.0) -> list[float | None]:
    """Σ_k v_k p_k / Σ_k p_k per row of probs (N, K); None where Σ_k p_k <= min_mass (or is 0)."""
    mass = probs.sum(-1)  # (N,)
    expected = (probs * torch.tensor(values, dtype=probs.dtype)).sum(-1) / mass.clamp(min=1e-30)
    return [float(e) if m > min_mass and m > 0 else None for e, m in zip(expected.tolist(), mass.tolist())]


def make_judge_reward(model: str = "tiny", template: str | None = None, mode: str = "pointwise",
                      scale: str = "1-5", score_tokens: dict[str, float] | None = None,
                      reference_column: str = "reference", swap: bool = True, batch_size: int = 8,
                      device: str = "auto", chat_template: str = "auto", min_score_mass: float = 0.0, seed: int = 0):
    """A judge reward `reward(prompts, completions, **columns) -> list[float | None]` (see the module doc).

    template: str.format text with {prompt} and {completion} (pointwise) or {prompt}, {response_a},
    {response_b} (pairwise); default per mode/scale. scale: "1-5" or "yes-no"; score_tokens overrides it
    with {token text: value}. Pairwise needs the column `reference_column` (None there → None).
    """
    from tether import models

    if mode not in ("pointwise", "pairwise"):
        raise ValueError(f"judge mode {mode!r}: expected 'pointwise' or 'pairwise'")
    if mode == "pointwise":
        if score_tokens is None:
            if scale not in SCALES:
                raise ValueError(f"judge scale {scale!r}: expected one of {', '.join(SCALES)} (or give score_tokens)")
            score_tokens = SCALES[scale]
        template = template or (YES_NO_TEMPLATE if scale == "yes-no" else POINTWISE_TEMPLATE)
    else:
        score_tokens = score_tokens or {"A": 1.0, "B": 0.0}
        template = template or PAIRWISE_TEMPLATE
    lm, tokenizer = models.load(model, seed=seed)
    judge = Judge(lm, tokenizer, list(score_tokens), device=device, batch_size=batch_size,
                  chat_template=chat_template)
    values = list(score_tokens.values())

    def judge_reward(prompts: list, completions: list, **columns) -> list[float | None]:
        if mode == "pointwise":
            texts = [template.format(prompt=_as_text(p), completion=_as_text(c)) for p, c in zip(prompts, completions)]
            return expected_scores(judge.score_token_probs(texts), values, min_score_mass)
        if reference_column not in columns:
            raise ValueError(f"judge mode=pairwise compares each completion with the '{reference_column}' column, "
                             f"which this data does not have (columns: {sorted(columns)})")
        references = columns[reference_column]
        rows = [i for i, r in enumerate(references) if r is not None]
        fill = lambda i, a, b: template.format(prompt=_as_text(prompts[i]), response_a=a, response_b=b)  # noqa: E731
        first = [fill(i, _as_text(completions[i]), _as_text(references[i])) for i in rows]
        preference = expected_scores(judge.score_token_probs(first), values, min_score_mass)  # P(completion = A)
        if swap:
            second = [fill(i, _as_text(references[i]), _as_text(completions[i])) for i in rows]
            swapped = expected_scores(judge.score_token_probs(second), values, min_score_mass)  # P(reference = A)
            preference = [None if a is None or b is None else (a + (1 - b)) / 2 for a, b in zip(preference, swapped)]
        result: list[float | None] = [None] * len(completions)
        for i, value in zip(rows, preference):
            result[i] = value
        return result

    judge_reward.__name__ = "judge"
    judge_reward.judge = judge
    return judge_reward
