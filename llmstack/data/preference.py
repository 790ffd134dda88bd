"""Human preferences: pairs and K-way rankings (with ties and annotator ids) -> groups -> token tensors.

Every judgement becomes a `PreferenceGroup`: one prompt, K >= 2 responses and a rank per response (0 is
best; equal ranks are ties). A pair is a group of K = 2. Keeping a ranking's responses together lets the
reward loss score all K in one forward pass and weigh each ranking once (InstructGPT, Ouyang et al. 2022,
section 3.5), instead of letting a K = 9 ranking count 36 times.

Accepted records (JSONL/JSON/Parquet): TRL's preference types with TRL's meaning, and llmstack's rankings.
  {"prompt", "chosen", "rejected"}                 all text (standard) or all messages (conversational; a
                                                   text response to messages is the assistant's reply)
  {"chosen", "rejected"}                           implicit prompt: for messages, the leading messages the two
                                                   share; for text, the longest common token prefix, moved
                                                   back to a word boundary (`split_implicit`)
  {"prompt", "responses": [...], "ranking": [...]} ranking = response indices best first; a nested list
                                                   is a tie, e.g. [2, [0, 1], 3]
each optionally with "annotator" and "margin" (how strongly chosen beats rejected). Other TRL types are
refused with a one-line error (llmstack.data.formats). Importers turn Anthropic HH dialogue strings,
Open-Assistant message trees and Label Studio exports into the same groups (`import_hh`, `import_oasst`,
`import_label_studio`).

Tokenising, and where it departs from TRL 1.16's RewardTrainer on purpose:
- A row holds `prompt_ids(prompt)`, PPO's own prompt rendering, then each response's tokens up to the EOS where
  its score is read, which is where PPO's policy stops and where PPO reads the score. TRL tokenises prompt +
  response as one text and scores its last token; the ids are the same except (a) where tokens merge across
  the prompt's end (a prompt ending in a space), where llmstack keeps the prompt's own tokens, as PPO's
  rollouts do, and (b) after a conversation's final EOS: the template's trailing text (a newline in many
  templates) is never generated, so it is never scored.
- An implicit text prompt is cut from the very sequences TRL tokenises (each text + EOS), so those rows hold
  TRL's token ids exactly.

Shape legend: N groups, K responses per group (padded), T tokens of a group's row.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from llmstack.data import label_studio
from llmstack.data.formats import (IMPLICIT_PREFERENCE, PREFERENCE, RANKING, continuation_text, plain_ids,
                                   prompt_ids, record_type, refusal, text_ids, text_or_messages, with_eos)
from llmstack.data.sources import DataError, iter_records, synthetic_count
from llmstack.data.text import is_held_out

log = logging.getLogger("llmstack")


@dataclass
class PreferenceGroup:
    # text, messages (rendered with the chat template), or None: an implicit prompt inside two standard texts,
    # found when they are tokenised
    prompt: str | list[dict] | None
    responses: list[str | list[dict]]  # text (for a conversational prompt: the assistant's reply) or messages
    ranks: list[int]  # per response, 0 = best, equal = tie
    annotator: str | None = None
    margin: float = 0.0
    where: str = ""


def _response(prompt, value, where: str, name: str) -> str | list[dict]:
    value = text_or_messages(value, where, name)
    if isinstance(value, list) and not isinstance(prompt, list):
        raise DataError(f"{where}: field '{name}' is messages but the prompt is text; a record is all text "
                        "(standard) or all messages (conversational)")
    if not (value if isinstance(value, str) else "".join(m["content"] for m in value)).strip():
        raise DataError(f"{where}: field '{name}' is empty")
    return value


def _implicit(chosen, rejected, where: str) -> tuple[list[dict] | None, list]:
    """(prompt, [chosen, rejected]) of a pair without a prompt: the leading messages two conversations share,
    or None for two texts, whose prompt is found on a token boundary when they are tokenised."""
    chosen, rejected = text_or_messages(chosen, where, "chosen"), text_or_messages(rejected, where, "rejected")
    if type(chosen) is not type(rejected):
        raise DataError(f"{where}: fields 'chosen' and 'rejected' must both be text or both messages")
    if chosen == rejected:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' are the same response")
    if isinstance(chosen, str):
        for name, value, other in (("chosen", chosen, rejected), ("rejected", rejected, chosen)):
            if other.startswith(value):
                raise DataError(f"{where}: field '{name}' is empty once the prompt the two share is taken out")
        return None, [chosen, rejected]
    shared = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    if shared == 0:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' share no leading message, so there is no prompt "
                        "they both answer")
    return chosen[:shared], [_response(chosen[:shared], tail, where, name)
                             for name, tail in (("chosen", chosen[shared:]), ("rejected", rejected[shared:]))]


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
    kind = record_type(record, where)
    annotator = record.get("annotator")
    margin = record.get("margin") or 0.0
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise DataError(f"{where}: field 'margin' must be a number, got {type(margin).__name__}")
    if annotator is not None and not isinstance(annotator, (str, int)):
        raise DataError(f"{where}: field 'annotator' must be a name or a number, got {type(annotator).__name__}")
    annotator = None if annotator is None else str(annotator)
    margin = float(margin)
    if kind == IMPLICIT_PREFERENCE:
        prompt, responses = _implicit(record["chosen"], record["rejected"], where)
        return PreferenceGroup(prompt, responses, [0, 1], annotator, margin, where)
    if kind == PREFERENCE:
        prompt = text_or_messages(record["prompt"], where, "prompt")
        responses = [_response(prompt, record[name], where, name) for name in ("chosen", "rejected")]
        if responses[0] == responses[1]:
            raise DataError(f"{where}: fields 'chosen' and 'rejected' are the same response")
        return PreferenceGroup(prompt, responses, [0, 1], annotator, margin, where)
    if kind != RANKING:
        raise refusal(record, where, "reward")
    listed = record["responses"]
    if not isinstance(listed, list) or len(listed) < 2:
        raise DataError(f"{where}: field 'responses' must list at least two responses")
    prompt = text_or_messages(record.get("prompt", ""), where, "prompt")
    responses = [_response(prompt, r, where, f"responses[{i}]") for i, r in enumerate(listed)]
    if len({json.dumps(r) for r in responses}) != len(responses):
        raise DataError(f"{where}: field 'responses' repeats a response")
    ranks = _ranks_from_ranking(record["ranking"], len(responses), where)
    return PreferenceGroup(prompt, responses, ranks, annotator, margin, where)


def _is_hh_pair(record) -> bool:
    """A standard pair whose texts are Anthropic HH dialogues ("\\n\\nHuman: ... \\n\\nAssistant: ...")."""
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("chosen", "rejected")):
        return False
    prompt = record.get("prompt", "")
    return isinstance(prompt, str) and all((prompt + record[k]).lstrip().startswith("Human:")
                                           and "\n\nAssistant:" in prompt + record[k] for k in ("chosen", "rejected"))


def iter_groups(spec: str) -> Iterator[PreferenceGroup]:
    """Groups from TRL preference records and llmstack rankings, or 'synthetic[:N]' (the built-in rankings)."""
    n_synthetic = synthetic_count(spec)
    if n_synthetic is not None:
        from llmstack.data.synthetic import preferences

        records = ((f"synthetic record {i}", r) for i, r in enumerate(preferences(n_synthetic)))
    else:
        records = iter_records(spec)
    for where, record in records:
        # TRL reads HH pairs as raw text, while SFT and PPO render conversations with the chat template: a
        # reward model trained on the raw text would score a format PPO never shows it. Converting them here
        # would silently give these records a meaning TRL does not, so the choice is the user's, made once.
        if _is_hh_pair(record):
            raise DataError(f"{where}: fields 'chosen' and 'rejected' are Anthropic HH dialogues ('\\n\\nHuman: "
                            "... \\n\\nAssistant: ...'); set data.format=hh to read them as conversations")
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
    """Anthropic HH-RLHF `{"chosen", "rejected"}` dialogues (or `{"prompt", "chosen", "rejected"}` with the
    dialogue split between them): the shared turns are the prompt, as chat messages.

    The public release has a few unusable pairs (an empty answer, identical answers); they are skipped with
    a warning naming each one, since they say nothing about a preference."""
    for where, record in iter_records(spec):
        prompt, chosen, rejected = (_field(record, name, where, "an HH pair", str, required=name != "prompt")
                                    for name in ("prompt", "chosen", "rejected"))
        try:
            chosen = hh_to_messages((prompt or "") + chosen, f"{where}, field 'chosen'")
            rejected = hh_to_messages((prompt or "") + rejected, f"{where}, field 'rejected'")
            if chosen[:-1] != rejected[:-1]:
                raise DataError(f"{where}: the two dialogues differ before their last Assistant turn")
            yield to_group({"prompt": chosen[:-1], "chosen": chosen[-1]["content"],
                            "rejected": rejected[-1]["content"]}, where)
        except DataError as err:
            log.warning(f"skipping an unusable HH pair: {err}")


def _field(record, name: str, where: str, what: str, kind: type, required: bool = True):
    """`record[name]`, checked to be a `kind`; None when it is absent and not `required`."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object ({what}), got {type(record).__name__}")
    if name not in record:
        if not required:
            return None
        raise DataError(f"{where}: missing field '{name}' of {what} (the record has: {', '.join(record) or 'nothing'})")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        expected = {str: "text", dict: "an object", list: "a list", int: "an integer"}[kind]
        raise DataError(f"{where}: field '{name}' of {what} must be {expected}, got {type(value).__name__}")
    return value


def import_oasst(spec: str, include_synthetic: bool = False) -> Iterator[PreferenceGroup]:
    """Open-Assistant message trees: every prompter message with two or more ranked assistant replies is a
    ranking of those replies, with the conversation up to it as the prompt. Ranks are the dataset's
    consensus ranks (0 best); the trees carry no annotator ids."""
    for where, record in iter_records(spec):
        yield from _oasst_walk(_field(record, "prompt", where, "an Open-Assistant tree", dict), [], where,
                               include_synthetic)


def _oasst_walk(node: dict, path: list[dict], where: str, include_synthetic: bool) -> Iterator[PreferenceGroup]:
    here = f"{where}, message {node.get('message_id', len(path))}"
    if node.get("synthetic") and not include_synthetic:
        return
    role = _field(node, "role", here, "an Open-Assistant message", str)
    if role not in ("prompter", "assistant"):
        raise DataError(f"{here}: field 'role' is {role!r}; Open-Assistant messages are 'prompter' or 'assistant'")
    role = "user" if role == "prompter" else "assistant"
    path = path + [{"role": role, "content": _field(node, "text", here, "an Open-Assistant message", str)}]
    replies = _field(node, "replies", here, "an Open-Assistant message", list, required=False) or []
    for i, reply in enumerate(replies):
        if not isinstance(reply, dict):
            raise DataError(f"{here}: field 'replies'[{i}] must be a message object, got {type(reply).__name__}")
    ranked = [r for r in replies if isinstance(r.get("rank"), int) and (include_synthetic or not r.get("synthetic"))]
    if role == "user" and len(ranked) >= 2:
        ranked.sort(key=lambda r: r["rank"])
        yield to_group({"prompt": path, "responses": [_field(r, "text", here, "an Open-Assistant reply", str)
                                                      for r in ranked],
                        "ranking": list(range(len(ranked)))}, here)
    for reply in replies:
        yield from _oasst_walk(reply, path, where, include_synthetic)


def import_label_studio(path: str | Path) -> Iterator[PreferenceGroup]:
    """A Label Studio JSON export, one group per completed annotation: K-way rankings of a List + Ranker
    project (as `llmstack annotate` sets up) or pairs of a Pairwise one (`llmstack.data.label_studio`), each
    with the annotator's id."""
    for where, record in label_studio.read_export(path):
        yield to_group(record, where)


IMPORTERS = {"auto": iter_groups, "hh": import_hh, "oasst": import_oasst, "label_studio": import_label_studio}


def load_groups(train: str, eval: str | None, format: str, eval_fraction: float,
                seed: int) -> tuple[list[PreferenceGroup], list[PreferenceGroup]]:
    """(training groups, held-out groups) read by the importer of `format`: `eval`'s when given, else a
    deterministic `eval_fraction` of `train` (`is_held_out`)."""
    read = IMPORTERS[format]
    groups = _some(read(train), train, format)
    if eval:
        return groups, _some(read(eval), eval, format)
    kept, held_out = [], []
    for index, group in enumerate(groups):
        (held_out if is_held_out(index, eval_fraction, seed) else kept).append(group)
    return kept, held_out


def _some(groups: Iterator[PreferenceGroup], spec: str, format: str) -> list[PreferenceGroup]:
    found = list(groups)
    if not found:
        raise DataError(f"{spec}: no usable preference records (data.format={format}); check that the file holds "
                        "records and that data.format names their format")
    return found


# ---------------------------------------------------------------------------------------------------------
# Tokenising


def response_ids(tokenizer, prompt: str | list[dict], response: str | list[dict]) -> list[int]:
    """The tokens of `response` after `prompt_ids(tokenizer, prompt)`, ending at the EOS where its score is read:
    text + EOS for a text prompt; for messages, the template's text after the prompt, cut after its last EOS (or
    with EOS appended when the template ends turns with another token)."""
    if isinstance(prompt, str):
        return plain_ids(tokenizer, with_eos(tokenizer, response))
    reply = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
    ids = plain_ids(tokenizer, continuation_text(tokenizer, prompt, reply))
    eos = tokenizer.eos_token_id
    return ids[:len(ids) - ids[::-1].index(eos)] if eos in ids else ids + [eos]


def render(tokenizer, prompt: str | list[dict] | None, response: str | list[dict]) -> list[int]:
    """Token ids of one response scored alone, as PPO builds a sample: `prompt_ids` then `response_ids`. With
    no prompt (an implicit one), the text + EOS as one sequence, which is what its row holds."""
    if prompt is None:
        return text_ids(tokenizer, with_eos(tokenizer, response))
    return prompt_ids(tokenizer, prompt) + response_ids(tokenizer, prompt, response)


WORD_CHARACTER = re.compile(r"\w")


def split_implicit(tokenizer, chosen: str, rejected: str) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, [chosen ids, rejected ids]) of two texts with an implicit prompt: the sequences TRL
    tokenises (each text + EOS) cut at their longest common token prefix, moved back until it ends on whole
    characters and not inside a word, where two tokenisations of different words can share a first piece."""
    first, second = (text_ids(tokenizer, with_eos(tokenizer, text)) for text in (chosen, rejected))
    n = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    texts = tokenizer.decode(first), tokenizer.decode(second)
    while n and not _ends_a_word(tokenizer.decode(first[:n]), texts):
        n -= 1
    return first[:n], [first[n:], second[n:]]


def _ends_a_word(head: str, texts: tuple[str, str]) -> bool:
    """True when both texts start with `head` and neither goes on with the word `head` ends in."""
    in_word = WORD_CHARACTER.match(head[-1:])
    return all(text.startswith(head) and not (in_word and WORD_CHARACTER.match(text[len(head):len(head) + 1]))
               for text in texts)


def encode_group(tokenizer, group: PreferenceGroup) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, [ids of each response]) of a group, each response as `render` builds it after the prompt."""
    if group.prompt is None:
        return split_implicit(tokenizer, *group.responses)
    return prompt_ids(tokenizer, group.prompt), [response_ids(tokenizer, group.prompt, r) for r in group.responses]


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
        prompt, responses = encode_group(tokenizer, group)
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
