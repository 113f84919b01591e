"""The tuned pipeline as an MLflow pyfunc model: prompt (+ photo) in, PNG images out.

Input, one row per request (only ``prompt`` is required; the rest default to the
sampling settings of the pipeline run that logged the model):

=============  ======  ==========================================================
``prompt``     string  what to draw, e.g. "black leather mini skirt"
``image``      string  base64 of a photo (PNG, JPEG, WebP): image + text -> image
``strength``   double  with ``image``: how far from the photo to go, (0, 1]
``seed``       long    image k uses seed + k (default 0)
``steps``      long    decoder denoising steps
``guidance``   double  decoder classifier-free guidance (1 = none)
``num_images`` long    images for this row (default 1)
=============  ======  ==========================================================

Output, one row per image: ``row`` (the input row), ``seed`` and ``image`` (base64 PNG).
A bad row fails the whole request with an INVALID_PARAMETER_VALUE error (HTTP 400)
naming the row and what is wrong; nothing is generated for it. Usage::

    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
      -d '{"dataframe_records": [{"prompt": "black leather mini skirt", "seed": 3}]}'

MLflow builds the model from ``mlflow_model.py`` (models from code: no pickle);
``context.artifacts`` holds the prior and decoder folders, ``context.model_config``
the sampling defaults.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema

from fashiondiff.errors import PipelineError
from fashiondiff.sampling import Sampling
from fashiondiff.serving.engine import Engine, Limits, Request, check_request
from fashiondiff.serving.images import b64decode_photo, open_photo, png_base64

INPUTS = {
    "prompt": "string",
    "image": "string",
    "strength": "double",
    "seed": "long",
    "steps": "long",
    "guidance": "double",
    "num_images": "long",
}
OUTPUTS = {"row": "long", "seed": "long", "image": "string"}
EXAMPLE_PROMPT = "black leather mini skirt"


def signature() -> ModelSignature:
    inputs = Schema([ColSpec(kind, name, required=name == "prompt") for name, kind in INPUTS.items()])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec(k, n) for n, k in OUTPUTS.items()]))


def input_example(steps: int) -> pd.DataFrame:
    """A text -> image request; MLflow also runs it once when logging, so ``steps`` keeps it short."""
    return pd.DataFrame([{"prompt": EXAMPLE_PROMPT, "seed": 0, "steps": steps, "guidance": 4.0, "num_images": 1}])


def model_config(sampling: Sampling) -> dict:
    """What ``load_context`` needs besides the folders: the sampling defaults."""
    return {"sampling": asdict(sampling)}


class KandinskyModel(PythonModel):
    """Prior + decoder loaded once per server process; generation one request at a time."""

    def load_context(self, context) -> None:
        self.defaults = Sampling(**context.model_config["sampling"])
        self.limits = Limits()
        self.engine = Engine(context.artifacts["prior"], context.artifacts["decoder"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        records = pd.DataFrame(model_input).to_dict("records")
        requests = []
        for i, record in enumerate(records):  # every row checked before anything is generated
            try:
                requests.append(self._request(record))
            except PipelineError as exc:
                raise MlflowException.invalid_parameter_value(f"row {i}: {exc}") from None
        rows = []
        for i, request in enumerate(requests):
            for k, image in enumerate(self.engine(request)):
                rows.append({"row": i, "seed": request.seed + k, "image": png_base64(image)})
        return pd.DataFrame(rows, columns=list(OUTPUTS))

    def _request(self, record: dict) -> Request:
        field = {k: v for k, v in record.items() if not _missing(v)}
        prompt = field.get("prompt")
        if not isinstance(prompt, str):
            raise PipelineError('prompt: missing; say what to draw, e.g. "black leather mini skirt"')
        source = None
        if "image" in field:
            source = open_photo(b64decode_photo(str(field["image"]), self.limits), self.limits)
        sampling = replace(
            self.defaults,
            steps=int(field.get("steps", self.defaults.steps)),
            guidance_scale=float(field.get("guidance", self.defaults.guidance_scale)),
            strength=float(field.get("strength", self.defaults.strength)),
        )
        request = Request(prompt, source, int(field.get("seed", 0)), int(field.get("num_images", 1)), sampling)
        check_request(request, self.limits)
        return request


def _missing(value) -> bool:
    """A column this row left out: absent, null, or NaN (pandas fills a missing number so)."""
    return value is None or (isinstance(value, float) and math.isnan(value))
