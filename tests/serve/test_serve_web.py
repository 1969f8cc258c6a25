"""`medtune web` in headless Chromium (Playwright): upload a bundled VQA-RAD image and a DICOM, ask, read the
answer from the page and compare it with the Generator's greedy answer; regenerate and clear; screenshots.

Skips when /usr/bin/chromium is missing, unless MEDTUNE_REQUIRE_BROWSER=1 (CI), where it fails instead."""
import os
from pathlib import Path

import pytest

from medtune.models.generation import GenerationSettings
from serve_helpers import ct_dicom_bytes, free_port, start_medtune, stop

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BUNDLED_IMAGE = "synpic100132.jpg"
TIMEOUT_MS = 60_000


def _require_browser():
    required = os.environ.get("MEDTUNE_REQUIRE_BROWSER") == "1"
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing (apt-get install chromium)"
        pytest.fail(message) if required else pytest.skip(message)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        message = "the playwright Python package is missing (pip install playwright)"
        pytest.fail(message) if required else pytest.skip(message)


@pytest.fixture(scope="module")
def web_url(tiny_model_dir, tmp_path_factory):
    """The demo on ``RUN/model`` (the folder name medtune's stages and demo write), as a user starts it."""
    _require_browser()
    run = tmp_path_factory.mktemp("web") / "liver-run"
    run.mkdir()
    (run / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    port = free_port()
    process = start_medtune(["web", str(run / "model"), "--host", "127.0.0.1", "--port", str(port)],
                            f"http://127.0.0.1:{port}/")
    yield f"http://127.0.0.1:{port}/"
    stop(process)


@pytest.fixture(scope="module")
def browser(web_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def greedy_answer(generator, image, question: str, max_new_tokens: int = 128) -> str:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return generator.generate([conversation], [[image]], GenerationSettings(max_new_tokens=max_new_tokens))[0]


def normalised(text: str) -> str:
    return " ".join(text.split())


def ask(page, question: str):
    from playwright.sync_api import expect

    page.locator("#question textarea").fill(question)
    page.locator("#send").click()
    answer = page.locator('#chatbot [data-testid="bot"]').last
    expect(answer).to_be_visible(timeout=TIMEOUT_MS)
    return answer


def test_upload_bundled_image_ask_regenerate_clear(web_url, browser, generator, tmp_path):
    from playwright.sync_api import expect

    from medtune.data.images import image_from_bytes
    from medtune.paths import bundled_data

    image_file = bundled_data("vqa_rad", "images", BUNDLED_IMAGE)
    image = image_from_bytes(image_file.read_bytes(), name=BUNDLED_IMAGE)
    expected = normalised(greedy_answer(generator, image, "Is there a fracture?"))
    page = browser.new_page()
    page.goto(web_url)
    expect(page).to_have_title("medtune · liver-run")   # the checkpoint's name, not its folder "model"
    page.locator("#upload input[type=file]").set_input_files(str(image_file))
    model_view = page.locator("#model-view img")
    expect(model_view).to_be_visible(timeout=TIMEOUT_MS)
    # the page shows the model's input: the model's own square size, not the upload's
    size = generator.vlm.image_size
    assert model_view.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [size, size]
    expect(page.locator("#status")).to_contain_text(f"{image.width}×{image.height} px")

    answer = ask(page, "Is there a fracture?")
    expect(answer).to_have_text(expected, timeout=TIMEOUT_MS)
    page.screenshot(path=tmp_path / "web-answer.png", full_page=True)
    assert (tmp_path / "web-answer.png").stat().st_size > 10_000

    page.locator("#regenerate").click()  # greedy: the same answer again, still one reply
    expect(page.locator('#chatbot [data-testid="bot"]')).to_have_count(1, timeout=TIMEOUT_MS)
    expect(page.locator('#chatbot [data-testid="bot"]').last).to_have_text(expected, timeout=TIMEOUT_MS)
    page.locator("#clear").click()
    expect(page.locator('#chatbot [data-testid="bot"]')).to_have_count(0, timeout=TIMEOUT_MS)
    page.close()


def test_dicom_upload_with_window_preset(web_url, browser, generator, tmp_path):
    from playwright.sync_api import expect

    from medtune.data.images import image_from_bytes

    dicom = tmp_path / "ct.dcm"
    dicom.write_bytes(ct_dicom_bytes(48))
    image = image_from_bytes(dicom.read_bytes(), name="ct.dcm", window="lung")
    expected = normalised(greedy_answer(generator, image, "Any nodule?"))
    page = browser.new_page()
    page.goto(web_url)
    page.locator("#window input").click()
    page.get_by_role("option", name="lung", exact=True).click()
    page.locator("#upload input[type=file]").set_input_files(str(dicom))
    expect(page.locator("#status")).to_contain_text("ct.dcm: 48×48 px", timeout=TIMEOUT_MS)
    answer = ask(page, "Any nodule?")
    expect(answer).to_have_text(expected, timeout=TIMEOUT_MS)
    page.screenshot(path=tmp_path / "web-dicom.png", full_page=True)
    page.close()
