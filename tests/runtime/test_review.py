"""The review page (runtime.review): self-contained, escaped, sorted, filterable; checked as
text and in a real headless Chromium (``make browser``; skipped with the reason without one)."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cops_deploy.errors import ConfigError
from cops_deploy.runtime.review import (
    CONTENT_SECURITY_POLICY,
    DEFAULT_THUMB_SIZE,
    ReviewSummary,
    decision_of,
    render_review,
    write_review,
)

EVIL = 'parts/<script>alert("x")</script>&"quote\'.png'
REGION = {"x": 10, "y": 20, "width": 30, "height": 5, "area": 120, "peak": 0.93, "mean": 0.71}


def _png(size: tuple[int, int], seed: int = 0) -> bytes:
    """An RGB PNG of (width, height) with random pixels."""
    rgb = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A results folder with a picture per result (a wide one, as side_by_side writes)."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png.png").write_bytes(_png((1500, 500), 1))
    (tmp_path / "b.png.png").write_bytes(_png((300, 100), 2))
    return tmp_path


def _records() -> tuple[list[dict], list[dict]]:
    results = [
        {"source": "low.png", "score": 0.12, "visual": "b.png.png", "is_anomalous": False,
         "threshold": 0.5, "regions": []},
        {"source": EVIL, "score": 0.97, "visual": "sub/a.png.png", "is_anomalous": True,
         "threshold": 0.5, "regions": [REGION]},
        {"source": "mid.png", "score": 0.40, "picture": _png((64, 64), 3)},
        {"source": "gone.png", "score": 0.30, "visual": "nowhere.png"},
    ]  # fmt: skip
    failures = [{"source": "bad.jpg", "reason": "decode_error", "error": "truncated <file>"}]
    return results, failures


def _page(run_dir: Path) -> str:
    results, failures = _records()
    summary = ReviewSummary(model="bundles/<m>", backend="onnxruntime", precision="fp32")
    return render_review(results, failures, summary, pictures_dir=run_dir)


def _cards(page: str) -> list[tuple[str, str]]:
    """(decision, source text) of each card, in page order."""
    found = re.findall(
        r'<div class="card" data-decision="([a-z-]+)".*?class="source">(.*?)</div>', page
    )
    return [(decision, source) for decision, source in found]


# ----------------------------------------------------------------------------- as text


def test_cards_are_sorted_by_score_then_failures(run_dir: Path) -> None:
    cards = _cards(_page(run_dir))
    assert [d for d, _ in cards] == ["not-ok", "undecided", "undecided", "ok", "failed"]
    assert [s for _, s in cards][1:] == ["mid.png", "gone.png", "low.png", "bad.jpg"]


def test_every_string_is_escaped(run_dir: Path) -> None:
    page = _page(run_dir)
    assert page.count("<script") == 1  # the page's own
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&quot;quote&#x27;.png" in page
    assert "bundles/&lt;m&gt;" in page and "truncated &lt;file&gt;" in page
    assert "<m>" not in page and "<file>" not in page


def test_nothing_is_loaded_from_outside_the_page(run_dir: Path) -> None:
    page = _page(run_dir)
    assert (
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">' in page
    )
    assert "default-src 'none'; img-src data:;" in CONTENT_SECURITY_POLICY
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY
    sources = re.findall(r'\b(?:src|href)="([^"]*)"', page)
    assert len(sources) == 3 and all(s.startswith("data:image/jpeg;base64,") for s in sources)
    assert "<link" not in page and "url(" not in page and "@import" not in page


def test_pictures_are_embedded_as_small_thumbnails(run_dir: Path) -> None:
    page = _page(run_dir)
    sizes = []
    for uri in re.findall(r'src="data:image/jpeg;base64,([^"]*)"', page):
        with Image.open(io.BytesIO(base64.b64decode(uri))) as img:
            sizes.append(img.size)
    assert sizes == [(DEFAULT_THUMB_SIZE, DEFAULT_THUMB_SIZE // 3), (64, 64), (300, 100)]
    small = render_review(_records()[0][1:2], pictures_dir=run_dir, thumb_size=96)
    assert len(small) < len(page) / 2


def test_a_missing_picture_is_said_in_text_not_a_broken_image(run_dir: Path) -> None:
    page = _page(run_dir)
    gone = page[page.index(">gone.png<") :]
    gone = gone[: gone.index('<div class="card"')]
    assert "<img" not in gone and "nowhere.png is missing" in gone


def test_summary_counts_and_regions(run_dir: Path) -> None:
    page = _page(run_dir)
    assert "<th>images scored</th><td>4</td>" in page and "<th>failed</th><td>1</td>" in page
    assert "NOT OK 1, OK 1, undecided 2" in page
    assert 'data-filter="not-ok">NOT OK (1)</button>' in page
    assert 'data-filter="failed">failed (1)</button>' in page
    assert "<td>10,20 30&times;5</td><td>120</td><td>0.9300</td><td>0.7100</td>" in page
    assert "(threshold 0.5000), 1 region(s)" in page and "no defect region" in page


def test_write_review_writes_the_page(run_dir: Path) -> None:
    results, failures = _records()
    path = write_review(run_dir / "review.html", results, failures, pictures_dir=run_dir)
    assert path.read_text(encoding="utf-8") == render_review(
        results, failures, pictures_dir=run_dir
    )


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"score": 0.5}, "valid records are dicts with a 'source' string"),
        ({"source": "a", "score": float("nan")}, r"score nan; valid: a finite number"),
        ({"source": "a", "score": True}, r"score True; valid: a finite number"),
        ({"source": "a"}, r"score None; valid: a finite number"),
        ({"source": "a", "score": 1.0, "is_anomalous": "yes"}, r"is_anomalous 'yes'; valid"),
        ({"source": "a", "score": 1.0, "regions": "box"}, r"regions 'box'; valid: a list"),
        ({"source": "a", "score": 1.0, "regions": [{"x": 1}]}, r"a region lacks \['y'"),
    ],
)
def test_bad_records_are_refused(record: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        render_review([record])


def test_bad_failure_record_and_thumb_size_are_refused() -> None:
    with pytest.raises(ConfigError, match="failure record"):
        render_review([], [{"reason": "x"}])
    with pytest.raises(ConfigError, match="thumb_size 8; valid: an integer >= 16"):
        render_review([], thumb_size=8)


def test_numpy_numbers_are_accepted() -> None:
    record = {"source": "n.png", "score": np.float32(0.25), "threshold": np.float64(0.5)}
    record["regions"] = [{**REGION, "peak": np.float32(0.5), "area": np.int64(7)}]
    page = render_review([record])
    assert "0.2500</span> (threshold 0.5000)" in page and "<td>7</td><td>0.5000</td>" in page


def test_decision_of() -> None:
    assert [decision_of({"is_anomalous": v}) for v in (True, False, None)] == [
        "not-ok", "ok", "undecided"
    ]  # fmt: skip
    assert decision_of({}) == "undecided"


# ----------------------------------------------------------------------------- in Chromium

_BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def _chromium() -> str | None:
    return os.environ.get("COPS_CHROMIUM") or next(filter(None, map(shutil.which, _BROWSERS)), None)


needs_browser = pytest.mark.skipif(
    _chromium() is None,
    reason=f"no headless Chromium found (looked for {', '.join(_BROWSERS)} and $COPS_CHROMIUM); "
    "install one with `make browser`",
)


def _browse(page: Path, profile: Path, *flags: str, fragment: str = "") -> str:
    """Run Chromium headless over ``page`` with no network; return its stdout."""
    command = [
        _chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
        f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND",
        "--proxy-server=127.0.0.1:9", "--virtual-time-budget=5000", *flags,
        page.resolve().as_uri() + fragment,
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _visible(dom: str) -> list[str]:
    cards = re.findall(r'<div class="card" data-decision="([a-z-]+)"([^>]*)>', dom)
    return [decision for decision, rest in cards if "hidden" not in rest]


@pytest.fixture
def page_file(run_dir: Path) -> Path:
    results, failures = _records()
    summary = ReviewSummary(model="bundles/m", backend="onnxruntime", precision="fp32")
    return write_review(run_dir / "review.html", results, failures, summary, run_dir)


@needs_browser
def test_in_chromium_no_picture_is_broken_and_the_screenshot_shows_the_page(
    page_file: Path, tmp_path: Path
) -> None:
    dom = _browse(page_file, tmp_path / "profile", "--dump-dom")
    assert 'data-broken-images="0"' in dom and 'data-filter="all"' in dom
    assert _visible(dom) == ["not-ok", "undecided", "undecided", "ok", "failed"]
    assert "alert(" in dom and dom.count("<script") == 1  # the evil name shown as text
    shot = tmp_path / "review.png"
    _browse(page_file, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,1600")
    with Image.open(shot) as img:
        array = np.asarray(img.convert("RGB"))
    assert array.shape[:2] == (1600, 1280)
    assert len(np.unique(array.reshape(-1, 3), axis=0)) > 1000  # pictures, not a blank page


@needs_browser
@pytest.mark.parametrize(
    ("key", "shown"),
    [("not-ok", ["not-ok"]), ("ok", ["ok"]), ("undecided", ["undecided"] * 2),
     ("failed", ["failed"]), ("nonsense", ["not-ok", "undecided", "undecided", "ok", "failed"])],
)  # fmt: skip
def test_in_chromium_the_filter_shows_one_decision(
    page_file: Path, tmp_path: Path, key: str, shown: list[str]
) -> None:
    dom = _browse(page_file, tmp_path / "profile", "--dump-dom", fragment=f"#filter={key}")
    assert _visible(dom) == shown
    assert re.search(rf'<button type="button" data-filter="{key}" class="active">', dom) or (
        key == "nonsense"
    )


@needs_browser
def test_in_chromium_a_broken_picture_is_counted_and_shown(page_file: Path, tmp_path: Path):
    page = page_file.read_text(encoding="utf-8")
    broken = re.sub(r"data:image/jpeg;base64,[^\"]*", "data:image/jpeg;base64,AAAA", page, count=1)
    target = tmp_path / "broken.html"
    target.write_text(broken, encoding="utf-8")
    dom = _browse(target, tmp_path / "profile", "--dump-dom")
    assert 'data-broken-images="1"' in dom
    assert '<div class="warning" id="broken">1 picture(s) could not be displayed.</div>' in dom


@needs_browser
def test_in_chromium_the_policy_stops_a_script_that_is_not_the_pages(
    page_file: Path, tmp_path: Path
) -> None:
    page = page_file.read_text(encoding="utf-8")
    injected = page.replace("</body>", "<script>document.body.dataset.injected='1'</script></body>")
    target = tmp_path / "injected.html"
    target.write_text(injected, encoding="utf-8")
    dom = _browse(target, tmp_path / "profile", "--dump-dom")
    assert 'data-broken-images="0"' in dom  # the page's own script ran
    assert "data-injected" not in dom
