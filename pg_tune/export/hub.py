"""Pushing a run to the Hugging Face Hub: the adapter (default) or merged weights, in one commit.

Run it with ``pg-tune push RUN_DIR --repo-id OWNER/NAME [--merged] [--public] [--revision R]
[--dry-run]``, or from training with a recipe's ``hub:`` section (``push_from_training``).

Private by default, everywhere: a new repo is created private unless ``--public`` (or the recipe's
``hub.private: false``) says otherwise, and a push meant to be private into an existing PUBLIC repo
is refused (``create_repo(exist_ok=True)`` never changes an existing repo's visibility).

Everything goes through huggingface_hub's ``HfApi``: ``create_repo(exist_ok=True)``, then
``create_branch`` for a revision other than ``main``, then ONE ``create_commit`` carrying every file,
so a repo never shows half a model. The token is whatever huggingface_hub finds (``HF_TOKEN``, then
the file written by ``hf auth login``); pg_tune never reads it into a variable it prints, logs or
writes, and refuses to upload a text file that contains it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, get_token

from pg_tune.config.recipe import Recipe, check_repo_id, check_revision
from pg_tune.export.merged import export_run
from pg_tune.export.model_card import build_model_card
from pg_tune.export.run import REPORT_NAME, Run, read_run, run_family
from pg_tune.models.family import is_tiny_preset
from pg_tune.train.lock import hold

# Written beside the weights so the repo records how they were made.
RUN_RECORDS = ("summary.json", "metrics.jsonl")
CHECKPOINT_SKIP = {"optim.pt"}
"""Optimizer state is large and only useful for resuming on the machine that trained."""
_TEXT_SUFFIXES = {".json", ".jsonl", ".yaml", ".yml", ".md", ".txt", ".model", ""}


class PublicRepoError(RuntimeError):
    """A private push aimed at a repo that already exists and is public."""


@dataclass(frozen=True)
class UploadItem:
    """One file of the commit: where it goes in the repo and where its bytes come from (``None``:
    a file the merged export would write, listed by a dry run that does not run the export)."""

    path_in_repo: str
    source: Path | bytes | None

    @property
    def size(self) -> int:
        if self.source is None:
            return 0
        return len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size

    def describe(self) -> str:
        if self.source is None:
            return f"{self.path_in_repo:<40} {'?':>14} bytes  (written by the export; not run in a dry run)"
        origin = "generated" if isinstance(self.source, bytes) else str(self.source)
        return f"{self.path_in_repo:<40} {self.size:>14,} bytes  ({origin})"


def _folder_items(
    folder: Path, prefix: str = "", skip: set[str] | frozenset[str] = frozenset()
) -> list[UploadItem]:
    return [
        UploadItem(prefix + p.relative_to(folder).as_posix(), p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip
    ]


def merged_dir_of(run_dir: Path, dtype: str) -> Path:
    """Where ``--merged`` keeps its export inside the run folder (reused when complete)."""
    return run_dir / f"merged-{dtype}"


def published_base(run: Run, base_model: str | None = None) -> str:
    """The base as an upload names it: ``--base-model`` (``hub.base_model``) when given; a hub id or
    a built-in tiny preset as it is; a local folder by its folder name only (its path on this
    machine is never published)."""
    name = run.recipe.model.name_or_path
    if base_model:
        return base_model
    if is_tiny_preset(name) or (not Path(name).exists() and name.count("/") == 1):
        return name
    return Path(name).expanduser().resolve().name


def _public_run(run: Run, base: str) -> Run:
    """``run`` as the upload describes it: ``model.name_or_path`` is the published base."""
    resolved = copy.deepcopy(run.resolved)
    resolved.setdefault("model", {})["name_or_path"] = base
    model = dataclasses.replace(run.recipe.model, name_or_path=base)
    return dataclasses.replace(run, resolved=resolved, recipe=dataclasses.replace(run.recipe, model=model))


def _published(item: UploadItem, run: Run, base: str) -> UploadItem:
    """The files that name the base (the run's ``recipe.yaml``, peft's ``adapter_config.json``),
    rewritten to name ``base``; ``summary.json`` with the best checkpoint relative to the run."""
    if not isinstance(item.source, Path):
        return item
    name = Path(item.path_in_repo).name
    if name == "recipe.yaml":
        data = yaml.safe_load(item.source.read_text(encoding="utf-8")) or {}
        data.setdefault("model", {})["name_or_path"] = base
        return UploadItem(item.path_in_repo, yaml.safe_dump(data, sort_keys=False).encode())
    if name == "adapter_config.json":
        data = json.loads(item.source.read_text(encoding="utf-8"))
        data["base_model_name_or_path"] = base
        return UploadItem(item.path_in_repo, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    if name == "summary.json" and item.source.parent == run.run_dir:
        data = json.loads(item.source.read_text(encoding="utf-8"))
        if best := data.get("best_checkpoint"):
            roots = [root for root in (run.run_dir, run.run_dir.resolve()) if Path(best).is_relative_to(root)]
            data["best_checkpoint"] = (
                Path(best).relative_to(roots[0]).as_posix() if roots else Path(best).name
            )
        return UploadItem(item.path_in_repo, json.dumps(data, indent=2).encode())
    return item


def _planned_export(run: Run, family) -> list[UploadItem]:
    """The files ``--merged`` would export, named without running the export (a dry run)."""
    from pg_tune.export.stream import checkpoint_files

    if run.is_full_model:
        names = [p.name for p in sorted(run.adapter_dir.iterdir()) if p.is_file() and p.name != "README.md"]
    else:
        base = Path(run.recipe.model.name_or_path)
        if base.is_dir():
            shards = checkpoint_files(base)
            names = [*shards, *(["model.safetensors.index.json"] if len(shards) > 1 else [])]
            names += ["config.json"] + (
                ["generation_config.json"] if (base / "generation_config.json").is_file() else []
            )
        else:
            names = [
                "model*.safetensors (the base's shards, merged)",
                "config.json",
                "generation_config.json",
            ]
        names += [
            p.name
            for p in sorted(run.adapter_dir.iterdir())
            if p.is_file()
            and not p.name.startswith("adapter_")
            and p.name not in ("README.md", "recipe.yaml")
        ]
    return [UploadItem(name, None) for name in [*names, REPORT_NAME]]


def upload_plan(
    run_dir: str | Path,
    repo_id: str,
    merged: bool = False,
    dtype: str = "bf16",
    base_model: str | None = None,
    tags: list[str] | None = None,
    datasets: list[str] | None = None,
    trust_remote_code: bool = False,
    dry_run: bool = False,
) -> list[UploadItem]:
    """Exactly the files one push uploads. ``merged`` exports first if no complete export exists
    (a ``dry_run`` lists what that export would write instead of running it)."""
    run = read_run(run_dir)
    run.recipe.model.trust_remote_code = trust_remote_code  # the --trust-remote-code flag only
    family = run_family(run)
    report = None
    if merged:
        folder = merged_dir_of(run.run_dir, dtype)
        if (folder / REPORT_NAME).is_file():
            report = json.loads((folder / REPORT_NAME).read_text(encoding="utf-8"))
            items = _folder_items(folder, skip={"README.md"})
        elif dry_run:
            items = _planned_export(run, family)
        else:
            # The export writes into the run folder: one writer at a time (pg_tune.train.lock).
            with hold(run.run_dir, "pg-tune push --merged", what="run folder"):
                report = export_run(run, family, folder, dtype=dtype)
            items = _folder_items(folder, skip={"README.md"})
    else:
        # peft writes its own template README.md into the adapter folder; ours replaces it. A full
        # or partial run's folder is a complete model already (run.adapter_dir is RUN/model).
        items = _folder_items(run.adapter_dir, skip={"README.md"})
    items += [UploadItem(name, run.run_dir / name) for name in RUN_RECORDS if (run.run_dir / name).is_file()]
    base = published_base(run, base_model)
    items = [_published(item, run, base) for item in items]
    run = _public_run(run, base)
    card = build_model_card(
        run,
        family,
        kind="merged" if merged or run.is_full_model else "adapter",
        export_report=report,
        repo_id=repo_id,
        base_model=base_model,
        tags=tags,
        datasets=datasets,
    )
    items.append(UploadItem("README.md", card.encode("utf-8")))
    return items


def _refuse_token_in_files(items: list[UploadItem]) -> None:
    token = get_token()
    if not token:
        return
    needle = token.encode()
    for item in items:
        suffix = Path(item.path_in_repo).suffix
        if suffix not in _TEXT_SUFFIXES or item.size > 64 * 2**20:
            continue
        data = item.source if isinstance(item.source, bytes) else item.source.read_bytes()
        if needle in data:
            raise RuntimeError(
                f"{item.path_in_repo}: contains your Hugging Face token; refusing to upload it"
            )


def upload(
    items: list[UploadItem],
    repo_id: str,
    private: bool = True,
    revision: str | None = None,
    commit_message: str = "Upload with pg_tune",
    endpoint: str | None = None,
) -> CommitInfo:
    """Create the repo (and branch) if needed and upload ``items`` in one commit."""
    _refuse_token_in_files(items)
    api = HfApi(endpoint=endpoint)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if private and not api.repo_info(repo_id, repo_type="model").private:
        raise PublicRepoError(
            f"{repo_id} already exists and is PUBLIC; this push is private, so nothing was uploaded. "
            "Pass --public (hub.private: false) to add to the public repo, or choose a new --repo-id"
        )
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    operations = [
        CommitOperationAdd(
            path_in_repo=item.path_in_repo,
            path_or_fileobj=item.source if isinstance(item.source, bytes) else str(item.source),
        )
        for item in items
    ]
    return api.create_commit(
        repo_id, operations, commit_message=commit_message, repo_type="model", revision=revision
    )


def push(
    run_dir: str | Path,
    repo_id: str,
    merged: bool = False,
    private: bool = True,
    revision: str | None = None,
    dry_run: bool = False,
    dtype: str = "bf16",
    base_model: str | None = None,
    tags: list[str] | None = None,
    datasets: list[str] | None = None,
    endpoint: str | None = None,
    trust_remote_code: bool = False,
) -> list[UploadItem]:
    """``pg-tune push``: plan the upload, print it, and (unless ``dry_run``) commit it."""
    check_repo_id(repo_id, "--repo-id")
    if revision is not None:
        check_revision(revision, "--revision")
    items = upload_plan(
        run_dir, repo_id, merged, dtype, base_model, tags, datasets, trust_remote_code, dry_run=dry_run
    )
    run = read_run(run_dir)
    if not base_model and (named := published_base(run)) != run.recipe.model.name_or_path:
        print(
            f"note: the base is a local folder; the card, recipe.yaml and adapter_config.json name it by its "
            f"folder name {named!r}, not its path (--base-model OWNER/NAME names its hub id)"
        )
    visibility = "private" if private else "PUBLIC: anyone can download it"
    where = f"{repo_id}@{revision or 'main'} ({visibility})"
    total = sum(i.size for i in items)
    print(f"{'would upload' if dry_run else 'uploading'} {len(items)} files, {total:,} bytes, to {where}:")
    for item in items:
        print("  " + item.describe())
    if dry_run:
        if any(item.source is None for item in items):
            print(
                f"the merged export ({merged_dir_of(Path(run_dir), dtype)}) does not exist yet: a push without "
                "--dry-run writes it first (pg-tune export's checks), then uploads it"
            )
        return items
    what = "merged weights" if merged else ("model weights" if run.is_full_model else "LoRA adapter")
    info = upload(items, repo_id, private, revision, f"pg_tune: {what} from {Path(run_dir).name}", endpoint)
    print(f"pushed: {info.commit_url}")
    return items


def push_from_training(
    run_dir: str | Path, recipe: Recipe, accelerator: Any, step: int | None = None
) -> list[UploadItem] | None:
    """The training loop's hook: push per the recipe's ``hub:`` section, on the main process only.

    ``step=None`` (end of training): the adapter, or merged weights if ``hub.merged``, when
    ``hub.push_at_end``. ``step=N`` (after ``checkpoints/step-N`` is written): that folder, without
    optimizer state, under ``checkpoints/`` in the repo, when ``hub.push_checkpoints``.
    """
    hub = recipe.hub
    if hub.repo_id is None or not accelerator.is_main_process:
        return None
    run_dir = Path(run_dir)
    if step is None:
        if not hub.push_at_end:
            return None
        return push(
            run_dir,
            hub.repo_id,
            merged=hub.merged,
            private=hub.private,
            revision=hub.revision,
            base_model=hub.base_model,
            tags=list(hub.tags),
            datasets=list(hub.datasets),
        )
    if not hub.push_checkpoints:
        return None
    from pg_tune.train.checkpoint import CHECKPOINT_PREFIX

    folder = run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:07d}"
    items = _folder_items(folder, prefix=f"checkpoints/{folder.name}/", skip=CHECKPOINT_SKIP)
    upload(items, hub.repo_id, hub.private, hub.revision, f"pg_tune: checkpoint at step {step}")
    accelerator.print(f"pushed checkpoint {folder.name} to {hub.repo_id}")
    return items
