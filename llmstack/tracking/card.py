"""The model card: MODEL_CARD.md in the run directory and the same text as `model/README.md` under a Hugging
Face metadata header, so `model/` uploads as a complete Hub repository.

The card is generated from the run's record and the records of the runs in its lineage graph, so it never
claims more than the records hold. It names the people and decisions behind the model where the records
know them: the lineage back to the raw text (every parent, the reward model included), the curation's
removals per rule, the human judgements the reward model (or DPO) learned from, the KL budget an RL policy
spent, and the time and energy of the whole chain. Paths are shown relative to the pipeline directory (the
folder holding the run); absolute paths stay in record.json's host section.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from llmstack.tracking.energy import amount, energy_joules
from llmstack.tracking.lineage import Node, chain_totals, describe_energy, draw, load_graph, shown_path

RL_STAGES = ("ppo", "grpo", "rloo", "reinforce_pp")  # the RL stage records its estimator's name (gae: ppo)
SYNTHETIC = "llmstack.data.synthetic"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def _data_lines(record: dict, base: Path) -> list[str]:
    inputs = {k: v for k, v in (record.get("inputs") or {}).items() if not (isinstance(v, dict) and "run_dir" in v)}
    lines = ["## Training data", ""]
    lines += ["| input | source | files and sha256 |", "|---|---|---|"] if inputs else ["No inputs were recorded."]
    for role, source in inputs.items():
        source = source if isinstance(source, dict) else {"spec": source}
        files = source.get("files")
        detail = "<br>".join(f"`{shown_path(f['path'], base)}` ({_fmt(f.get('bytes', '?'))} bytes) `{f['sha256']}`"
                             for f in files) if files else \
            ", ".join(f"{k}={shown_path(v, base)}" for k, v in source.items() if k != "spec") or "-"
        lines.append(f"| {role} | `{shown_path(source.get('spec'), base)}` | {detail} |")
    facts = record.get("data")
    return lines + ["", *_bullets(facts, base)] if facts else lines


def _bullets(facts: dict, base: Path, depth: int = 0) -> list[str]:
    lines = []
    for key, value in facts.items():
        nested = isinstance(value, dict) and bool(value)
        lines.append(f"{'  ' * depth}- {key}" + ("" if nested else f": {_fmt(shown_path(value, base))}"))
        lines += _bullets(value, base, depth + 1) if nested else []
    return lines


SETUP_KEYS = ("seed", "model.name_or_path", "model.preset", "reward_model.name_or_path", "data.block_size",
              "data.max_length", "train.max_steps", "train.batch_size", "train.grad_accum", "train.lr",
              "train.schedule", "train.warmup_steps", "train.weight_decay", "train.max_grad_norm", "train.precision",
              "lora.enabled", "value_lora.enabled")


def _get(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _setup_lines(config: dict, base: Path) -> list[str]:
    rows = [f"| `{key}` | {_fmt(shown_path(_get(config, key), base))} |" for key in SETUP_KEYS
            if _get(config, key) is not None]
    return ["## Training set-up", "", "| key | value |", "|---|---|", *rows, "",
            "The full resolved configuration is in `config.yaml` and in `record.json`."]


def _results_lines(metrics: dict) -> list[str]:
    # the stages record held-out metrics as initial_<name> (before training) and final_<name> (after)
    paired = [k.removeprefix("final_") for k in metrics if k.startswith("final_") and f"initial_{k[6:]}" in metrics]
    lines = ["## Results", ""]
    if paired:
        lines += ["| held-out metric | before training | after training |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(metrics[f'initial_{k}'])} | {_fmt(metrics[f'final_{k}'])} |" for k in paired]
        lines.append("")
    shown = {f"{when}_{k}" for k in paired for when in ("initial", "final")}
    rest = {k: v for k, v in metrics.items() if k not in shown}
    if rest:
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in rest.items())]
    return lines if len(lines) > 2 else lines + ["No metrics were recorded."]


def _who(record: dict) -> str:
    """Recruitment, pay and instructions of the annotators: only what the data says (its annotation.json,
    `llmstack.data.label_studio.annotation_facts`)."""
    people = record.get("annotation") or {}
    inputs = (record.get("inputs") or {}).values()
    generated = any(isinstance(s, dict) and s.get("generator") == SYNTHETIC for s in inputs)
    if generated:
        return (f"The annotators are simulated ({SYNTHETIC}): they rank by the built-in task's rubric, each with "
                "their own chance of swapping neighbours; no people were recruited or paid.")
    facts = [f"{what}: {people.get(what, 'not recorded in the data')}" for what in ("recruitment", "pay",
                                                                                    "instructions")]
    return "Of the people who judged: " + "; ".join(facts) + "."


def judgement_lines(stats: dict, record: dict) -> list[str]:
    """The 'Human judgements' section for annotator statistics (`llmstack.data.agreement`)."""
    rankings = stats.get("rankings") or sum(stats.get("annotators", {}).values())
    lines = [f"{_fmt(rankings)} rankings of {_fmt(stats.get('tasks', '?'))} ranked prompts, each shown with its own "
             f"answers ({_fmt(stats.get('responses', '?'))} responses in all, {_fmt(stats.get('prompts', '?'))} "
             f"distinct prompt texts); {_fmt(stats.get('rankings_with_ties', '?'))} rankings hold a tie "
             f"({_fmt(stats.get('tied_pairs', '?'))} of "
             f"{_fmt(stats.get('pairwise_judgements', '?'))} pairwise judgements are ties)."
             + (f" {stats['unattributed_rankings']:,} rankings carry no annotator id."
                if stats.get("unattributed_rankings") else ""), ""]
    annotators = stats.get("annotators") or {}
    if annotators:
        majority = stats.get("agreement_with_majority", {})
        lines += ["| annotator | rankings | share | agrees with the majority of the others |", "|---|---|---|---|"]
        lines += [f"| {who} | {n:,} | {n / rankings:.1%} | "
                  f"{'-' if majority.get(who) is None else f'{majority[who]:.1%}'} |" for who, n in annotators.items()]
        pairs = stats.get("pairwise_agreement") or {}
        if pairs:
            lines += ["", "Pairwise agreement (share of the pairs both judged that they ordered alike): "
                      + ", ".join(f"{pair.replace('|', ' & ')} {v:.1%}" for pair, v in pairs.items()) + "."]
        alpha = stats.get("krippendorff_alpha")
        lines += ["", f"Krippendorff's alpha (nominal, over the "
                  f"{_fmt(stats.get('units_with_several_judgements', '?'))} pairs judged by several annotators): "
                  + ("undefined" if alpha is None else f"{alpha:.3f}") + "."]
    else:
        lines.append("The data carries no annotator ids, so agreement between annotators cannot be computed.")
    return lines + ["", _who(record)]


def _summary_of_judgements(node: Node, base: Path) -> str:
    stats = node.record.get("annotators") or {}
    annotators = stats.get("annotators") or {}
    rankings = stats.get("rankings") or sum(annotators.values()) or 0
    alpha = stats.get("krippendorff_alpha")
    shares = ", ".join(f"{who} {n / rankings:.0%}" for who, n in annotators.items()) if rankings else ""
    majority = stats.get("agreement_with_majority") or {}
    agree = ", ".join(f"{who} {v:.0%}" for who, v in majority.items())
    return (f"{_fmt(rankings)} rankings of {_fmt(stats.get('tasks', '?'))} ranked prompts "
            f"({_fmt(stats.get('responses', '?'))} responses) by {len(annotators)} annotators "
            f"({shares or 'no ids'}); agreement with the majority {agree or 'n/a'}; "
            f"Krippendorff's alpha {'undefined' if alpha is None else f'{alpha:.3f}'}; "
            f"{_fmt(stats.get('rankings_with_ties', '?'))} rankings with ties. {_who(node.record)} "
            f"Details: the card of `{shown_path(str(node.dir), base)}`.")


def _reward_model_lines(record: dict, graph: dict, base: Path) -> list[str]:
    """What an RL policy was optimised against, and how far it moved from its reference."""
    root = next(iter(graph))
    lines = ["## Optimised against", ""]
    for role, key in graph[root].parents:
        node = graph[key]
        if role == "reward_model" and node.record is not None:
            lines += [f"Reward model `{shown_path(str(key), base)}` (a {node.record.get('stage')} run, record sha256 "
                      f"{node.link.get('record_sha256', '?')[:12]}), trained on rankings: "
                      + _summary_of_judgements(node, base), ""]
    for role, name in graph[root].outside:
        if role == "reward_model":
            lines += [f"Reward model `{name}` from outside llmstack: its data and annotators are not recorded.", ""]
    sources = record.get("reward_sources") or []
    if sources:
        lines += ["Reward sources and weights: " + ", ".join(f"{s['name']} x {_fmt(s['weight'])}" for s in sources)
                  + ".", ""]
    lines += [_kl_budget(record)]
    return lines


def _kl_budget(record: dict) -> str:
    metrics, ppo = record.get("metrics", {}), _get(record.get("config", {}), "ppo") or {}
    kl = metrics.get("final_kl")
    if kl is None:
        return "The KL to the reference was not recorded."
    target = ppo.get("kl_target")
    budget = (f" against an adaptive target of {_fmt(target)} nats ({kl / target:.0%} of it)" if target else
              f" with a fixed coefficient of {_fmt(ppo.get('kl_coef'))}")
    coef = metrics.get("final_kl_coef")
    return (f"KL budget: the last rollouts' answers sit {kl:.3g} nats (mean over answers of log pi - log ref) from "
            f"the reference, the model this run started from,{budget}"
            + (f"; final KL coefficient {_fmt(coef)}." if coef is not None else "."))


def _curation_lines(graph: dict, base: Path) -> list[str]:
    lines = []
    for node in graph.values():
        data = (node.record or {}).get("data") or {}
        if (node.record or {}).get("stage") == "curate" and "removed_by_rule" in data:
            removed = ", ".join(f"{rule} {n:,}" for rule, n in data["removed_by_rule"].items())
            lines += [f"Curation run `{shown_path(str(node.dir), base)}` kept {_fmt(data.get('documents_out'))} of "
                      f"{_fmt(data.get('documents_in'))} documents; removed per rule (the first rule, in order, "
                      f"that removed each): {removed}. Reasons and samples: its CURATION.md."]
    return ["## Data decisions along the lineage", "", *lines] if lines else []


def _devices(record: dict) -> str:
    host, compute = record.get("host", {}), record.get("compute", {})
    cpu = f"CPU {host.get('cpu_model', 'unknown')} ({host.get('cpus', '?')} logical cores)"
    gpus = host.get("accelerators") or []
    counted = {name: gpus.count(name) for name in dict.fromkeys(gpus)}
    accel = "; " + ", ".join(f"{n} x {name}" for name, n in counted.items()) if gpus else "; no GPU"
    device = compute.get("device")
    peaks = [f"{compute[key]:,.0f} MiB {what}" for key, what in (("peak_cuda_allocated_mib", "of device tensors"),
                                                                ("peak_rss_mib", "resident (main process)"))
             if key in compute]
    return (f"{compute.get('world_size', 1)} process(es)" + (f" on `{device}`" if device else "") + f"; {cpu}{accel}"
            + (f"; peak memory {', '.join(peaks)}" if peaks else ""))


def _energy_text(energy: dict | None) -> str:
    joules, method = energy_joules(energy)
    if joules is None:
        return f"Energy was not measured: {(energy or {}).get('unmeasured', 'no figure recorded')}."
    details = [energy.get("source", "?")]
    details += [f"{energy['cores']} cores" if "cores" in energy else "",
                f"{energy['watts']:g} W" if "watts" in energy else "",
                energy.get("why", ""), energy.get("note", "")]
    return f"Energy: {amount(joules)}, {method} ({'; '.join(d for d in details if d)})."


def _compute_lines(record: dict, graph: dict) -> list[str]:
    sessions, tokens = len(record.get("sessions", [])), record.get("metrics", {}).get("tokens_seen")
    line = f"{_devices(record)}; wall time {_duration(record.get('wall_time_s', 0.0))}"
    line += f" over {sessions} sessions (resumed)" if sessions > 1 else ""
    line += f", {_fmt(tokens)} training tokens." if tokens is not None else "."
    lines = ["## Compute and energy", "", f"{line} {_energy_text(record.get('energy'))}"]
    if len(graph) > 1:
        totals = chain_totals(graph)
        lines += ["", f"The whole chain ({totals['runs']} runs in the lineage above, this one included, each counted "
                  f"once): wall time {_duration(totals['wall_time_s'])}; energy {describe_energy(totals)}"]
    return lines


def card_text(run_dir: str | Path, record: dict) -> str:
    run_dir = Path(run_dir).resolve()
    base = run_dir.parent
    graph = load_graph(run_dir, record)
    code, model = record.get("code", {}), record.get("model", {})
    stage = record.get("stage", "?")
    commit = f" (commit `{code['git_commit'][:12]}`{', modified' if code.get('git_dirty') else ''})" \
        if "git_commit" in code else ""
    lines = [f"# {run_dir.name}: {stage} model", "",
             f"Trained by llmstack {code.get('llmstack', '?')}{commit}, stage `{stage}`. "
             f"Status **{record.get('status', '?')}**, ended {record.get('ended', '?')}.", ""]
    if model:
        trainable = model.get("trainable_parameters")
        lines += [f"Architecture `{model.get('class', '?')}` with {model.get('parameters', 0) / 1e6:.2f}M parameters"
                  + (f" ({trainable / 1e6:.2f}M trained)." if trainable is not None else "."), ""]
    tree = draw(graph, base)
    lines += ["## Lineage", "", "Every run this model was built from, each with its record's sha256; paths are "
              "relative to the folder holding this run." if len(tree) > 1 else
              "Trained from freshly initialised weights on the data below.", "", "```text", *tree, "```", ""]
    lines += [*_data_lines(record, base), ""]
    if record.get("annotators"):
        lines += ["## Human judgements", "", *judgement_lines(record["annotators"], record), ""]
    if stage in RL_STAGES:
        lines += [*_reward_model_lines(record, graph, base), ""]
    if stage == "dpo":
        kl = record.get("metrics", {}).get("final_eval_kl")
        lines += [f"KL budget: answers to held-out prompts sit {kl:.3g} nats (mean over answers of log pi - log ref) "
                  f"from the reference, the model this run started from (beta "
                  f"{_fmt(_get(record.get('config', {}), 'dpo.beta'))})." if kl is not None else
                  "The KL to the reference was not measured (dpo.kl_prompts=0).", ""]
    curation = _curation_lines(graph, base)
    lines += [*curation, ""] if curation else []
    lines += [*_setup_lines(record.get("config", {}), base), "", *_results_lines(record.get("metrics", {})), ""]
    lines += [*_compute_lines(record, graph), "", "## Limitations", "",
              "This model was trained by llmstack on the data listed above only, and reproduces that data's content, "
              "gaps and biases. It has not been evaluated for safety, factuality or fitness for any particular use; "
              "the results above are the only evaluation it has had."]
    return "\n".join(lines) + "\n"


STAGE_TAGS = {"reward": ["reward-model", "rlhf"], "dpo": ["dpo", "rlhf"], **{s: [s, "rlhf"] for s in RL_STAGES}}


def _hub_name(name: str) -> bool:
    """A Hub repository id ("org/name"), not a local directory."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def hub_metadata(record: dict, graph: dict) -> dict:
    """The Hugging Face card header: what the Hub indexes a repository by. Only what the records know: a
    license only when recorded, `base_model` only for a Hub model at the root of the lineage, `datasets` only
    for Hub datasets the lineage read."""
    stage = record.get("stage", "")
    meta: dict = {}
    if record.get("license"):
        meta["license"] = record["license"]
    bases = [name for node in graph.values() for role, name in node.outside
             if role in ("model", "backbone") and _hub_name(name)]
    if bases:
        meta["base_model"] = bases[0] if len(bases) == 1 else bases
    meta["library_name"] = "transformers"
    meta["tags"] = ["llmstack", *STAGE_TAGS.get(stage, [stage] if stage else [])]
    datasets = [source["dataset"] for node in graph.values()
                for source in ((node.record or {}).get("inputs") or {}).values()
                if isinstance(source, dict) and source.get("dataset")]
    if datasets:
        meta["datasets"] = list(dict.fromkeys(datasets))
    # a reward model is a one-label sequence classifier: the Hub's widget for it is text classification
    meta["pipeline_tag"] = "text-classification" if stage == "reward" else "text-generation"
    return meta


def write_model_card(run_dir: str | Path, record: dict) -> None:
    """Write MODEL_CARD.md (main process only) from `record`, the content of record.json, and the records of
    its lineage; when the run saved `model/`, the same card goes into `model/README.md` under the Hugging Face
    metadata header, so `huggingface-cli upload ORG/NAME RUN_DIR/model` publishes a complete repository."""
    run_dir = Path(run_dir)
    text = card_text(run_dir, record)
    (run_dir / "MODEL_CARD.md").write_text(text)
    if (run_dir / "model").is_dir():
        header = yaml.safe_dump(hub_metadata(record, load_graph(run_dir, record)), sort_keys=False)
        (run_dir / "model" / "README.md").write_text(f"---\n{header}---\n\n{text}")
