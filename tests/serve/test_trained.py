"""The demo's path end to end, with a shorter training: `pg-tune train` the shapes recipe, `pg-tune serve`
the run folder, then the README's `openai` snippet and the playground in headless Chromium.

The run also learns `detect <shape>` rows (boxes), so the playground has boxes to draw.
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from pg_tune.data.formats.shapes import COLOURS, write_jsonl
from tests.serve.browser import Browser, chromium_binary
from tests.serve.helpers import REPO

CAPTION_STEPS = 400  # the demo trains 1,200 steps of 16; a third of that captions most held-out images right
DETECT_STEPS = 60  # a circle always in the same place: learnt (box and label) in a few dozen steps
DETECT_BOX = (24, 30, 88, 94)


def _circle(rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (112, 112), tuple(rng.randint(200, 255) for _ in range(3)))
    ImageDraw.Draw(image).ellipse(DETECT_BOX, fill=COLOURS[rng.choice(sorted(COLOURS))])
    return image


def _detect_rows(out: Path, count: int, seed: int) -> Path:
    """`detect shape` rows: a circle of a random colour at DETECT_BOX, as structured JSONL."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        _circle(rng).save(out / f"images/{i:05d}.png")
        rows.append({"image": f"images/{i:05d}.png", "task": "detect", "prefix": "detect shape",
                     "objects": [{"label": "shape", "box": list(DETECT_BOX)}]})  # fmt: skip
    path = out / "detect.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(run: Path, *overrides: str) -> Path:
    command = [sys.executable, "-m", "pg_tune", "train", "recipes/demo/shapes_tiny.yaml", f"output_dir={run}",
               "data.eval.0.num_samples=8", "train.log_every=50", *overrides]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def caption_run(tmp_path_factory) -> Path:
    """`pg-tune train recipes/demo/shapes_tiny.yaml` (`make demo`), CAPTION_STEPS steps."""
    return _train(tmp_path_factory.mktemp("shapes") / "demo-shapes", f"train.max_steps={CAPTION_STEPS}")


@pytest.fixture(scope="module")
def detect_run(tmp_path_factory) -> Path:
    """The demo's recipe on `detect shape` rows instead, DETECT_STEPS steps of 8."""
    root = tmp_path_factory.mktemp("detect")
    rows = _detect_rows(root / "data", 200, seed=5)
    return _train(root / "detect-shapes", f"data.train=[{{format: jsonl, path: {rows}}}]", "data.eval=[]",
                  "eval.before_training=false", f"train.max_steps={DETECT_STEPS}", "train.batch_size=8")  # fmt: skip


def _readme_snippet() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    (snippet,) = [b for b in blocks if "from openai import OpenAI" in b]
    return snippet


@pytest.mark.slow
def test_readme_snippet_captions_held_out_images_through_pg_tune_serve(caption_run, serve_process, tmp_path):
    server = serve_process(str(caption_run))
    # The README's command: images the demo never trained on (its eval seed), captions in data.jsonl.
    made = subprocess.run([sys.executable, "-m", "pg_tune.data.formats.shapes", str(tmp_path / "held-out"), "12",
                           "--seed", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert made.returncode == 0, made.stderr
    held_out = Path(made.stdout.strip())
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    snippet = _readme_snippet()
    assert "http://127.0.0.1:8000/v1" in snippet and "held-out/images/00000.png" in snippet
    answers = []
    for row in rows:
        code = snippet.replace("http://127.0.0.1:8000/v1", f"{server.url}/v1").replace(
            "held-out/images/00000.png", str(held_out.parent / row["image"])
        )
        printed = io.StringIO()
        with redirect_stdout(printed):
            exec(compile(code, "README.md", "exec"), {})  # noqa: S102 (the README's own code)
        answers.append(printed.getvalue().strip())
    right = [a == row["suffix"] for a, row in zip(answers, rows, strict=True)]
    assert sum(right) >= len(rows) // 2, list(zip(answers, [r["suffix"] for r in rows], strict=True))


def _iou(a, b) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _caption(url: str, image: Path) -> str:
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()}},
        {"type": "text", "text": "caption en"},
    ]}]}  # fmt: skip
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300).json()["choices"][0]["message"][
        "content"
    ]


_FINISHED = "['done','error'].includes(document.body.dataset.state) && document.body.dataset.state"


def _open_playground(browser: Browser, url: str):
    page = browser.page(f"{url}/")
    page.wait_for("document.getElementById('model').textContent.includes('paligemma')", "the model's name")
    # Offline: nothing on the page is loaded from anywhere (inline script and style only).
    assert page.evaluate("[...document.querySelectorAll('script[src],link[href],img[src]')].length") == 0
    return page


def _ask(page, prompt: str) -> dict:
    """Type the prompt, press Run, wait for the answer; what the page shows."""
    page.evaluate(
        f"document.getElementById('prompt').value = {json.dumps(prompt)}; document.getElementById('run').click()"
    )
    state = page.wait_for(_FINISHED, f"an answer to {prompt!r}")
    shown = page.evaluate("({answer: document.getElementById('answer').textContent, raw: document.getElementById('raw')"
                          ".textContent, status: document.getElementById('status').textContent, drawn: document.body.dataset.drawn})")  # fmt: skip
    assert state == "done", shown["status"]
    return shown


@pytest.mark.slow
def test_playground_in_headless_chromium(caption_run, detect_run, serve_process, tmp_path):
    """Pick an image and caption it (the demo's model), then drop one and detect (boxes drawn)."""
    chromium_binary()  # skips, saying why, when there is no browser
    held_out = write_jsonl(tmp_path / "held-out", num_samples=8, seed=1)
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    captions = serve_process(str(caption_run))
    # A held-out image the model captions right (the README test checks how many it does).
    row = next((r for r in rows if _caption(captions.url, held_out.parent / r["image"]) == r["suffix"]), None)
    assert row is not None, "the model captions none of 8 held-out images right"
    image_path = held_out.parent / row["image"]
    browser = Browser(tmp_path / "profile")
    try:
        page = _open_playground(browser, captions.url)
        page.set_files("#file", [image_path])  # what picking a file in the dialog does
        page.wait_for("document.body.dataset.state === 'ready'", "the picked image")
        caption = _ask(page, "caption en")
        page.screenshot(tmp_path / "playground-caption.png")
        captions.terminate()

        boxes = serve_process(str(detect_run))
        page = _open_playground(browser, boxes.url)
        buffer = io.BytesIO()
        _circle(random.Random(99)).save(buffer, "PNG")  # not one of the training images
        png = base64.b64encode(buffer.getvalue()).decode()
        page.evaluate(f"""(() => {{  // a real drop event carrying a File
            const bytes = Uint8Array.from(atob('{png}'), c => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], 'dropped.png', {{type: 'image/png'}}));
            document.getElementById('drop').dispatchEvent(new DragEvent('drop', {{dataTransfer: data, bubbles: true, cancelable: true}}));
        }})()""")
        page.wait_for("document.getElementById('filename').textContent === 'dropped.png' && "
                      "document.body.dataset.state === 'ready'", "the dropped image")  # fmt: skip
        detection = _ask(page, "detect shape")
        objects = json.loads(page.evaluate("document.getElementById('objects').textContent"))
        shot = page.screenshot(tmp_path / "playground-detect.png")
    finally:
        browser.close()
    assert caption["answer"] == row["suffix"], (
        f"the playground showed {caption['answer']!r} for {row['suffix']!r}"
    )
    assert "<loc" in detection["raw"] and int(detection["drawn"]) >= 1, detection
    (found,) = objects
    assert found["label"] == "shape" and _iou(found["box"], DETECT_BOX) > 0.5, found
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    box_colour = (np.abs(pixels.astype(int) - (230, 25, 75)).sum(axis=1) < 30).sum()
    assert box_colour > 100, "no box drawn in the screenshot"


@pytest.mark.slow
def test_playground_draws_rle_masks_where_pycocotools_puts_them(serve_process, tmp_path):
    """The page's own RLE decoder and painter, fed a mask pycocotools encoded: painted pixels are the mask's."""
    from pycocotools import mask as mask_utils

    chromium_binary()
    server = serve_process("tiny-paligemma2")
    yy, xx = np.mgrid[:60, :80]
    mask = ((yy - 30) ** 2 / 400 + (xx - 45) ** 2 / 900 < 1) | ((xx > 5) & (xx < 12))  # odd runs, both axes
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    white = Image.new("RGB", (80, 60), (255, 255, 255))
    path = tmp_path / "white.png"
    white.save(path)
    browser = Browser(tmp_path / "profile")
    try:
        page = browser.page(f"{server.url}/")
        page.wait_for("document.readyState === 'complete'", "the page")
        page.set_files("#file", [path])
        page.wait_for("document.body.dataset.state === 'ready'", "the picked image")
        encoded = {"size": rle["size"], "counts": rle["counts"].decode()}
        painted = page.evaluate(f"""(() => {{
            drawResult([]);
            paintMask(document.getElementById('canvas').getContext('2d'), {json.dumps(encoded)}, '#e6194b');
            const data = document.getElementById('canvas').getContext('2d').getImageData(0, 0, 80, 60).data;
            const out = [];
            for (let i = 0; i < data.length; i += 4) out.push(data[i + 1] < 250 ? 1 : 0);
            return out;
        }})()""")
    finally:
        browser.close()
    painted = np.array(painted).reshape(60, 80).astype(bool)
    assert (painted == mask).all(), f"{(painted != mask).sum()} pixels differ"
