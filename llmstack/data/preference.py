"""Human preferences: pairs and K-way rankings (with ties and annotator ids) -> groups -> token tensors.

Every judgement becomes a `PreferenceGroup`: one prompt, K >= 2 responses and a rank per response (0 is
best; equal ranks are ties). A pair is a group of K = 2. Keeping a ranking's responses together lets the
reward loss score all K in one forward pass and weigh each ranking once (InstructGPT, Ouyang et al. 2022,
section 3.5), instead of letting a K = 9 ranking count 36 times.

Accepted records (JSONL/JSON/Parquet):
  {"prompt", "chosen", "rejected"}                 explicit prompt; text or messages
  {"chosen", "rejected"}                           implicit prompt: the longest shared prefix
  {"prompt", "responses": [...], "ranking": [...]} ranking = response indices best first; a nested list
                                                   is a tie, e.g. [2, [0, 1], 3]
each optionally with "annotator" and "margin" (how strongly chosen beats rejected).
Importers turn Anthropic HH dialogue strings, Open-Assistant message trees and Label Studio exports into
the same groups (see `import_hh`, `import_oasst`, `import_label_studio`).

Shape legend: N groups, K responses per group (padded), T tokens of a group's row.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from llmstack.data.sources import DataError, iter_records, synthetic_count

log = logging.getLogger("llmstack")


@dataclass
class PreferenceGroup:
    prompt: str | list[dict]  # plain text, or chat messages rendered with the chat template
    responses: list[str]
    ranks: list[int]  # per response, 0 = best, equal = tie
    annotator: str | None = None
    margin: float = 0.0
    where: str = ""


def _response_text(value, where: str, name: str) -> str:
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        value = value[-1].get("content")
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be text or a list of messages")
    if not value.strip():
        raise DataError(f"{where}: field '{name}' is empty")
    return value


def _shared_prefix(a, b):
    """Implicit prompt of two texts or two message lists: their longest common prefix."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n], a[n:], b[n:]


def _ranks_from_ranking(ranking, k: int, where: str) -> list[int]:
    if not isinstance(ranking, list):
        raise DataError(f"{where}: field 'ranking' must be a list of response indices, best first")
    ranks = [-1] * k
    seen = []
    for tier, entry in enumerate(ranking):
        for index in entry if isinstance(entry, list) else [entry]:
            if not isinstance(index, int) or not 0 <= index < k or ranks[index] != -1:
                raise DataError(f"{where}: field 'ranking' {ranking!r} is not a permutation of the "
                                f"{k} response indices 0..{k - 1} (ties as nested lists)")
            ranks[index] = tier
            seen.append(index)
    if len(seen) != k:
        raise DataError(f"{where}: field 'ranking' {ranking!r} is not a permutation of the {k} response "
                        f"indices 0..{k - 1}: it misses {sorted(set(range(k)) - set(seen))}")
    return ranks


def to_group(record, where: str) -> PreferenceGroup:
    """A validated group from one pair or ranking record."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    annotator = record.get("annotator")
    margin = float(record.get("margin") or 0.0)
    if "chosen" in record and "rejected" in record:
        chosen, rejected = record["chosen"], record["rejected"]
        if "prompt" in record:
            prompt = record["prompt"]
        else:
            if type(chosen) is not type(rejected):
                raise DataError(f"{where}: fields 'chosen' and 'rejected' must both be text or both messages")
            prompt, chosen, rejected = _shared_prefix(chosen, rejected)
        responses = [_response_text(chosen, where, "chosen"), _response_text(rejected, where, "rejected")]
        if responses[0] == responses[1]:
            raise DataError(f"{where}: fields 'chosen' and 'rejected' are the same response")
        return PreferenceGroup(prompt, responses, [0, 1], annotator, margin, where)
    if "responses" in record and "ranking" in record:
        responses = record["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise DataError(f"{where}: field 'responses' must list at least two responses")
        texts = [_response_text(r, where, f"responses[{i}]") for i, r in enumerate(responses)]
        if len(set(texts)) != len(texts):
            raise DataError(f"{where}: field 'responses' repeats a response")
        ranks = _ranks_from_ranking(record["ranking"], len(texts), where)
        return PreferenceGroup(record.get("prompt", ""), texts, ranks, annotator, margin, where)
    raise DataError(f"{where}: expected fields 'chosen' and 'rejected', or 'responses' and 'ranking'; the "
                    f"record has: {', '.join(record) or 'nothing'}")


def iter_groups(spec: str) -> Iterator[PreferenceGroup]:
    """Groups from llmstack's own pair/ranking records, or 'synthetic[:N]' (the built-in rankings)."""
    n_synthetic = synthetic_count(spec)
    if n_synthetic is not None:
        from llmstack.data.synthetic import preferences

        records = ((f"synthetic record {i}", r) for i, r in enumerate(preferences(n_synthetic)))
    else:
        records = iter_records(spec)
    for where, record in records:
        yield to_group(record, where)


# ---------------------------------------------------------------------------------------------------------
# Importers


def hh_to_messages(dialogue: str, where: str) -> list[dict]:
    """An Anthropic HH string ("\\n\\nHuman: ...\\n\\nAssistant: ...") as chat messages."""
    messages = []
    for chunk in dialogue.split("\n\nHuman:")[1:]:
        human, *assistant = chunk.split("\n\nAssistant:")
        messages.append({"role": "user", "content": human.strip()})
        messages += [{"role": "assistant", "content": a.strip()} for a in assistant]
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: not an HH dialogue ending on an Assistant turn")
    return messages


def import_hh(spec: str) -> Iterator[PreferenceGroup]:
    """Anthropic HH-RLHF `{"chosen", "rejected"}` dialogues: the shared turns are the prompt.

    The public release has a few unusable pairs (an empty answer, identical answers); they are skipped with
    a warning naming each one, since they say nothing about a preference."""
    for where, record in iter_records(spec):
        try:
            chosen = hh_to_messages(record["chosen"], f"{where}, field 'chosen'")
            rejected = hh_to_messages(record["rejected"], f"{where}, field 'rejected'")
            prompt, chosen_tail, rejected_tail = _shared_prefix(chosen[:-1], rejected[:-1])
            if chosen_tail or rejected_tail:
                raise DataError(f"{where}: the two dialogues differ before their last Assistant turn")
            yield to_group({"prompt": prompt, "chosen": chosen[-1]["content"],
                            "rejected": rejected[-1]["content"]}, where)
        except DataError as err:
            log.warning(f"skipping an unusable HH pair: {err}")


def import_oasst(spec: str, include_synthetic: bool = False) -> Iterator[PreferenceGroup]:
    """Open-Assistant message trees: every prompter message with two or more ranked assistant replies is a
    ranking of those replies, with the conversation up to it as the prompt. Ranks are the dataset's
    consensus ranks (0 best); the trees carry no annotator ids."""
    for where, record in iter_records(spec):
        yield from _oasst_walk(record["prompt"], [], where, include_synthetic)


def _oasst_walk(node: dict, path: list[dict], where: str, include_synthetic: bool) -> Iterator[PreferenceGroup]:
    if node.get("synthetic") and not include_synthetic:
        return
    role = "user" if node["role"] == "prompter" else "assistant"
    path = path + [{"role": role, "content": node["text"]}]
    replies = node.get("replies", [])
    ranked = [r for r in replies if isinstance(r.get("rank"), int) and (include_synthetic or not r.get("synthetic"))]
    if role == "user" and len(ranked) >= 2:
        ranked.sort(key=lambda r: r["rank"])
        yield to_group({"prompt": path, "responses": [r["text"] for r in ranked],
                        "ranking": list(range(len(ranked)))}, f"{where}, message {node.get('message_id')}")
    for reply in replies:
        yield from _oasst_walk(reply, path, where, include_synthetic)


def import_label_studio(path: str | Path) -> Iterator[PreferenceGroup]:
    """A Label Studio JSON export of pairwise tasks, one group per annotation.

    Expected shape (the Pairwise template with `toName="answer1,answer2"`):
      [{"id": 7, "data": {"prompt": "...", "answer1": "...", "answer2": "..."},
        "annotations": [{"completed_by": 3, "result": [{"type": "pairwise", "value": {"selected": "left"}}]}]}]
    "left" prefers answer1, "right" answer2. Cancelled annotations and tasks without any are skipped.
    """
    tasks = json.loads(Path(path).read_text())
    for task in tasks:
        where = f"{path}, task {task.get('id')}"
        data = task.get("data", {})
        missing = [k for k in ("prompt", "answer1", "answer2") if k not in data]
        if missing:
            raise DataError(f"{where}: field 'data' misses {', '.join(missing)}")
        for annotation in task.get("annotations", []):
            if annotation.get("was_cancelled"):
                continue
            choice = next((r["value"].get("selected") for r in annotation.get("result", [])
                           if r.get("type") == "pairwise"), None)
            if choice not in ("left", "right"):
                raise DataError(f"{where}: annotation {annotation.get('id')} has no pairwise 'selected' value")
            first, second = (data["answer1"], data["answer2"]) if choice == "left" else (data["answer2"], data["answer1"])
            yield to_group({"prompt": data["prompt"], "chosen": first, "rejected": second,
                            "annotator": str(annotation.get("completed_by"))}, where)


IMPORTERS = {"auto": iter_groups, "hh": import_hh, "oasst": import_oasst, "label_studio": import_label_studio}


# ---------------------------------------------------------------------------------------------------------
# Tokenising


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _prompt_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, list):
        prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return _encode(tokenizer, prompt)


def render(tokenizer, prompt, response: str) -> list[int]:
    """Token ids of prompt + response + EOS, built the way PPO builds a sample: the prompt (with the chat
    template's generation header) tokenised alone, then the response tokens, then EOS, where the score is
    read. The reward model thus scores exactly the token sequences the policy will produce."""
    return _prompt_ids(tokenizer, prompt) + _encode(tokenizer, response) + [tokenizer.eos_token_id]


PAD_SEGMENT = -1


@dataclass
class PreferenceRows:
    """One row per group: the prompt's tokens once, then each response's tokens and EOS (as `render` builds
    them), right-padded. `segment_ids` are 0 on the prompt, k + 1 on response k and PAD_SEGMENT on padding;
    `position_ids` continue from the prompt in every response, so under `shared_prompt_mask` each response
    is computed exactly as prompt + response alone would be, while the prompt is computed once per group
    instead of once per response (most of the tokens when dialogues are long and answers short)."""

    input_ids: torch.Tensor  # [N, T]
    position_ids: torch.Tensor  # [N, T]
    segment_ids: torch.Tensor  # [N, T]
    last_index: torch.Tensor  # [N, K] position of each response's EOS, where its score is read (0 if absent)
    ranks: torch.Tensor  # [N, K], -1 where a group has fewer than K responses
    margins: torch.Tensor  # [N]
    lengths: torch.Tensor  # [N] tokens before the padding
    stats: dict

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index) -> dict:
        """The groups at `index`, cut to the longest of them: columns that are padding in every row are
        attended to by nothing real and change no score."""
        width = int(self.lengths[index].max())
        return {"input_ids": self.input_ids[index, :width], "position_ids": self.position_ids[index, :width],
                "segment_ids": self.segment_ids[index, :width], "last_index": self.last_index[index],
                "ranks": self.ranks[index], "margins": self.margins[index]}


def shared_prompt_mask(segment_ids_NT: torch.Tensor) -> torch.Tensor:
    """[N, 1, T, T] boolean: position i attends to j <= i of its own segment, and a response also to its
    prompt (segment 0). Padding attends only to padding, so no row of the mask is empty."""
    seg_i, seg_j = segment_ids_NT[:, :, None], segment_ids_NT[:, None, :]
    length = segment_ids_NT.shape[1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=segment_ids_NT.device))
    return (causal & ((seg_i == seg_j) | ((seg_j == 0) & (seg_i > 0))))[:, None]


def _fit(prompt: list[int], responses: list[list[int]], max_length: int) -> tuple[list[int], list[list[int]]]:
    """Cut a group so that prompt + its longest response fits `max_length`: the prompt keeps its last tokens
    (every response still sees the same prompt), and a response longer than `max_length` alone keeps its last
    tokens (the EOS, where the score is read) and sees no prompt."""
    responses = [r[-max_length:] for r in responses]
    room = max_length - max(len(r) for r in responses)
    return (prompt[len(prompt) - room:] if room < len(prompt) else prompt), responses


def build_preference_rows(groups: list[PreferenceGroup], tokenizer, max_length: int) -> PreferenceRows:
    """Tensors for `groups` in the shared-prompt layout (`PreferenceRows`); groups longer than `max_length`
    are cut by `_fit`, and the responses whose scored text was cut are counted. `sharing_factor` in the stats
    is the prompt + response tokens scored over the tokens the rows hold: the compute sharing saves."""
    if not groups:
        raise ValueError("no preference groups to tokenise")
    k_max = max(len(g.responses) for g in groups)
    encoded, truncated = [], 0
    for group in groups:
        prompt = _prompt_ids(tokenizer, group.prompt)
        responses = [_encode(tokenizer, r) + [tokenizer.eos_token_id] for r in group.responses]
        kept_prompt, kept = _fit(prompt, responses, max_length)
        truncated += sum(len(kept_prompt) + len(k) < len(prompt) + len(r) for k, r in zip(kept, responses))
        encoded.append((kept_prompt, kept))
    lengths = torch.tensor([len(p) + sum(len(r) for r in rs) for p, rs in encoded], dtype=torch.long)
    width = int(lengths.max())
    input_ids = torch.full((len(groups), width), tokenizer.pad_token_id, dtype=torch.long)
    positions = torch.zeros_like(input_ids)
    segments = torch.full_like(input_ids, PAD_SEGMENT)
    last = torch.zeros((len(groups), k_max), dtype=torch.long)
    ranks = torch.full((len(groups), k_max), -1, dtype=torch.long)
    for n, (group, (prompt, responses)) in enumerate(zip(groups, encoded)):
        input_ids[n, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        positions[n, :len(prompt)] = torch.arange(len(prompt))
        segments[n, :len(prompt)] = 0
        start = len(prompt)
        for k, response in enumerate(responses):
            end = start + len(response)
            input_ids[n, start:end] = torch.tensor(response)
            positions[n, start:end] = torch.arange(len(prompt), len(prompt) + len(response))
            segments[n, start:end] = k + 1
            last[n, k] = end - 1
            start = end
        ranks[n, :len(responses)] = torch.tensor(group.ranks)
    margins = torch.tensor([g.margin for g in groups], dtype=torch.float)
    scored = sum(len(p) + len(r) for p, rs in encoded for r in rs)
    stats = {"groups": len(groups), "responses": int((ranks >= 0).sum()), "max_k": k_max,
             "truncated_responses": truncated,
             "sharing_factor": round(scored / max(1, int(lengths.sum())), 4)}
    return PreferenceRows(input_ids, positions, segments, last, ranks, margins, lengths, stats)
