"""The HTML report: self-contained folder, worst first, drawn boxes/masks, and it renders in Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from pg_tune.evaluate.report import GT_COLOUR, PRED_COLOUR, write_report
from pg_tune.evaluate.scoring import Item, score_items
from pg_tune.models.paligemma import PaliGemmaFamily
from pg_tune.models.paligemma.boxes import encode_box
from pg_tune.models.paligemma.masks import MaskCodec, make_random_vae_weights

SIZE = (160, 120)


def _report(tmp_path):
    codec = MaskCodec(make_random_vae_weights(seed=0))
    on_disk = tmp_path / "data" / "photo.png"
    on_disk.parent.mkdir()
    Image.new("RGB", SIZE, (240, 240, 240)).save(on_disk)
    in_memory = Image.new("RGB", SIZE, (250, 230, 200))
    gt = encode_box((10, 10, 90, 70), SIZE)
    seg = "".join(f"<seg{c:03d}>" for c in range(16))
    items = [
        Item("caption", "a red circle", ["a red circle"], extra={"source": "cap-good", "prefix": "caption en"}),
        Item("caption", "<script>alert(1)</script>", ["a blue square"], extra={"source": "cap-bad", "prefix": "caption en"}),
        Item("refer_detect", encode_box((20, 20, 100, 80), SIZE) + " cat", [gt], SIZE,
             extra={"source": "ref-ok", "prefix": "detect cat"}),
        Item("refer_detect", "nothing", [gt], SIZE, extra={"source": "ref-miss", "prefix": "detect cat"}),
        Item("refer_segment", gt + seg, [gt + seg], SIZE, extra={"source": "seg", "prefix": "segment cat"}),
    ]  # fmt: skip
    scored = score_items(items, PaliGemmaFamily(mask_codec=codec))
    images = [in_memory, None, on_disk, on_disk, in_memory]
    index = write_report(
        tmp_path / "report",
        title="test report",
        metrics_by_dataset={"all": scored.metrics},
        records=scored.records,
        images=images,
        notes=["a note"],
        mask_codec=codec,
    )
    return index, scored


def test_report_is_self_contained_sorted_worst_first_and_escaped(tmp_path):
    index, scored = _report(tmp_path)
    text = index.read_text()
    assert "<script>alert(1)</script>" not in text and "&lt;script&gt;" in text
    assert text.index("cap-bad") < text.index("cap-good")  # worst first within a task
    assert text.index("ref-miss") < text.index("ref-ok")
    sources = re.findall(r'<img src="([^"]+)"', text)
    assert len(sources) == 5
    for src in sources:
        assert not src.startswith(("/", "http", "file:")), "images must be relative to the report folder"
        assert (index.parent / src).is_file()
    assert "caption/cider" in text and "a note" in text
    # The referring-detection image shows the ground-truth (green) and predicted (magenta) boxes.
    ok = next(i for i, r in enumerate(scored.records) if r["source"] == "ref-ok")
    pixels = np.asarray(Image.open(index.parent / f"images/{ok:05d}.png").convert("RGB")).reshape(-1, 3)
    colours = {tuple(p) for p in pixels}
    assert GT_COLOUR in colours and PRED_COLOUR in colours


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("chromium is not installed (apt-get install -y chromium); the report is not rendered")


def _run_chromium(binary: str, profile, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--virtual-time-budget=5000",
    ]  # fmt: skip
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120)


_PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.target.src)), true);
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => ({src: i.getAttribute('src'), w: i.naturalWidth, done: i.complete}));
  const pre = document.createElement('pre'); pre.id = 'probe';
  pre.textContent = JSON.stringify({imgs, errors: window.__errors, title: document.title});
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.slow
def test_report_renders_in_headless_chromium_with_every_image(tmp_path):
    binary = _chromium()
    index, _ = _report(tmp_path)
    # The probe page is the report plus a script that records what the browser loaded.
    probe = index.parent / "probe.html"
    probe.write_text(index.read_text().replace("</head>", _PROBE + "</head>", 1))
    result = _run_chromium(binary, tmp_path / "profile1", "--dump-dom", probe.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert found, f"probe did not run; chromium said: {result.stderr[-2000:]}"
    data = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert data["errors"] == [] and data["title"] == "test report"
    assert len(data["imgs"]) == 5
    assert all(img["done"] and img["w"] > 0 for img in data["imgs"]), data["imgs"]

    shot = tmp_path / "report.png"
    result = _run_chromium(binary, tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1280,1400",
                           index.as_uri())  # fmt: skip
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, "screenshot is blank"
