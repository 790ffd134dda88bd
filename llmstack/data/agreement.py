"""How much the people who judged the data agree: per-annotator counts, pairwise agreement, agreement with
the majority of the others, and Krippendorff's alpha.

Every ranking is broken into pairwise judgements. A unit is (prompt, the two responses); its value is which
of the two was preferred, or a tie. Agreement is computed over units judged by more than one person.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict

from llmstack.data.preference import PreferenceGroup


def pairwise_judgements(groups: list[PreferenceGroup]) -> dict:
    """{unit: {annotator: value}} with value +1 (first response of the unit preferred), -1, or 0 (tie)."""
    units: dict = defaultdict(dict)
    for group in groups:
        if group.annotator is None:
            continue
        prompt = repr(group.prompt)
        for i, j in itertools.combinations(range(len(group.responses)), 2):
            # responses may be message lists: their repr is hashable and orders them
            a, b = sorted([(repr(group.responses[i]), group.ranks[i]), (repr(group.responses[j]), group.ranks[j])])
            value = 0 if a[1] == b[1] else (1 if a[1] < b[1] else -1)
            units[(prompt, a[0], b[0])][str(group.annotator)] = value
    return units


def krippendorff_alpha_nominal(units: dict) -> float | None:
    """1 - D_o / D_e from the coincidence matrix of values over units with two or more judgements
    (Krippendorff 2011, "Computing Krippendorff's alpha-reliability"). None when undefined."""
    coincidence: Counter = Counter()
    for judged in units.values():
        values = list(judged.values())
        m = len(values)
        if m < 2:
            continue
        for x, y in itertools.permutations(range(m), 2):
            coincidence[(values[x], values[y])] += 1 / (m - 1)
    total = sum(coincidence.values())
    if total == 0:
        return None
    marginal: Counter = Counter()
    for (c, _), weight in coincidence.items():
        marginal[c] += weight
    observed = sum(w for (c, k), w in coincidence.items() if c != k) / total
    expected = sum(marginal[c] * marginal[k] for c in marginal for k in marginal if c != k) / (total * (total - 1))
    return None if expected == 0 else 1 - observed / expected


def _ties(groups: list[PreferenceGroup]) -> dict:
    pairs = [(g.ranks[i], g.ranks[j]) for g in groups for i, j in itertools.combinations(range(len(g.ranks)), 2)]
    return {"rankings_with_ties": sum(len(set(g.ranks)) < len(g.ranks) for g in groups),
            "pairwise_judgements": len(pairs), "tied_pairs": sum(a == b for a, b in pairs)}


def annotator_statistics(groups: list[PreferenceGroup]) -> dict:
    """What the card reports of the people behind the data: counts (rankings; ranked tasks, a task being one
    prompt with its responses however many people ranked it; their responses; distinct prompt texts; rankings
    with no annotator id), ties, each annotator's rankings, pairwise agreement between annotators,
    each one's agreement with the majority of the others, and Krippendorff's alpha."""
    units = pairwise_judgements(groups)
    tasks = {(repr(g.prompt), tuple(sorted(map(repr, g.responses)))) for g in groups}
    counts = Counter(str(g.annotator) for g in groups if g.annotator is not None)
    pair_agree: dict = defaultdict(lambda: [0, 0])
    majority: dict = defaultdict(lambda: [0, 0])
    for judged in units.values():
        for a, b in itertools.combinations(sorted(judged), 2):
            pair_agree[(a, b)][0] += judged[a] == judged[b]
            pair_agree[(a, b)][1] += 1
        for person, value in judged.items():
            others = Counter(v for p, v in judged.items() if p != person).most_common()
            if others and (len(others) == 1 or others[0][1] > others[1][1]):
                majority[person][0] += value == others[0][0]
                majority[person][1] += 1
    return {
        "rankings": len(groups), "tasks": len(tasks), "responses": sum(len(t[1]) for t in tasks),
        "prompts": len({repr(g.prompt) for g in groups}),
        "unattributed_rankings": sum(g.annotator is None for g in groups), **_ties(groups),
        "annotators": dict(sorted(counts.items())),
        "units_with_several_judgements": sum(len(j) >= 2 for j in units.values()),
        "pairwise_agreement": {f"{a}|{b}": round(n / total, 4) for (a, b), (n, total) in sorted(pair_agree.items())},
        "agreement_with_majority": {p: round(n / total, 4) for p, (n, total) in sorted(majority.items())},
        "krippendorff_alpha": krippendorff_alpha_nominal(units),
    }


def format_table(stats: dict) -> str:
    lines = [f"{'annotator':>12} {'rankings':>9} {'agrees with majority':>21}"]
    for person, count in stats["annotators"].items():
        agree = stats["agreement_with_majority"].get(person)
        lines.append(f"{person:>12} {count:>9} {'-' if agree is None else f'{agree:.1%}':>21}")
    alpha = stats["krippendorff_alpha"]
    lines.append(f"Krippendorff's alpha (nominal, pairwise judgements): {'n/a' if alpha is None else f'{alpha:.3f}'}")
    return "\n".join(lines)
