"""CURATION.md, written from curation.json alone, so the page never says more than the audit holds."""

from __future__ import annotations

EXPLANATION = """\
How to read the table: a document is *removed* by the first rule, in order, that would remove it.
*Would remove* counts every document the rule rejects when evaluated on all of them, whatever the earlier rules
decided; *only this rule* counts those no other rule rejects, i.e. what the output would gain back without the
rule. Rules that rewrite documents (lines dropped, masks, licence stripped) pass the rewritten text on, so
moving them changes what the later rules see. Dedup rules compare each document with the documents kept so
far. *Reached* counts documents not removed before the rule."""


def _n(value) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.3g}"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _cell(text: str, limit: int = 160) -> str:
    text = " / ".join(line.strip() for line in str(text).splitlines() if line.strip())
    text = text if len(text) <= limit else text[:limit - 1] + "\u2026"
    return text.replace("|", "\\|").replace("`", "'")


def _summary(audit: dict) -> list[str]:
    data, out, run = audit["input"], audit["output"], audit.get("run", {})
    units = f" -> {_n(data['passages'])} passages after `paragraphs`" if "passages" in data else ""
    blank = f" ({_n(data['blank_skipped'])} blank documents skipped)" if data.get("blank_skipped") else ""
    base = data.get("passages", data["documents"])
    lines = [f"Input `{audit.get('spec', '?')}`: {_n(data['documents'])} documents, {data['bytes'] / 1e6:.2f} MB, "
             f"{_n(data['words'])} words{units}{blank}.",
             f"Kept {_n(out['documents'])} documents ({_pct(out['documents'], base)}) and {_n(out['words'])} words "
             f"({_pct(out['words'], data['words'])} of the input's words). {audit['tokens'].capitalize()} are "
             "counted as tokens."]
    if run:
        rate = f"{run['documents_per_s']:,.3g} input documents/s"
        rate += f", {run['passages_per_s']:,.3g} passages/s" if "passages_per_s" in run else ""
        lines.append(f"Wall time {run['wall_time_s']:.1f} s with {run['workers']} worker(s): {rate}, "
                     f"{run['mb_per_s']:.3g} MB/s.")
    for name, size in audit.get("dedup_index", {}).items():
        lines.append(f"The `{name}` index holds {_n(size)} kept documents.")
    return lines


def _table(rules: list[dict]) -> list[str]:
    rows = ["| # | rule | kind | reached | removed | removed words | changed | words cut | would remove | "
            "only this rule |", "|---|---|---|---|---|---|---|---|---|---|"]
    for i, rule in enumerate(rules, 1):
        removed, changed, flagged, only = rule["removed"], rule["changed"], rule["flagged"], rule["only"]
        rows.append(f"| {i} | `{rule['name']}` | {rule['kind']} | {_n(rule['reached'])} | "
                    f"{_n(removed['documents'])} ({_pct(removed['documents'], rule['reached'])}) | "
                    f"{_n(removed['words'])} | {_n(changed['documents'])} | {_n(changed['words_removed'])} | "
                    f"{_n(flagged['documents'])} | {_n(only['documents'])} ({_n(only['words'])} words) |")
    return rows


def _rule_section(i: int, rule: dict) -> list[str]:
    params = ", ".join(f"`{k}={v!r}`" for k, v in rule["params"].items()) or "none"
    lines = [f"### {i}. `{rule['name']}` ({rule['kind']})", "", f"Parameters: {params}.", ""]
    if rule["kind"] == "split":
        lines += [f"{_n(rule['reached'])} documents became {_n(rule['passages'])} passages; the rules after "
                  "this one count passages.", ""]
    if rule["reasons"]:
        lines += ["| removed because | documents |", "|---|---|"]
        lines += [f"| {_cell(reason)} | {_n(n)} |" for reason, n in rule["reasons"].items()] + [""]
    if rule["counts"]:
        lines += ["| in the documents it changed | count |", "|---|---|"]
        lines += [f"| {_cell(key)} | {_n(n)} |" for key, n in rule["counts"].items()] + [""]
    if rule.get("by_word"):
        lines += ["| matched word | documents removed |", "|---|---|"]
        lines += [f"| {_cell(word)} | {_n(n)} |" for word, n in rule["by_word"].items()] + [""]
    if rule["samples"]:
        lines += [f"Sample of removed documents ({len(rule['samples'])} of {_n(rule['removed']['documents'])}):", ""]
        for s in rule["samples"]:
            lines.append(f"- `{_cell(s['id'], 80)}`: **{_cell(s['reason'])}** {_cell(s['evidence'])}")
            lines.append(f"  > {_cell(s['text'], 240)}")
        lines.append("")
    if rule["change_samples"]:
        lines += ["Sample of changes:", ""]
        lines += [f"- `{_cell(s['id'], 80)}`: **{_cell(s['reason'])}** {_cell(s['evidence'])}"
                  for s in rule["change_samples"]] + [""]
    return lines


def render(audit: dict) -> str:
    lines = ["# Curation audit", "", *_summary(audit), "", "## Rules in order", "", *_table(audit["rules"]), "",
             EXPLANATION, "", "## Each rule", ""]
    for i, rule in enumerate(audit["rules"], 1):
        lines += _rule_section(i, rule)
    return "\n".join(lines).rstrip() + "\n"
