"""Exports that serving engines load, and ``pg-tune export PATH --check serving``.

Every export (``pg-tune export``) gets, beside the weights and processor files, what engines such
as vLLM need to serve it behind an OpenAI chat endpoint (``write_serving_files``):

- ``chat_template.jinja`` when the family's processor has no chat template (PaliGemma: a template
  that passes the user's text through as the task prefix; without one, OpenAI chat requests fail:
  vllm#11471, #12052);
- ``generation_config.json`` whose ``eos_token_id`` holds the family's end tokens (Gemma 3 ends a
  turn with ``<end_of_turn>``, not ``<eos>``: an engine that stops only at ``<eos>`` runs on) and its
  pad token.

``check_serving`` reads a run folder, an adapter folder or an export and reports, per engine
(vLLM, SGLang, TGI), whether the adapter as trained and the merged export are within what that
engine documents for the family (``ModelFamily.serving_engines``, each fact with its source), and
the command that serves it. The adapter rules are vLLM's (``vllm/lora/peft_helper.py`` and its LoRA
docs): LoRA on language-model linear layers only (tower / connector LoRA is experimental and for
some Qwen VL models only), no ``modules_to_save`` (trained embeddings or head), no DoRA, rank at
most 512 (``--max-lora-rank``). SGLang's and TGI's LoRA docs name no vision-language model, so
their adapters are reported as not supported: merge first.

No engine runs on the machines pg_tune is tested on (no GPU): the verdicts come from the engines'
documented rules, not from serving anything.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pg_tune.models.family import ModelFamily

ENGINES = {"vllm": "vLLM", "sglang": "SGLang", "tgi": "TGI"}
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""vLLM's ``--max-lora-rank`` values (vllm/config/lora.py ``MaxLoRARanks``)."""
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def write_serving_files(out_dir: str | Path, family: ModelFamily, processor: Any) -> list[str]:
    """Write the chat template (when the family needs one) and the end tokens into
    ``generation_config.json`` of an export folder; returns the files written."""
    out_dir = Path(out_dir)
    written = []
    template = family.serving_chat_template(processor)
    if template is not None and not getattr(processor, "chat_template", None):
        (out_dir / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
        written.append(CHAT_TEMPLATE_FILE)
    path = out_dir / "generation_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    tokens = family.generation_kwargs(processor)
    config["eos_token_id"] = tokens["eos_token_id"]
    if tokens.get("pad_token_id") is not None:
        config["pad_token_id"] = tokens["pad_token_id"]
    bos = getattr(processor.tokenizer, "bos_token_id", None)
    if bos is not None:
        config.setdefault("bos_token_id", bos)
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    written.append(path.name)
    return written


# ---- --check serving -----------------------------------------------------------------------------


@dataclass
class AdapterFacts:
    """What an adapter trains, as an engine sees it."""

    path: Path
    rank: int
    use_dora: bool
    modules: dict[str, list[str]]
    """Adapted module paths by part: ``language_model``, ``vision``, ``projector``, ``other``."""
    saved_modules: list[str] = field(default_factory=list)
    """``modules_to_save``: whole modules trained and saved (embeddings, head, projector)."""


def adapter_facts(adapter_dir: Path, family: ModelFamily) -> AdapterFacts:
    """Read ``adapter_config.json`` and the adapter's tensor names (the header only)."""
    from safetensors import safe_open

    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())  # noqa: SIM118 (safe_open has no __iter__)
    modules: dict[str, list[str]] = {"language_model": [], "vision": [], "projector": [], "other": []}
    saved = set(config.get("modules_to_save") or [])
    for key in keys:
        name = key.removeprefix("base_model.model.")
        match = re.fullmatch(r"(.+)\.lora_(?:A|B)\.weight", name)
        if match is None:
            if ".lora_" not in name:  # a modules_to_save copy
                saved.add(name.rsplit(".", 1)[0])
            continue
        module = match.group(1)
        if module in modules["language_model"] + modules["vision"] + modules["projector"] + modules["other"]:
            continue
        modules[_part(module, family)].append(module)
    return AdapterFacts(
        adapter_dir, int(config.get("r", 0)), bool(config.get("use_dora")), modules, sorted(saved)
    )


def _part(module: str, family: ModelFamily) -> str:
    paths = family.modules
    if re.match(rf"{family.lm_layers}\.", module):
        return "language_model"
    if module.startswith(paths.vision + "."):
        return "vision"
    if module.startswith(paths.projector + ".") or module == paths.projector:
        return "projector"
    return "other"


@dataclass
class Verdict:
    engine: str
    adapter: tuple[bool, str] | None
    """Whether the adapter as trained is served, and why not / how; None for a full model."""
    export: tuple[bool, str]
    """Whether the merged export is served, and how."""
    source: str
    note: str = ""


def _vllm_adapter_problems(facts: AdapterFacts) -> list[str]:
    problems = []
    tower = len(facts.modules["vision"]) + len(facts.modules["projector"])
    if tower:
        problems.append(
            f"LoRA on the vision tower / projector ({tower} modules): vLLM adapts language-model layers only"
        )
    if facts.modules["other"]:
        problems.append(f"LoRA outside the language model's layers ({facts.modules['other'][0]}, ...)")
    if facts.saved_modules:
        problems.append(
            f"trained whole modules ({', '.join(facts.saved_modules)}): vLLM only supports modules_to_save being None"
        )
    if facts.use_dora:
        problems.append("DoRA: vLLM does not yet support DoRA")
    if facts.rank > VLLM_LORA_RANKS[-1]:
        problems.append(f"rank {facts.rank} > {VLLM_LORA_RANKS[-1]}, vLLM's largest --max-lora-rank")
    return problems


def _commands(
    engine: str, export: str, base: str | None, facts: AdapterFacts | None, name: str, family
) -> dict:
    template = family.serving_chat_template(None)  # the template an adapter's base lacks, if any
    chat_flag = f" --chat-template {shlex.quote(template)}" if template else ""
    if engine == "vllm":
        adapter = None
        if facts is not None and base is not None:
            rank = next((r for r in VLLM_LORA_RANKS if r >= facts.rank), VLLM_LORA_RANKS[-1])
            adapter = (
                f"vllm serve {base} --enable-lora --lora-modules {name}={facts.path} --max-lora-rank {rank}"
                + chat_flag
            )
        return {"export": f"vllm serve {export} --served-model-name {name}", "adapter": adapter}
    if engine == "sglang":
        return {"export": f"python3 -m sglang.launch_server --model-path {export}", "adapter": None}
    return {
        "export": f"docker run --gpus all -p 8080:80 -v {export}:/data "
        "ghcr.io/huggingface/text-generation-inference --model-id /data",
        "adapter": None,
    }


def check_serving(path: str | Path, family: ModelFamily, facts: AdapterFacts | None, base: str | None,
                  export_dir: Path | None, name: str) -> list[Verdict]:  # fmt: skip
    """Per engine, whether the adapter as trained (``facts``; None for a full model) and the merged
    export (``export_dir``, or the one ``pg-tune export`` would write) can be served, and how."""
    export = str(export_dir) if export_dir is not None else "EXPORT_DIR"
    verdicts = []
    for engine, label in ENGINES.items():
        support = family.serving_engines.get(engine)
        if support is None:
            verdicts.append(Verdict(label, None, (False, "not checked for this family"), ""))
            continue
        commands = _commands(engine, export, base, facts, name, family)
        if not support.serves:
            no = (False, f"{label} does not serve this architecture")
            verdicts.append(Verdict(label, no if facts is not None else None, no, support.source))
            continue
        how = commands["export"] + ("" if support.chat else "   (no OpenAI chat endpoint)")
        adapter = None
        if facts is not None:
            if not support.lora:
                adapter = (False, f"{label} documents no LoRA for this architecture: serve the merged export")
            else:
                problems = _vllm_adapter_problems(facts) if engine == "vllm" else []
                adapter = (
                    (False, "; ".join(problems) + ": merge first")
                    if problems
                    else (True, commands["adapter"])
                )
        verdicts.append(Verdict(label, adapter, (True, how), support.source, support.note))
    return verdicts


def export_problems(export_dir: Path, family: ModelFamily) -> list[str]:
    """What an export folder lacks for serving engines (empty when complete)."""
    problems = []
    for required in ("config.json", "generation_config.json", "tokenizer_config.json"):
        if not (export_dir / required).is_file():
            problems.append(f"{required} is missing")
    if not any(export_dir.glob("*.safetensors")):
        problems.append("no safetensors weights")
    if (
        not (export_dir / "preprocessor_config.json").is_file()
        and not (export_dir / "processor_config.json").is_file()
    ):
        problems.append("no processor / preprocessor config")
    needs_template = family.serving_chat_template(None) is not None
    if needs_template and not (export_dir / CHAT_TEMPLATE_FILE).is_file():
        problems.append(f"{CHAT_TEMPLATE_FILE} is missing (OpenAI chat requests will fail: vllm#11471)")
    generation = export_dir / "generation_config.json"
    if generation.is_file():
        ends = json.loads(generation.read_text(encoding="utf-8")).get("eos_token_id")
        if ends is None:
            problems.append("generation_config.json names no eos_token_id: generation will not stop")
    return problems


def serving_report(path: str | Path) -> str:
    """``pg-tune export PATH --check serving``: PATH is a run folder, an adapter folder or an export;
    the model family is resolved once here. Returns the report's text."""
    from pg_tune.models.family import load_family

    path = Path(path)
    facts, base, export_dir, problems = None, None, None, []
    if (path / "recipe.yaml").is_file() and ((path / "adapter").is_dir() or (path / "model").is_dir()):
        from pg_tune.export.run import read_run, run_family

        run = read_run(path)
        family = run_family(run)
        what = f"run {path} ({run.recipe.method})"
        if not run.is_full_model:
            facts, base = adapter_facts(run.adapter_dir, family), run.recipe.model.name_or_path
    elif (path / "adapter_config.json").is_file():
        from pg_tune.models.source import adapter_base

        family = load_family(str(path))
        facts, base, what = adapter_facts(path, family), adapter_base(path), f"adapter {path}"
    elif (path / "config.json").is_file():
        family = load_family(str(path))
        export_dir, what = path, f"model folder {path}"
        problems = export_problems(path, family)
    else:
        raise FileNotFoundError(f"{path}: not a run folder, an adapter folder or an exported model folder")
    name = path.resolve().name
    lines = [f"serving check: {what}, model family {family.name}"]
    if facts is not None:
        counts = ", ".join(
            f"{part.replace('_', ' ')} {len(mods)}" for part, mods in facts.modules.items() if mods
        )
        extra = f"; whole modules trained: {', '.join(facts.saved_modules)}" if facts.saved_modules else ""
        lines.append(
            f"  adapter: LoRA r={facts.rank}{' (DoRA)' if facts.use_dora else ''} on {counts}{extra}"
        )
    if export_dir is not None:
        lines.append("  export files: " + ("complete" if not problems else "; ".join(problems)))
    for v in check_serving(path, family, facts, base, export_dir, name):
        lines.append(f"  {v.engine}")
        if v.adapter is not None:
            lines.append(f"    adapter as trained: {'yes' if v.adapter[0] else 'no'}: {v.adapter[1]}")
        served, how = v.export
        if served and problems:
            served, how = False, "the export lacks files (above): export again with pg-tune export"
        lines.append(f"    merged export:      {'yes' if served else 'no'}: {how}")
        if v.note:
            lines.append(f"    note: {v.note}")
        if v.source:
            lines.append(f"    source: {v.source}")
    if export_dir is None:
        lines.append(f"  EXPORT_DIR: what `pg-tune export {path} --out EXPORT_DIR` writes (weights, processor, "
                     f"{CHAT_TEMPLATE_FILE} where needed, generation_config.json with the end tokens)")  # fmt: skip
    lines.append("  (from the engines' documentation; no engine was run here)")
    return "\n".join(lines)
