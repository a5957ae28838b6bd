"""Training data as two sources and a mix that is a function of progress.

- Dialogues become chat examples rendered with the tokenizer's chat template, with the loss on
  the assistant's answers only (every other label is -100) and hidden messages left out. For a
  base model whose GGUF has no template (Gemma 3 270M), that is the template the local runtime
  serves the model with (`quant.serving_chat_template`: Gemma's turns for `local:gemma3-270m`,
  else ChatML), so the adapter learns the turn markers it will see; a HF directory without one is
  refused with a clear error.
- Plain text (strings, files, folders) becomes packed language-model sequences in which each
  document sees only itself: per-document position ids, from which transformers builds a
  block-diagonal causal mask (varlen attention with flash-attention), and no loss on a
  document's first token, which nothing before it in its own document predicts.
- Edited answers become preference pairs: the model's answer (rejected) and the user's edit of
  it (chosen), for the same conversation up to that prompt (`preference_pairs`).
- `MixSampler` draws every batch's examples from the sources with the probabilities `mix(p)`
  gives at that batch's progress, and records what it drew, so the mix is a curve, not phases.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..document import Dialogue, Kind, Message
from ..history import RESULT_OPS
from .schedule import MixLike, resolve_mix

__all__ = [
    "Example", "dialogue_messages", "chat_example", "dialogue_examples", "read_docs", "pack_text",
    "MixSampler", "collate", "DataError", "TEXT_SUFFIXES", "sources_from", "PreferencePair",
    "preference_pairs", "edited_answers",
]

IGNORE = -100
TEXT_SUFFIXES = (".md", ".txt", ".rst", ".py", ".ipynb", ".html", ".json", ".toml", ".yaml", ".yml",
                 ".csv", ".tex", ".org", ".adoc")


class DataError(ValueError):
    """The training data cannot be used as given."""


@dataclass
class Example:
    """One training sequence: `labels[i]` is the target at position i (-100 = no loss); the
    shift for next-token prediction happens in the loss."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""
    # positions within each packed document (restarting at 0 where one starts); None: 0..n-1
    position_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


# ---------------------------------------------------------------- dialogues

def _code_block(m: Message) -> str:
    out = m.output_text()
    text = f"```python\n{m.source}\n```"
    return f"{text}\nOutput:\n{out}" if out else text


def dialogue_messages(d: Dialogue) -> list[dict[str, str]]:
    """A dialogue as chat-template messages.

    A prompt and its response are a user turn and an assistant turn. Notes and code cells are
    context the user wrote: they join the next user turn, as they would precede a prompt in
    the context sent to a model. Hidden messages are left out; context after the last answered
    prompt is dropped (there is no answer to learn from it), and so is a prompt with no answer."""
    msgs: list[dict[str, str]] = []
    if d.system:
        msgs.append({"role": "system", "content": d.system})
    pending: list[str] = []
    for m in d.messages:
        if m.hidden or m.kind == Kind.raw:
            continue
        if m.kind == Kind.note:
            if m.source.strip():
                pending.append(m.source)
        elif m.kind == Kind.code:
            if m.source.strip():
                pending.append(_code_block(m))
        elif m.kind == Kind.prompt:
            if not m.response.strip():
                continue
            pending.append(m.source)
            msgs.append({"role": "user", "content": "\n\n".join(pending)})
            msgs.append({"role": "assistant", "content": m.response})
            pending = []
    return msgs


def _render(tokenizer: Any, messages: list[dict[str, str]], gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def chat_example(messages: Sequence[Mapping[str, str]], tokenizer: Any, max_len: int = 1024,
                 source: str = "dialogues", last_only: bool = False) -> Example | None:
    """Tokenize a conversation with the model's chat template; labels only on assistant text
    (`last_only`: only on the last answer, the others being context).

    The assistant spans are found by rendering the template up to each answer (with and without
    the answer) and mapping characters to tokens with the fast tokenizer's offsets, so it works
    for any template that renders a conversation as a growing prefix."""
    msgs = [dict(m) for m in messages]
    if not any(m["role"] == "assistant" for m in msgs):
        return None
    if getattr(tokenizer, "chat_template", None) is None:
        # A GGUF base always has one here: `quant.load_tokenizer` gives it the template the local
        # runtime serves it with (its own, the model's built-in format such as Gemma's, or ChatML).
        raise DataError("the tokenizer has no chat template; dialogues need one (plain text does not). "
                        "Give a tokenizer with a chat_template, or train on the model's GGUF, whose "
                        "serving template is used")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("a fast tokenizer (with offsets) is needed to mask non-assistant tokens")
    full = _render(tokenizer, msgs, gen=False)
    spans: list[tuple[int, int]] = []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start_text = _render(tokenizer, msgs[:k], gen=True)
        end_text = _render(tokenizer, msgs[: k + 1], gen=False)
        if not (end_text.startswith(start_text) and full.startswith(end_text)):
            raise DataError("the chat template does not render the conversation as a growing prefix; "
                            "cannot tell the assistant's tokens apart")
        spans.append((len(start_text), len(end_text)))
    if last_only:
        spans = spans[-1:]
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    si = 0
    for i, (a, b) in enumerate(offsets):
        while si < len(spans) and a >= spans[si][1]:
            si += 1
        if si < len(spans) and spans[si][0] <= a < spans[si][1] and b > a:
            labels[i] = ids[i]
    ids, labels = ids[:max_len], labels[:max_len]
    ex = Example(ids, labels, source)
    return ex if ex.n_targets else None


def dialogue_examples(dialogues: Iterable[Dialogue], tokenizer: Any, max_len: int = 1024,
                      source: str = "dialogues") -> list[Example]:
    """One example per dialogue that has at least one answered prompt (truncated to max_len)."""
    out = []
    for d in dialogues:
        if not isinstance(d, Dialogue):
            raise DataError(f"expected a Dialogue, got {type(d).__name__}")
        ex = chat_example(dialogue_messages(d), tokenizer, max_len, source)
        if ex is not None:
            out.append(ex)
    return out


# ---------------------------------------------------------------- preferences

# the store's ops whose version holds what a run of the message produced (the model's answer),
# history.RESULT_OPS; any later version with another answer is the user's


@dataclass
class PreferencePair:
    """The same conversation ending in the answer the user wanted (`chosen`) and in the one the
    model gave (`rejected`); labels only on that last answer."""

    chosen: Example
    rejected: Example
    source: str = "preferences"

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def edited_answers(d: Dialogue, history: Any) -> list[tuple[Message, str, str]]:
    """(prompt message, the model's answer, the answer now) for every visible prompt whose answer
    the user changed after the model wrote it. `history(message_id)` gives the message's versions
    oldest first (`store.Version`: `.op` and `.state`); the model's answer is the last one a run
    of the prompt's current source wrote."""
    out = []
    for m in d.messages:
        if m.kind != Kind.prompt or m.hidden or not m.response.strip():
            continue
        model_answer = None
        for v in history(m.id):
            st = v.state
            if v.op in RESULT_OPS and st.get("response", "").strip() and st.get("source") == m.source:
                model_answer = st["response"]
        if model_answer is not None and model_answer.strip() != m.response.strip():
            out.append((m, model_answer, m.response))
    return out


def preference_pairs(dialogues: Iterable[Dialogue], history: Any, tokenizer: Any, max_len: int = 1024,
                     source: str = "preferences") -> list[PreferencePair]:
    """A pair per edited answer (`edited_answers`): the conversation up to that prompt as the
    dialogue holds it now, ending once in the edited answer and once in the model's."""
    import dataclasses
    out = []
    for d in dialogues:
        for m, rejected, chosen in edited_answers(d, history):
            i = next(k for k, x in enumerate(d.messages) if x is m)
            upto = dataclasses.replace(d, messages=d.messages[: i + 1])
            msgs = dialogue_messages(upto)
            if not msgs or msgs[-1]["role"] != "assistant":
                continue
            good = chat_example(msgs, tokenizer, max_len, source, last_only=True)
            bad = chat_example([*msgs[:-1], {"role": "assistant", "content": rejected}], tokenizer, max_len,
                               source, last_only=True)
            if good is not None and bad is not None:
                out.append(PreferencePair(good, bad, source))
    return out


# ---------------------------------------------------------------- plain text

def read_docs(paths: Iterable[str | Path], suffixes: Sequence[str] = TEXT_SUFFIXES) -> list[str]:
    """The text of files and of every text file under folders (sorted, so runs are repeatable)."""
    texts: list[str] = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"docs path not found: {path}")
        files = [path] if path.is_file() else sorted(
            f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in suffixes
            and not any(part.startswith(".") for part in f.relative_to(path).parts))
        for f in files:
            try:
                texts.append(f.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{f} is not UTF-8 text") from e
    return [t for t in texts if t.strip()]


def pack_text(texts: Iterable[str], tokenizer: Any, seq_len: int = 1024, source: str = "docs",
              min_tail: int = 16) -> list[Example]:
    """Concatenate documents (each with the tokenizer's own special tokens, e.g. Gemma's <bos>,
    and followed by EOS) and cut the stream into `seq_len` pieces; a short tail (< min_tail
    tokens) is dropped rather than padded.

    Documents do not leak into each other: each piece carries per-document position ids
    (restarting at 0 where a document, or the part of one that a piece starts with, begins), so
    attention stays inside each document and a packed document's loss equals its loss alone.
    The first token of each document part has no target, since nothing before it in its own
    document predicts it."""
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    starts: list[bool] = []
    for t in texts:
        if not isinstance(t, str):
            raise DataError(f"text must be str, got {type(t).__name__}")
        ids = list(tokenizer(t)["input_ids"])
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        stream.extend(ids)
        starts.extend([True] + [False] * (len(ids) - 1))
    out = []
    for i in range(0, len(stream), seq_len):
        chunk = stream[i: i + seq_len]
        if len(chunk) < min(min_tail, seq_len):
            continue
        pos, labels, p = [], [], 0
        for k, tok in enumerate(chunk):
            p = 0 if (k == 0 or starts[i + k]) else p + 1
            pos.append(p)
            labels.append(IGNORE if p == 0 else tok)
        out.append(Example(chunk, labels, source, pos))
    return out


# ---------------------------------------------------------------- batches

def collate(examples: Sequence[Example], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest (or `pad_to`); padded positions have label -100 and mask 0.

    A batch holding a packed example also gets `position_ids` (the loss then runs the model
    on those instead of the 2D mask: see loop._forward_hidden). Padding continues the last
    document's positions; being on the right, causal attention never shows it to a real token."""
    n = max(pad_to or 0, max(len(e) for e in examples))
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e)
        ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        mask[i, :k] = 1
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if any(e.position_ids is not None for e in examples):
        pos = torch.arange(n).repeat(len(examples), 1)
        for i, e in enumerate(examples):
            if e.position_ids is not None:
                k = len(e)
                pos[i, :k] = torch.tensor(e.position_ids)
                pos[i, k:] = torch.arange(n - k) + (e.position_ids[-1] + 1 if k else 0)
        out["position_ids"] = pos
    return out


class MixSampler:
    """Draws each batch from named sources with probabilities `mix(p)` at that batch's progress.

    Within a source, examples come in a shuffled order that is re-shuffled each pass, so every
    example is seen before any repeats. All randomness comes from one seeded generator whose
    state is part of `state_dict()`: a resumed run draws exactly the batches the uninterrupted
    one would. Under data parallelism every rank draws the same global batch and keeps its
    slice, so N ranks see exactly what one process with N times the batch sees."""

    def __init__(self, sources: Mapping[str, Sequence[Example]], mix: MixLike = None,
                 batch_size: int = 1, total_steps: int = 1, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.sources = {k: list(v) for k, v in sources.items() if len(v)}
        if not self.sources:
            raise DataError("no training data: every source is empty")
        if batch_size < 1 or total_steps < 1:
            raise DataError("batch_size and total_steps must be >= 1")
        self.names = list(self.sources)
        self.mix, self.batch_size, self.total_steps = mix, batch_size, total_steps
        self.rank, self.world_size = rank, world_size
        resolve_mix(mix, 0.0, self.names)  # fail now, not at step 1000, on a bad mix
        self._rng = random.Random(seed)
        self._order = {k: self._shuffled(k) for k in self.names}
        self._cursor = {k: 0 for k in self.names}
        self.history: list[dict[str, Any]] = []

    def _shuffled(self, name: str) -> list[int]:
        idx = list(range(len(self.sources[name])))
        self._rng.shuffle(idx)
        return idx

    def _next(self, name: str) -> Example:
        if self._cursor[name] >= len(self._order[name]):
            self._order[name] = self._shuffled(name)
            self._cursor[name] = 0
        ex = self.sources[name][self._order[name][self._cursor[name]]]
        self._cursor[name] += 1
        return ex

    def progress(self, step: int) -> float:
        return min(1.0, step / self.total_steps)

    def draw(self, step: int, p: float | None = None) -> list[Example]:
        """This rank's examples for `step` (the global batch is drawn on every rank alike); `p`
        overrides the progress (the loop passes it for each micro-batch of a step)."""
        p = self.progress(step) if p is None else p
        weights = resolve_mix(self.mix, p, self.names)
        names = self._rng.choices(self.names, weights=[weights[n] for n in self.names],
                                  k=self.batch_size * self.world_size)
        batch = [self._next(n) for n in names]
        self.history.append({"step": step, "p": p, "weights": weights,
                             "counts": {n: names.count(n) for n in self.names}})
        return batch[self.rank * self.batch_size: (self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.getstate(), "order": {k: list(v) for k, v in self._order.items()},
                "cursor": dict(self._cursor), "history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state["order"]) != set(self.names) or any(
                len(state["order"][k]) != len(self.sources[k]) for k in self.names):
            raise DataError("checkpoint was made with different training data; cannot resume exactly")
        rng = state["rng"]
        self._rng.setstate((rng[0], tuple(rng[1]), rng[2]))
        self._order = {k: list(v) for k, v in state["order"].items()}
        self._cursor = dict(state["cursor"])
        self.history = list(state["history"])

    def observed_mix(self, start: int = 0, end: int | None = None) -> dict[str, float]:
        """Fraction of drawn examples per source over history[start:end] (for checks and logs)."""
        tot = {n: 0 for n in self.names}
        for h in self.history[start:end]:
            for n, c in h["counts"].items():
                tot[n] += c
        s = sum(tot.values()) or 1
        return {n: c / s for n, c in tot.items()}


def sources_from(dialogues: Iterable[Dialogue] = (), docs: Iterable[str | Path] = (),
                 texts: Iterable[str] = (), tokenizer: Any = None, seq_len: int = 1024,
                 history: Any = None) -> dict[str, list[Any]]:
    """The standard sources, `dialogues` and `docs`, from what the caller has; with `history`
    (message id -> its versions) also `preferences`, the pairs of the dialogues' edited answers."""
    if tokenizer is None:
        raise DataError("a tokenizer is needed to build examples")
    out: dict[str, list[Example]] = {}
    dl = list(dialogues)
    if dl:
        out["dialogues"] = dialogue_examples(dl, tokenizer, seq_len)
        if not out["dialogues"]:
            raise DataError(f"none of the given dialogues has an answered prompt to learn from within "
                            f"the first {seq_len} tokens (hidden messages are left out)")
    if history is not None:
        out["preferences"] = preference_pairs(dl, history, tokenizer, seq_len)
        if not out["preferences"]:
            raise DataError("none of the given dialogues has an edited answer to learn preferences from "
                            "(edit a model's answer: the model's version and yours become a pair)")
    all_texts = [*read_docs(docs), *texts]
    if all_texts:
        out["docs"] = pack_text(all_texts, tokenizer, seq_len)
    if not out:
        raise DataError("no training data: give dialogues and/or docs")
    return out

