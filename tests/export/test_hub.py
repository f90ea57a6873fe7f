"""Hub push through huggingface_hub's own client, against a loopback server answering its endpoints.

The server (127.0.0.1 only) implements what ``create_repo``, ``create_branch`` and one
``create_commit`` call: repo creation, branch creation, README metadata validation, preupload
(which files are LFS), the git-LFS batch API with a basic PUT transfer, and the NDJSON commit.
What it cannot cover: the real Hub's auth, gating and rate limits, and the Xet transfer protocol
(hf_xet's Rust client talks to a CAS service this server does not imitate), so Xet is disabled
here and LFS files travel by the legacy basic transfer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import yaml

from pg_tune.cli import main as cli_main
from pg_tune.config.recipe import parse_recipe, resolved
from pg_tune.config.schema import ConfigError
from pg_tune.export.hub import push_from_training, upload_plan
from pg_tune.export.merged import read_run
from tests.families import family_of

TOKEN = "hf_pgtuneFAKEtoken0123456789abcdefXYZ"


class FakeHub(BaseHTTPRequestHandler):
    state: dict

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, body: dict, code: int = 200):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_POST(self):  # noqa: N802
        s, path, body = self.state, self.path.split("?")[0], self._body()
        s["auth"].add(self.headers.get("Authorization"))
        s["calls"].append(("POST", path))
        endpoint = f"http://127.0.0.1:{self.server.server_port}"
        if path == "/api/repos/create":
            s["created"].append(json.loads(body))
            payload = json.loads(body)
            repo = f"{payload['organization']}/{payload['name']}"
            s["repos"].setdefault(
                repo, payload.get("visibility") == "private"
            )  # an existing repo keeps its own
            return self._reply({"url": f"{endpoint}/{payload['organization']}/{payload['name']}"})
        if path == "/api/validate-yaml":
            s["readme_yaml"] = json.loads(body)["content"]
            return self._reply({})
        if "/branch/" in path:
            s["branches"].append(path.rsplit("/", 1)[1])
            return self._reply({})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return self._reply(
                {
                    "files": [
                        {
                            "path": f["path"],
                            "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                            "shouldIgnore": False,
                        }
                        for f in files
                    ]
                }
            )
        if path.endswith(".git/info/lfs/objects/batch"):
            objects = json.loads(body)["objects"]
            return self._reply(
                {
                    "transfer": "basic",
                    "objects": [
                        {
                            "oid": o["oid"],
                            "size": o["size"],
                            "actions": {"upload": {"href": f"{endpoint}/lfs-upload/{o['oid']}"}},
                        }
                        for o in objects
                    ],
                }
            )
        if "/commit/" in path:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            s["commits"].append({"revision": path.rsplit("/", 1)[1], "lines": lines})
            repo = path.removeprefix("/api/models/").split("/commit/")[0]
            return self._reply({"commitUrl": f"{endpoint}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
        return self._reply({"error": f"unexpected {path}"}, 404)

    def do_GET(self):  # noqa: N802
        s, path = self.state, self.path.split("?")[0]
        s["calls"].append(("GET", path))
        repo = path.removeprefix("/api/models/")
        if path.startswith("/api/models/") and repo in s["repos"]:
            return self._reply({"id": repo, "private": s["repos"][repo], "sha": "a" * 40})
        return self._reply({"error": f"unexpected {path}"}, 404)

    def do_PUT(self):  # noqa: N802
        body = self._body()
        self.state["lfs"][self.path.rsplit("/", 1)[1]] = body
        self._reply({})


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    state = {"calls": [], "created": [], "branches": [], "commits": [], "lfs": {}, "auth": set(), "repos": {}}
    handler = type("Handler", (FakeHub,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # see the module docstring
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored token leaks in
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    yield state
    server.shutdown()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_checkpoint):
    from tests.export.test_export import make_run

    return make_run(tmp_path_factory.mktemp("run"), tiny_checkpoint)


def _committed_files(state) -> dict[str, bytes]:
    (commit,) = state["commits"]
    files = {}
    for line in commit["lines"]:
        if line["key"] == "file":
            files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        elif line["key"] == "lfsFile":
            data = state["lfs"][line["value"]["oid"]]
            assert hashlib.sha256(data).hexdigest() == line["value"]["oid"]
            files[line["value"]["path"]] = data
    return files


@pytest.mark.slow
def test_push_adapter_in_one_commit(fake_hub, run_dir, capsys, caplog):
    caplog.set_level("DEBUG")
    rc = cli_main(
        [
            "push",
            str(run_dir),
            "--repo-id",
            "me/pg-shapes",
            "--private",
            "--revision",
            "exp1",
            "--dataset",
            "me/shapes",
        ]
    )
    assert rc == 0
    assert fake_hub["created"] == [
        {"name": "pg-shapes", "organization": "me", "visibility": "private", "type": "model"}
    ]
    assert fake_hub["branches"] == ["exp1"]
    assert len(fake_hub["commits"]) == 1 and fake_hub["commits"][0]["revision"] == "exp1"
    files = _committed_files(fake_hub)
    # Exactly the planned files, byte for byte.
    plan = upload_plan(run_dir, "me/pg-shapes", datasets=["me/shapes"])
    assert sorted(files) == sorted(i.path_in_repo for i in plan)
    for item in plan:
        want = item.source if isinstance(item.source, bytes) else item.source.read_bytes()
        assert files[item.path_in_repo] == want, item.path_in_repo
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "summary.json"} <= set(files)
    assert "adapter_model.safetensors" in {
        line["value"]["path"] for line in fake_hub["commits"][0]["lines"] if line["key"] == "lfsFile"
    }
    # The card: metadata the Hub reads, metrics, the resolved recipe.
    card = files["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "peft" and meta["datasets"] == ["me/shapes"] and "lora" in meta["tags"]
    assert "caption/exact_match" in card and "output_dir:" in card
    assert fake_hub["readme_yaml"] == card
    # The token authenticated every call and went nowhere else.
    assert fake_hub["auth"] == {f"Bearer {TOKEN}"}
    out = capsys.readouterr()
    assert all(TOKEN not in text for text in (out.out, out.err, caplog.text))
    assert all(TOKEN.encode() not in data for data in files.values())
    assert not any(TOKEN.encode() in p.read_bytes() for p in run_dir.rglob("*") if p.is_file())


@pytest.mark.slow
def test_dry_run_lists_the_plan_and_sends_nothing(fake_hub, run_dir, capsys):
    assert cli_main(["push", str(run_dir), "--repo-id", "me/pg-shapes", "--dry-run"]) == 0
    assert fake_hub["calls"] == []
    printed = capsys.readouterr().out
    plan = upload_plan(run_dir, "me/pg-shapes")
    assert f"would upload {len(plan)} files" in printed
    for item in plan:
        assert item.path_in_repo in printed


@pytest.mark.slow
def test_push_merged_uses_a_full_precision_export(fake_hub, run_dir):
    assert cli_main(["push", str(run_dir), "--repo-id", "me/pg-merged", "--merged", "--dtype", "fp32"]) == 0
    files = _committed_files(fake_hub)
    assert {"model.safetensors", "config.json", "tokenizer.json", "export_report.json", "README.md"} <= set(
        files
    )
    assert not any(name.startswith("adapter_") for name in files)
    meta = yaml.safe_load(files["README.md"].decode().split("---")[1])
    assert meta["library_name"] == "transformers" and "## Export parity" in files["README.md"].decode()
    assert fake_hub["created"][0]["visibility"] == "private"  # private unless --public


@pytest.mark.slow
def test_refuses_to_upload_a_file_holding_the_token(fake_hub, run_dir, tmp_path):
    import shutil

    leaky = tmp_path / "leaky"
    shutil.copytree(run_dir, leaky)
    (leaky / "summary.json").write_text(json.dumps({"note": TOKEN}))
    with pytest.raises(RuntimeError, match="summary.json: contains your Hugging Face token"):
        from pg_tune.export.hub import push

        push(leaky, "me/x")
    assert fake_hub["commits"] == []


@pytest.mark.slow
def test_push_from_training_main_process_only(fake_hub, run_dir):
    resolved = read_run(run_dir).resolved
    recipe = parse_recipe({**resolved, "hub": {"repo_id": "me/from-train", "push_checkpoints": True}})
    assert push_from_training(run_dir, recipe, SimpleNamespace(is_main_process=False, print=print)) is None
    assert fake_hub["calls"] == []
    items = push_from_training(run_dir, recipe, SimpleNamespace(is_main_process=True, print=print))
    assert "adapter_model.safetensors" in {i.path_in_repo for i in items} and len(fake_hub["commits"]) == 1
    assert fake_hub["created"][0]["visibility"] == "private"  # hub.private defaults to true
    # A checkpoint push: the folder without optimizer state, under checkpoints/.
    ckpt = run_dir / "checkpoints" / "step-0000002"
    ckpt.mkdir(parents=True, exist_ok=True)
    for name in ("trainable.safetensors", "state.json", "complete.json", "optim.pt"):
        (ckpt / name).write_bytes(b"x" * 10)
    items = push_from_training(run_dir, recipe, SimpleNamespace(is_main_process=True, print=print), step=2)
    assert sorted(i.path_in_repo for i in items) == [
        "checkpoints/step-0000002/complete.json",
        "checkpoints/step-0000002/state.json",
        "checkpoints/step-0000002/trainable.safetensors",
    ]


def test_hub_section_validates_and_has_no_token_key():
    base = {"output_dir": "x", "data": {"train": [{"format": "shapes"}]}}
    with pytest.raises(ConfigError, match="hub.repo_id: expected OWNER/NAME"):
        parse_recipe({**base, "hub": {"repo_id": "no-owner"}})
    with pytest.raises(ConfigError, match="unknown key 'hub.token'"):
        parse_recipe({**base, "hub": {"repo_id": "a/b", "token": "hf_x"}})
    assert parse_recipe({**base, "hub": {"repo_id": "a/b"}}).hub.private is True


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """A run folder as training leaves it (adapter + recipe.yaml), without training: fast."""
    from pg_tune.config.recipe import LoraConfig, resolved
    from pg_tune.models.paligemma.tiny import build_base
    from pg_tune.train.adapters import apply_lora

    root = tmp_path_factory.mktemp("quick-run")
    apply_lora(
        build_base("tiny-paligemma2"),
        LoraConfig(r=2, alpha=4),
        "tiny-paligemma2",
        family_of(build_base("tiny-paligemma2")),
    ).save_pretrained(root / "adapter")
    recipe = parse_recipe({"output_dir": str(root), "data": {"train": [{"format": "shapes"}]}})
    (root / "recipe.yaml").write_text(yaml.safe_dump(resolved(recipe)))
    return root


def test_push_is_private_unless_public(fake_hub, quick_run, capsys):
    assert cli_main(["push", str(quick_run), "--repo-id", "me/quiet", "--dry-run"]) == 0
    assert "to me/quiet@main (private):" in capsys.readouterr().out and fake_hub["calls"] == []
    assert cli_main(["push", str(quick_run), "--repo-id", "me/quiet"]) == 0
    assert fake_hub["created"][-1]["visibility"] == "private"
    assert cli_main(["push", str(quick_run), "--repo-id", "me/open", "--public", "--dry-run"]) == 0
    assert "to me/open@main (PUBLIC: anyone can download it):" in capsys.readouterr().out
    assert cli_main(["push", str(quick_run), "--repo-id", "me/open", "--public"]) == 0
    assert fake_hub["created"][-1]["visibility"] == "public"
    with pytest.raises(SystemExit):  # one or the other
        cli_main(["push", str(quick_run), "--repo-id", "me/x", "--public", "--private"])


def test_private_push_into_an_existing_public_repo_is_refused(fake_hub, quick_run, capsys):
    fake_hub["repos"]["me/already-public"] = False
    assert cli_main(["push", str(quick_run), "--repo-id", "me/already-public"]) == 2
    assert "me/already-public already exists and is PUBLIC" in capsys.readouterr().err
    assert fake_hub["commits"] == []
    assert cli_main(["push", str(quick_run), "--repo-id", "me/already-public", "--public"]) == 0
    assert len(fake_hub["commits"]) == 1


@pytest.mark.slow
def test_train_command_pushes_checkpoints_then_the_adapter_with_its_summary(
    fake_hub, tmp_path, tiny_checkpoint
):
    """The loop knows nothing of the Hub: the train command pushes each checkpoint (a callback)
    and, after train() returns and summary.json is written, the adapter."""
    from pg_tune.cli.train import run_training

    recipe = parse_recipe(
        {
            "output_dir": str(tmp_path / "run"),
            "model": {"name_or_path": str(tiny_checkpoint), "dtype": "float32"},
            "lora": {"r": 2, "alpha": 4, "dropout": 0.0, "targets": "attention"},
            "data": {"train": [{"format": "shapes", "num_samples": 4}]},
            "train": {"max_steps": 2, "batch_size": 2, "save_every": 1, "keep_last": 2},
            "eval": {"before_training": False},
            "hub": {"repo_id": "me/from-train", "push_checkpoints": True},
        }
    )
    run_training(recipe, resolved(recipe))
    pushed = [
        {line["value"]["path"] for line in c["lines"] if line["key"] in ("file", "lfsFile")}
        for c in fake_hub["commits"]
    ]
    assert len(pushed) == 3
    assert "checkpoints/step-0000001/trainable.safetensors" in pushed[0]
    assert "checkpoints/step-0000002/trainable.safetensors" in pushed[1]
    assert {"adapter_model.safetensors", "summary.json"} <= pushed[2]


# --- issue 22.15: push's dry run checks what the real push checks, and publishes no local path -------------


@pytest.mark.parametrize(
    "args, where",
    [
        (["--repo-id", "../../etc"], "--repo-id: expected OWNER/NAME"),
        (["--repo-id", "me/bad..name"], "--repo-id: 'me/bad..name' is not a valid Hub repo id"),
        (["--repo-id", "me/ok", "--revision", "../main"], "--revision: '../main' is not a valid branch name"),
        (["--repo-id", "me/ok", "--revision=-rf"], "--revision: '-rf' is not a valid branch name"),
    ],
)
def test_push_dry_run_validates_repo_id_and_revision_like_the_recipe(
    fake_hub, quick_run, capsys, args, where
):
    assert cli_main(["push", str(quick_run), *args, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert where in err and "Traceback" not in err and fake_hub["calls"] == []
    recipe = {"output_dir": "x", "data": {"train": [{"format": "shapes"}]}}
    with pytest.raises(ConfigError, match="hub.revision: '../main' is not a valid branch name"):
        parse_recipe({**recipe, "hub": {"repo_id": "me/ok", "revision": "../main"}})
    with pytest.raises(ConfigError, match="hub.repo_id: 'me/bad..name' is not a valid Hub repo id"):
        parse_recipe({**recipe, "hub": {"repo_id": "me/bad..name"}})


def test_push_merged_dry_run_lists_the_export_without_running_it(fake_hub, quick_run, capsys, monkeypatch):
    import pg_tune.export.hub as hub

    monkeypatch.setattr(hub, "export_run", lambda *a, **k: pytest.fail("a dry run must not export"))
    assert cli_main(["push", str(quick_run), "--repo-id", "me/m", "--merged", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not (quick_run / "merged-bf16").exists() and fake_hub["calls"] == []
    for name in ("config.json", "generation_config.json", "export_report.json", "README.md"):
        assert name in out, name
    assert "model*.safetensors" in out and "(written by the export; not run in a dry run)" in out
    assert "does not exist yet: a push without --dry-run writes it first" in out


@pytest.fixture(scope="module")
def local_base_run(tmp_path_factory, tiny_checkpoint):
    """A run folder (adapter + recipe.yaml) whose base is a folder on this machine."""
    from pg_tune.config.recipe import LoraConfig, resolved
    from pg_tune.models.paligemma.tiny import build_base
    from pg_tune.train.adapters import apply_lora

    root = tmp_path_factory.mktemp("local-base-run")
    base = build_base("tiny-paligemma2")
    apply_lora(base, LoraConfig(r=2, alpha=4), str(tiny_checkpoint), family_of(base)).save_pretrained(
        root / "adapter"
    )
    recipe = parse_recipe(
        {
            "output_dir": str(root),
            "model": {"name_or_path": str(tiny_checkpoint)},
            "data": {"train": [{"format": "shapes"}]},
        }
    )
    (root / "recipe.yaml").write_text(yaml.safe_dump(resolved(recipe)))
    (root / "adapter" / "recipe.yaml").write_text(yaml.safe_dump(resolved(recipe)))
    best = root / "checkpoints" / "step-0000002"
    (root / "summary.json").write_text(json.dumps({"steps": 2, "best_checkpoint": str(best)}))
    return root


def _uploaded_text(plan) -> dict[str, str]:
    texts = {}
    for item in plan:
        data = item.source if isinstance(item.source, bytes) else item.source.read_bytes()
        if not item.path_in_repo.endswith(".safetensors"):
            texts[item.path_in_repo] = data.decode("utf-8", errors="replace")
    return texts


def test_a_local_base_path_is_never_uploaded(fake_hub, local_base_run, tiny_checkpoint, capsys):
    path = str(tiny_checkpoint)
    # --base-model: the card, recipe.yaml and adapter_config.json name the hub id.
    texts = _uploaded_text(upload_plan(local_base_run, "me/x", base_model="google/paligemma2-3b-pt-224"))
    assert not [name for name, text in texts.items() if path in text]
    assert yaml.safe_load(texts["recipe.yaml"])["model"]["name_or_path"] == "google/paligemma2-3b-pt-224"
    assert (
        json.loads(texts["adapter_config.json"])["base_model_name_or_path"] == "google/paligemma2-3b-pt-224"
    )
    assert yaml.safe_load(texts["README.md"].split("---")[1])["base_model"] == "google/paligemma2-3b-pt-224"
    assert json.loads(texts["summary.json"])["best_checkpoint"] == "checkpoints/step-0000002"
    # Without it: the folder's name only, and the dry run says so.
    texts = _uploaded_text(upload_plan(local_base_run, "me/x"))
    assert not [name for name, text in texts.items() if path in text]
    assert yaml.safe_load(texts["recipe.yaml"])["model"]["name_or_path"] == tiny_checkpoint.name
    assert cli_main(["push", str(local_base_run), "--repo-id", "me/x", "--dry-run"]) == 0
    assert f"name it by its folder name {tiny_checkpoint.name!r}, not its path" in capsys.readouterr().out
    # The local run folder itself is untouched: the adapter still loads on the path it was trained on.
    assert (
        json.loads((local_base_run / "adapter" / "adapter_config.json").read_text())[
            "base_model_name_or_path"
        ]
        == path
    )
