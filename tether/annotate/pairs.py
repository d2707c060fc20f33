"""The pairs to label: read from a file, or sampled by tether's own sampler.

File rows (JSONL/JSON/Parquet/CSV): `{"prompt", "response_a", "response_b"}`, or TRL preference rows
`{"prompt", "chosen", "rejected"}` (also full conversations with an implicit prompt), whose existing order
is ignored: they are judged afresh. A bad row stops the start with the file, its line and the field.

Sampling (seed 003 §23.3: "sample a prompt q; generate two responses y_A, y_B from the current policy"):
`model` samples two responses per prompt; `model_a` and `model_b` one each, for a side-by-side comparison.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from tether.annotate.store import Item
from tether.data.chat import prompt_text
from tether.data.loading import DataError, load_rows
from tether.data.preference import parse_preference_row

if TYPE_CHECKING:
    from tether.annotate.cli import AnnotateConfig

log = logging.getLogger(__name__)


def _line_numbers(source: str) -> list[int] | None:
    """1-based line of each row of a JSONL file (blank lines are not rows); None for other formats."""
    path = Path(source)
    if path.suffix.lower() not in (".jsonl", ".ndjson") or not path.is_file():
        return None
    return [n + 1 for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()) if line.strip()]


def _where(source: str, lines: list[int] | None, index: int) -> str:
    return f"{source} (line {lines[index]})" if lines else source


def _text(row: dict, key: str, where: str, index: int):
    value = row.get(key)
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value:
        return value
    got = "missing" if value is None else f"got {type(value).__name__} {str(value)[:40]!r}"
    raise DataError(where, f"expected a non-empty string or message list ({got}); rows need "
                           f"prompt/response_a/response_b or prompt/chosen/rejected", index, key)


def read_pairs(source: str) -> list[Item]:
    """Every row of `source` as an Item (ids 0, 1, ...); raises DataError naming file, line and field."""
    rows = load_rows(source)
    lines = _line_numbers(source)
    items = []
    for index, row in enumerate(rows):
        where = _where(source, lines, index)
        if "response_a" in row or "response_b" in row:
            prompt = _text(row, "prompt", where, index)
            a, b = _text(row, "response_a", where, index), _text(row, "response_b", where, index)
        elif "chosen" in row or "rejected" in row:
            pair = parse_preference_row(row, where, index)
            prompt, a, b = pair.prompt, pair.chosen, pair.rejected
        else:
            raise DataError(where, "expected response_a/response_b (or chosen/rejected); found fields "
                                   f"{sorted(row)}", index, "response_a")
        items.append(Item(index, prompt, a, b, origin=f"{source} row {index}"))
    return items


def _sample(model_name: str, prompts: list, n: int, spec: AnnotateConfig) -> list[str]:
    """`n` completions per prompt from one model, grouped prompt by prompt."""
    from tether.models import load  # torch loads only when sampling is asked for
    from tether.rollout import SamplingParams, get_sampler
    from tether.runtime.device import choose_device

    params = SamplingParams(temperature=spec.temperature, top_p=spec.top_p, max_new_tokens=spec.max_new_tokens,
                            n=n, seed=spec.seed)
    model, tokenizer = load(model_name, device=choose_device(spec.device), seed=spec.seed)
    sampler = get_sampler("builtin", model, tokenizer, batch_size=spec.batch_size)
    prompt_ids = []
    for prompt in prompts:  # encoded as tether.data.sft does: templated text carries its own special tokens
        text = prompt_text(tokenizer, prompt)
        prompt_ids.append(tokenizer(text, add_special_tokens=text is prompt)["input_ids"])
    return sampler.generate(prompt_ids, params).completions


def sample_pairs(spec: AnnotateConfig) -> list[Item]:
    """Two responses per prompt of `spec.prompts`, as Items; `spec` gives the model(s) and the sampling
    options (temperature, top_p, max_new_tokens, seed, batch_size, device)."""
    rows = load_rows(spec.prompts)
    lines = _line_numbers(spec.prompts)
    prompts = [_text(row, "prompt", _where(spec.prompts, lines, i), i) for i, row in enumerate(rows)]
    if spec.model:
        both = _sample(spec.model, prompts, 2, spec)
        pairs, origin = list(zip(both[0::2], both[1::2])), f"{spec.model} x2"
    else:
        pairs = list(zip(_sample(spec.model_a, prompts, 1, spec), _sample(spec.model_b, prompts, 1, spec)))
        origin = f"{spec.model_a} vs {spec.model_b}"
    same = sum(a == b for a, b in pairs)
    if same:
        log.info("%d of %d prompts got two identical responses; a vote on them is not exported", same, len(pairs))
    return [Item(i, prompt, a, b, origin=f"{origin}, {spec.prompts} row {i}")
            for i, (prompt, (a, b)) in enumerate(zip(prompts, pairs))]
