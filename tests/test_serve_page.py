"""`fashiondiff serve` as a stylist uses it: a real server process on a free loopback port,
driven by headless Chromium (Debian's chromium + chromium-driver, `make browser`) and by
gradio's own client for the bad inputs. Tiny models, 2 sampling steps.

The tuned folder is missing when the server starts (as before `make repro`), so the first
test sees the page say so; it then appears, and the page uses it without a restart.
"""

from __future__ import annotations

import io
import shutil
import sys
import urllib.request
from pathlib import Path

import pytest
from browser import chromium
from browser import wait as wait_until
from PIL import Image
from serving_fixtures import PROMPT, SIDE

from fashiondiff.processes import free_port, project_env, running

pytestmark = pytest.mark.slow  # one server process for the file, started first (~25 s here)

UPLOAD_CAP_MB = 0.05  # the photo is ~6 KB, big.png ~120 KB
QUEUE = 2
WAIT = 60  # seconds for a generation to show (2 steps take well under one)


@pytest.fixture(scope="module")
def page(served, adapters, tmp_path_factory) -> str:
    log = tmp_path_factory.mktemp("page") / "serve.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    cmd = [
        sys.executable,
        "-m",
        "fashiondiff",
        "serve",
        "--model",
        "late",
        "--lora",
        str(adapters),
        "--port",
        str(port),
        "--queue-size",
        str(QUEUE),
        "--max-upload-mb",
        str(UPLOAD_CAP_MB),
    ]
    with running(cmd, url, log=log, cwd=served, env=project_env()):
        yield url


@pytest.fixture(scope="module")
def client(page):
    from gradio_client import Client

    return Client(page, verbose=False)


def tuned_in_place(served: Path) -> None:
    for part in ("prior", "decoder"):
        if not (served / "late" / part).exists():
            shutil.copytree(served / "models" / part, served / "late" / part)


def text_to_image(client, prompt: str = PROMPT, steps: int = 2) -> tuple:
    return client.predict(prompt, 0, steps, 4.0, "none", api_name="/text_to_image")


def test_a_missing_model_folder_is_a_message_then_the_next_request_uses_it(client, served):
    assert not (served / "late").exists()  # this test runs first: the server started without it
    base, tuned, notes = text_to_image(client)
    assert tuned["value"] is None and Image.open(base["value"]).size == (SIDE, SIDE)
    assert notes == "- tuned model: late: no such model folder (--model: a folder with prior/ and decoder/)"
    tuned_in_place(served)
    base, tuned, notes = text_to_image(client)
    assert notes == "" and Image.open(tuned["value"]).size == (SIDE, SIDE)


def test_bad_inputs_get_messages_and_the_server_keeps_answering(client, served, page):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    tuned_in_place(served)
    photo_args = ("a red skirt", 0, 2, 4.0, 0.6, "none")
    with pytest.raises(AppError, match="empty prompt"):
        text_to_image(client, prompt="   ")
    with pytest.raises(AppError, match=r"that upload is not an image \(PNG, JPEG or WebP work\)"):
        client.predict(handle_file(str(served / "fake.png")), *photo_args, api_name="/photo_to_image")
    with pytest.raises(AppError, match="greater than maximum value 1000"):
        text_to_image(client, steps=5000)
    status, body = upload(page, served / "big.png")  # the server's own cap, not the client's
    assert status == 413 and "maximum allowed size" in body
    base, tuned, notes = client.predict(handle_file(str(served / "photo.png")), *photo_args, api_name="/photo_to_image")
    assert notes == "" and Image.open(tuned["value"]).size == (SIDE, SIDE)


def test_a_burst_is_bounded_by_the_queue(client, served):
    tuned_in_place(served)
    # 40 steps keep the worker busy (~1 s a job) while all five are submitted (milliseconds)
    jobs = [client.submit(PROMPT, seed, 40, 4.0, "none", api_name="/text_to_image") for seed in range(3 + QUEUE)]
    outcomes = []
    for job in jobs:
        try:
            job.result(timeout=WAIT)
            outcomes.append("done")
        except Exception as exc:  # noqa: BLE001 - gradio_client.utils.QueueError, not a public class
            assert "Queue is full" in str(exc), exc
            outcomes.append("refused")
    assert outcomes.count("refused") >= 1 and outcomes.count("done") >= 2, outcomes
    assert text_to_image(client)[2] == ""  # and it still answers


# --- in the browser ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    with chromium(1280, 1000) as driver:
        yield driver


@pytest.mark.browser
def test_typed_prompt_shows_base_and_tuned_images(browser, page, served):
    tuned_in_place(served)
    open_page(browser, page)
    click(browser, "#text-go")  # nothing typed yet: a message, not a dead page
    wait_for_text(browser, "empty prompt")
    type_into(browser, "#text-prompt textarea", PROMPT)
    old = image_sources(browser)
    click(browser, "#text-go")
    for src in wait_for_new_images(browser, old):
        assert fetch_image(src).size == (SIDE, SIDE)
    assert browser.find_elements("css selector", "#component-0, .gradio-container")
    browser.save_screenshot(str(served / "page-text.png"))


@pytest.mark.browser
def test_photo_and_prompt_show_edited_images(browser, page, served):
    tuned_in_place(served)
    open_page(browser, page)
    tab = browser.find_element("xpath", "//button[@role='tab' and contains(., 'Photo')]")
    tab.click()
    browser.find_element("css selector", "#photo input[type=file]").send_keys(str(served / "photo.png"))
    wait(browser, lambda d: d.find_elements("css selector", "#photo img"))
    type_into(browser, "#photo-prompt textarea", "red silk dress")
    old = image_sources(browser)
    click(browser, "#photo-go")
    for src in wait_for_new_images(browser, old):
        assert fetch_image(src).size == (SIDE, SIDE)
    shown = wait(browser, lambda d: d.find_elements("css selector", "#image-source img"))  # the photo beside them
    assert fetch_image(shown[0].get_attribute("src")).size == Image.open(served / "photo.png").size
    browser.save_screenshot(str(served / "page-photo.png"))


def open_page(browser, url: str) -> None:
    browser.get(url)
    wait(browser, lambda d: d.find_elements("css selector", "#text-prompt textarea"))


def click(browser, selector: str) -> None:
    """Click ``selector`` once the page has rendered it (Gradio draws its components one by
    one: the prompt box can be there before the button is)."""
    [button] = wait(browser, lambda d: d.find_elements("css selector", selector))
    button.click()


def type_into(browser, selector: str, text: str) -> None:
    box = browser.find_element("css selector", selector)
    box.clear()
    box.send_keys(text)


def wait(browser, condition, seconds: float = WAIT):
    return wait_until(browser, condition, seconds)


def wait_for_text(browser, text: str) -> None:
    wait(browser, lambda d: text in d.find_element("tag name", "body").text)


def image_sources(browser) -> list[str]:
    return [
        img.get_attribute("src") for img in browser.find_elements("css selector", "#image-base img, #image-tuned img")
    ]


def wait_for_new_images(browser, old: list[str]) -> list[str]:
    """Both output images present and both different from ``old``."""

    def fresh(driver):
        now = image_sources(driver)
        return now if len(now) == 2 and not set(now) & set(old) else False

    return wait(browser, fresh)


def fetch_image(src: str) -> Image.Image:
    with urllib.request.urlopen(src, timeout=10) as resp:
        return Image.open(io.BytesIO(resp.read()))


def upload(url: str, path: Path) -> tuple[int, str]:
    """POST ``path`` to gradio's upload route as the page does; (status, body)."""
    import urllib.error

    boundary = "fashiondiff-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{path.name}"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{url}gradio_api/upload",
        data=body,
        method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
