"""The tuned pipeline as an MLflow model: logged and registered by the `register` stage's code
(sqlite store, as the embedded default), then served by a real `mlflow models serve
--env-manager local` on a free loopback port and asked over HTTP, as the README says."""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, replaced
from PIL import Image
from serving_fixtures import PROMPT, SIDE

from fashiondiff.config.view import ParamsView, declared_params, stage_params
from fashiondiff.config.whole import load_params
from fashiondiff.processes import free_port, project_env, running
from fashiondiff.sampling import Sampling
from fashiondiff.serving.registry import log_model
from fashiondiff.tracking import Tracker, stage_run

pytestmark = [
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy"),
    pytest.mark.filterwarnings("ignore:Operation with range is deprecated"),
]  # mlflow's, with pandas 3
NAME = "fashiondiff-kandinsky"


@pytest.fixture(scope="module")
def registered(served) -> str:
    """The register stage's work in-process, in ``served`` (not a git repository)."""
    from fashiondiff.serving.register import register

    with pytest.MonkeyPatch.context() as patch:  # tracking on, in ``served``; both undone after
        patch.delenv("FASHIONDIFF_TRACKING", raising=False)
        patch.chdir(served)
        params = stage_params("register", served / "params.yaml", root=REPO)
        assert params.serve.registered_model == NAME
        with stage_run("register", params) as tracker:
            return register(served / "models", params, tracker)


@pytest.fixture(scope="module")
def endpoint(served, registered, tmp_path_factory):
    port = free_port()
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "models",
        "serve",
        "-m",
        f"models:/{NAME}/{registered}",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    log = tmp_path_factory.mktemp("mlflow-serve") / "serve.log"
    with running(
        cmd,
        f"http://127.0.0.1:{port}/ping",
        log=log,
        cwd=served,
        env=project_env(MLFLOW_TRACKING_URI=f"sqlite:///{served / 'mlflow.db'}"),
    ):
        yield f"http://127.0.0.1:{port}/invocations"


def test_the_model_is_registered_with_signature_example_and_the_pipeline_tags(served, registered):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{served / 'mlflow.db'}")
    version = client.get_model_version(NAME, registered)
    assert registered == "1"
    assert version.tags["mlflow.source.git.commit"] == "unknown"  # served/ is no git repository
    assert version.tags["dvc.exp_name"] == "local"
    run = client.get_run(version.run_id)
    assert run.data.tags["fashiondiff.stage"] == "register" and run.data.metrics["model_version"] == 1
    parent = client.get_run(version.tags["fashiondiff.pipeline_run"])
    assert parent.data.metrics["register.model_version"] == 1
    assert parent.data.tags["fashiondiff.pipeline_key"] == version.tags["fashiondiff.pipeline_key"]

    info = mlflow.models.get_model_info(f"models:/{NAME}/{registered}")
    assert [c["name"] for c in info.signature.inputs.to_dict()] == [
        "prompt",
        "image",
        "strength",
        "seed",
        "steps",
        "guidance",
        "num_images",
    ]
    assert info.saved_input_example_info is not None
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{registered}"))
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert "mlflow_model.py" in files and "code/fashiondiff/serving/pyfunc.py" in files
    assert {"artifacts/prior/model_index.json", "artifacts/decoder/unet/config.json"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pyc", ".pyi"))]  # models from code: nothing pickled
    config = json.loads(json.dumps(info.flavors["python_function"]["config"]))
    sampling = config["sampling"]
    assert sampling["steps"] == 4 and sampling["strength"] == 0.3 and sampling["height"] == SIDE


def test_the_same_folders_are_not_registered_twice(served, registered, capsys):
    from fashiondiff.serving.register import register

    cwd = os.getcwd()
    os.chdir(served)
    try:
        params = stage_params("register", served / "params.yaml", root=REPO)
        with stage_run("register", params) as tracker:
            assert register(served / "models", params, tracker) == registered
    finally:
        os.chdir(cwd)
    assert f"byte for byte {NAME} version {registered}: not registered again" in capsys.readouterr().err


def test_a_model_that_fails_its_input_example_is_not_registered(served, tmp_path):
    """MLflow only logs a warning when the input example fails; the stage must fail instead."""
    from fashiondiff.errors import PipelineError
    from fashiondiff.serving import pyfunc
    from fashiondiff.serving.register import ENTRY

    broken = tmp_path / "decoder"
    broken.mkdir()  # no model_index.json: load_context fails
    params = load_params(served / "params.yaml")
    uri = f"sqlite:///{served / 'mlflow.db'}"
    with stage_run("register", params, tracking_uri=uri) as tracker:
        with pytest.raises(PipelineError, match="the logged model fails its input example: .*decoder"):
            log_model(
                tracker,
                ENTRY,
                "broken-model",
                {},
                artifacts={"prior": str(served / "models/prior"), "decoder": str(broken)},
                signature=pyfunc.signature(),
                input_example=pyfunc.input_example(2),
                pip_requirements=[],
                model_config=pyfunc.model_config(Sampling()),
            )
    import mlflow

    assert not mlflow.MlflowClient(uri).search_registered_models("name = 'broken-model'")


def test_a_pipeline_over_the_size_cap_is_not_logged(served, capsys):
    from fashiondiff.serving.register import register

    params = load_params(served / "params.yaml")
    never = replaced(params, serve=replaced(params.serve, max_log_mb=0.0))
    view = ParamsView(never, "register", frozenset(declared_params("register", REPO)))
    assert register(served / "models", view, Tracker("register")) == ""
    assert "over serve.max_log_mb 0: not logged (raise serve.max_log_mb" in capsys.readouterr().err


def test_the_served_model_answers_with_png_images(endpoint, served):
    status, body = post(endpoint, {"dataframe_records": [{"prompt": PROMPT, "seed": 5, "steps": 2, "num_images": 2}]})
    assert status == 200, body
    rows = body["predictions"]
    assert [(r["row"], r["seed"]) for r in rows] == [(0, 5), (0, 6)]
    images = [decode(r["image"]) for r in rows]
    assert all(im.format == "PNG" and im.size == (SIDE, SIDE) for im in images)
    assert images[0].tobytes() != images[1].tobytes()
    photo = base64.b64encode((served / "photo.png").read_bytes()).decode()
    status, body = post(
        endpoint, {"inputs": {"prompt": ["a red skirt"], "image": [photo], "strength": [0.6], "steps": [4]}}
    )
    assert status == 200, body
    assert decode(body["predictions"][0]["image"]).size == (SIDE, SIDE)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "   "}, "row 0: empty prompt"),
        ({"prompt": PROMPT, "image": "%%% not base64"}, "row 0: image: not base64"),
        (
            {"prompt": PROMPT, "image": base64.b64encode(b"plain text, no picture").decode()},
            "row 0: that upload is not an image",
        ),
        ({"prompt": PROMPT, "image": "A" * (15 << 20)}, r"row 0: photo is 11.2 MB: the limit is 10 MB"),
        ({"prompt": PROMPT, "steps": 5000}, "row 0: steps must be between 1 and 1000"),
        ({"steps": 2}, "Model is missing inputs"),
    ],
)
def test_bad_requests_get_a_400_with_a_reason_and_the_next_one_works(endpoint, record, message):
    status, body = post(endpoint, {"dataframe_records": [{"steps": 2, **record}]})
    assert status == 400 and message in body["message"], body
    status, body = post(endpoint, {"dataframe_records": [{"prompt": PROMPT, "steps": 2}]})
    assert status == 200 and len(body["predictions"]) == 1


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def decode(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image
