"""Regenerate the README's pictures, reports/figures/*.png, from the current pipeline outputs.

Usage: python tools/readme_figures.py [--out reports/figures] [--only NAME ...]     (make figures)

Needs `make repro` (models/, data/extracted/) and, for the MLflow pictures, at least two
pipeline runs in the tracking store (the README's two `dvc exp run -S lr=...`); the browser
pictures need Debian's chromium and chromium-driver (`make browser`). Writes:

- generate_examples.png: `fashiondiff generate`'s library call with the tuned model (models/),
  the method's prompt at seeds 0-3, and a held-out catalogue photo (a green sweater) plus
  "Red sweater" (img2img at generate's default strength); sampling settings from params.yaml.
  The same pixels on every run on one machine and thread count.
- mlflow_runs.png: the address `fashiondiff ui` prints (the pipeline runs view), in headless
  Chromium; mlflow_compare.png: the two newest pipeline runs ticked, *Compare* pressed. First
  checked (`--check` alone): those two are the README's `-S lr=0.001` and `-S lr=0.00025`, and
  every param they hold is a params.yaml name.
- serve_page.png: `fashiondiff serve`, the photo tab with the same photo and "Red sweater",
  after one generation.

The browser pictures show run names and times, so they differ from run to run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from fashiondiff.processes import free_port, printed_word, project_env, running

PROMPT = "black leather mini skirt"  # the method's prompt (evaluate's image + text figure)
PHOTO = "data/extracted/validation/images/0000000.png"  # a held-out catalogue photo
EDIT_PROMPT = "Red sweater"
SEEDS = (0, 1, 2, 3)
CELL = 128  # pixels per image in generate_examples.png (the tiny model draws 64)
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BROWSER_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--hide-scrollbars",
)
WAIT_S = 120
NAMES = ("generate_examples", "mlflow", "serve_page")


def generate_examples(out: Path) -> None:
    from PIL import Image

    from fashiondiff.commands.generate import defaults, generate
    from fashiondiff.evaluate.figures import beside, fit, titled

    sampling = defaults("params.yaml")
    with tempfile.TemporaryDirectory(prefix="figures-") as work:
        texts = generate(
            PROMPT,
            "models/prior",
            "models/decoder",
            Path(work) / "text",
            seed=SEEDS[0],
            num_images=len(SEEDS),
            sampling=sampling,
            quiet=True,
        )
        [edit] = generate(
            EDIT_PROMPT,
            "models/prior",
            "models/decoder",
            Path(work) / "edit.png",
            source=PHOTO,
            sampling=sampling,
            quiet=True,
        )
        text_row = beside([fit(Image.open(p).convert("RGB"), CELL) for p in texts])
        edit_row = beside([fit(Image.open(p).convert("RGB"), CELL) for p in (PHOTO, edit)])
    figure = beside(
        [
            titled(f'text -> image: "{PROMPT}" (seeds {SEEDS[0]}-{SEEDS[-1]})', text_row),
            titled(f'photo + "{EDIT_PROMPT}" -> image (strength {sampling.strength:g})', edit_row),
        ]
    )
    figure.save(out / "generate_examples.png")


COMPARED_LRS = {"0.001", "0.00025"}  # the README's two experiments: docs/mlflow-ui.md's caption names them


def check_runs(params_path: str = "params.yaml") -> list[str]:
    """The two newest pipeline runs, the ones the MLflow pictures show, checked against their
    caption and params.yaml: the README's two learning rates, and every param a name params.yaml
    has (no run of an older params layout). Returns their names; exits with one line otherwise."""
    import mlflow

    from fashiondiff.config.whole import load_params
    from fashiondiff.tracking import TAG_ROLE, resolve_tracking_uri

    params = load_params(params_path)
    client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(params.mlflow.tracking_uri))
    exp = client.get_experiment_by_name(params.mlflow.experiment)
    runs = (
        client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{TAG_ROLE}` = 'pipeline'",
            order_by=["attributes.start_time DESC"],
            max_results=2,
        )
        if exp
        else []
    )
    names = set(params.flat())
    unknown = sorted({k for r in runs for k in r.data.params} - names)
    lrs = {r.data.params.get("lr") for r in runs}
    if len(runs) < 2 or lrs != COMPARED_LRS or unknown:
        sys.exit(
            f"error: the two newest pipeline runs in {params.mlflow.tracking_uri} must be the README's "
            f"`dvc exp run -S lr=0.001` and `-S lr=0.00025` with params.yaml's names; found "
            f"{[(r.info.run_name, r.data.params.get('lr')) for r in runs]}"
            + (f", params params.yaml has not: {', '.join(unknown[:5])}" if unknown else "")
        )
    return [r.info.run_name for r in runs]


def mlflow_pictures(out: Path) -> None:
    print(f"figures: mlflow pictures of {' and '.join(check_runs())}", flush=True)
    port = free_port()
    with served(
        [sys.executable, "-m", "fashiondiff", "ui", "--port", str(port)], f"http://127.0.0.1:{port}/", "#/experiments/"
    ) as address:
        with chromium(1600, 640) as browser:
            browser.get(address.split("#")[0])
            # a browser that chose the sidebar's "Model training" once, as the README says: the
            # compare page (whose address MLflow builds without workflowType) keeps that layout
            browser.execute_script("localStorage.setItem('mlflow.workflowType_v1', JSON.stringify('machine_learning'))")
            browser.get(address)
            wait(browser, lambda d: d.find_elements("css selector", "div[role='row'] [col-id='params.`lr`']"))
            close_assistant(browser)
            time.sleep(2)  # the grid settles its column widths
            save_screenshot(browser, out / "mlflow_runs.png")
            for index in (0, 1):  # newest first: the two latest pipeline runs (their stage runs are folded)
                browser.find_element(
                    "css selector", f"div[role='row'][row-index='{index}'] .ag-selection-checkbox input"
                ).click()
            compare = wait(
                browser,
                lambda d: [
                    b for b in d.find_elements("tag name", "button") if b.text.strip() == "Compare" and b.is_enabled()
                ],
            )
            compare[0].click()
            wait(browser, lambda d: "compare-runs" in d.current_url)
            wait(browser, lambda d: d.find_elements("xpath", "//*[normalize-space()='Visualizations']"))[0].click()
            for switch in browser.find_elements("css selector", "[role='switch']"):  # "Show diff only": params, metrics
                switch.click()
            for entry in browser.find_elements("xpath", "//*[normalize-space()='grid.png']"):  # preview both grids
                with contextlib.suppress(Exception):
                    entry.click()
                    break
            browser.set_window_size(1600, 1500)  # folded plots: the params and metrics that differ, the grids
            time.sleep(3)
            close_assistant(browser)
            heading = browser.find_elements("xpath", "//*[normalize-space()='Parameters']")
            if heading:
                browser.execute_script("arguments[0].scrollIntoView()", heading[0])
            time.sleep(1)
            save_screenshot(browser, out / "mlflow_compare.png")


def serve_page(out: Path) -> None:
    port = free_port()
    with served([sys.executable, "-m", "fashiondiff", "serve", "--port", str(port)], f"http://127.0.0.1:{port}/"):
        with chromium(1200, 1120) as browser:
            browser.get(f"http://127.0.0.1:{port}/")
            wait(browser, lambda d: d.find_elements("css selector", "#text-prompt textarea"))
            browser.find_element("xpath", "//button[@role='tab' and contains(., 'Photo')]").click()
            browser.find_element("css selector", "#photo input[type=file]").send_keys(str(Path(PHOTO).resolve()))
            wait(browser, lambda d: d.find_elements("css selector", "#photo img"))
            box = browser.find_element("css selector", "#photo-prompt textarea")
            box.clear()
            box.send_keys(EDIT_PROMPT)
            browser.find_element("css selector", "#photo-go").click()
            wait(browser, lambda d: len(d.find_elements("css selector", "#image-base img, #image-tuned img")) == 2)
            time.sleep(1)
            save_screenshot(browser, out / "serve_page.png")


# --- helpers --------------------------------------------------------------------------------


@contextlib.contextmanager
def served(cmd: list[str], url: str, marker: str = "") -> Iterator[str]:
    """``cmd`` started with the project's environment, once ``url`` answers; yield the first word
    it printed that contains ``marker`` (an address), else ``url``; stopped with its children at exit."""
    with tempfile.TemporaryDirectory(prefix="figures-") as folder:
        log = Path(folder) / "server.log"
        with running(cmd, url, WAIT_S, log, grace_s=30, env=project_env()) as proc:
            yield printed_word(log, marker, proc, WAIT_S) if marker else url


@contextlib.contextmanager
def chromium(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*BROWSER_FLAGS, f"--window-size={width},{height}"):
        options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def wait(driver, condition, seconds: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.2).until(condition)


def save_screenshot(browser, path: Path) -> None:
    """The window as a 256-colour PNG: a screenshot is mostly flat colour, a quarter the bytes."""
    import io

    from PIL import Image

    shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    shot.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def close_assistant(browser) -> None:
    """MLflow 3.17 opens its assistant panel on a first visit; close it (its x) if open."""
    for button in browser.find_elements("css selector", "[data-component-id='mlflow.assistant.chat_panel.close']"):
        with contextlib.suppress(Exception):
            button.click()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/figures", help="where the pictures go")
    parser.add_argument("--only", nargs="*", choices=NAMES, help="only these pictures")
    parser.add_argument(
        "--check",
        action="store_true",
        help="only check that the MLflow pictures would show the runs their caption names",
    )
    args = parser.parse_args()
    if args.check:
        print(" ".join(check_runs()))
        return
    for needed in ("models/prior", "models/decoder", PHOTO):
        if not Path(needed).exists():
            sys.exit(f"error: {needed}: missing; run `make repro` first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.only or NAMES:
        {"generate_examples": generate_examples, "mlflow": mlflow_pictures, "serve_page": serve_page}[name](out)
        print(f"figures: {name} done", flush=True)


if __name__ == "__main__":
    main()
