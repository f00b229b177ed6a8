"""The CLIP LoRA classifier as an MLflow pyfunc model, logged *from code* (no cloudpickle).

`datadream.registry.register_classifier` logs this file as `python_model=` with the artifacts

    classifier     the classify output folder (lora.safetensors, head.safetensors, classifier.json)
    base_weights   only for a base CLIP other than `tiny`: the open_clip weights, a `.safetensors` file
                   (for an open_clip model name) or a `local-dir:` folder, so serving never downloads

and the `datadream` package itself as `code_paths`. `models.clip: tiny` needs no weights artifact: the
tiny CLIP is rebuilt deterministically from its config into the model cache ($DATADREAM_CACHE or
~/.cache/datadream), which must therefore be writable in the serving container.

Input: a DataFrame with a string column `image`; each value is either a local file path (used only if
such a file exists) or the base64-encoded bytes of a JPEG, PNG or WEBP. Every image goes through the
same strict checks as training data (datadream.data.images): allow-listed formats, pixel cap, full
decode. Output, one row per input row:

    label          the top-1 class slug
    name           its display name
    probability    its probability
    probabilities  list of floats, one per class in the classifier's class order (the MLmodel's
                   metadata `classes` lists the slugs in that order); a list rather than one column per
                   class keeps the schema fixed whatever the classes are called
    model_version  the registry version that answered, from $DATADREAM_MODEL_VERSION, which the
                   serving Deployment sets beside the pinned model URI (datadream.serving.manifests);
                   null when the model is loaded some other way. During a rolling update a client
                   sees it change once every pod serves the new version.

An unusable image fails the whole request with an error naming its row (HTTP 400 when served).
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

INPUT_COLUMN = "image"
OUTPUT_COLUMNS = ("label", "name", "probability", "probabilities", "model_version")
MODEL_VERSION_ENV = "DATADREAM_MODEL_VERSION"  # datadream.serving.manifests.MODEL_VERSION_ENV
# Artifact keys; datadream.registry logs the artifacts under these names.
CLASSIFIER_ARTIFACT = "classifier"
BASE_WEIGHTS_ARTIFACT = "base_weights"
BATCH_SIZE = 32


def _bad_input(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def decode_image(value: Any, row: int):
    """One cell of the `image` column -> RGB PIL image: an existing local file, else base64 bytes."""
    from datadream.data.images import ImageRejected, load_rgb

    try:
        if isinstance(value, bytes | bytearray):
            return load_rgb(f"row {row}", data=bytes(value))
        if not isinstance(value, str) or not value:
            raise _bad_input(f"row {row}: column {INPUT_COLUMN!r} must be a file path or base64 image bytes, "
                             f"got {type(value).__name__}")
        # A path only if such a file exists (an image's base64 text is never a real path); anything
        # else must be base64, so a mistyped path fails as "neither", not as a corrupt image.
        if _is_file(value):
            return load_rgb(value)
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _bad_input(f"row {row}: {value[:80]!r} is neither an existing file nor base64 image bytes") \
                from None
        return load_rgb(f"row {row}", data=data)
    except ImageRejected as e:
        raise _bad_input(f"row {row}: image rejected: {e}") from None


def _is_file(value: str) -> bool:
    try:
        return len(value) < 4096 and os.path.isfile(value)
    except (ValueError, OSError):  # e.g. an embedded NUL byte
        return False


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around `datadream.stages.evaluate.Classifier` (see the module docstring)."""

    def load_context(self, context) -> None:
        import torch

        from datadream.artifacts import CLASSIFIER_MARKER as MARKER
        from datadream.config import ModelsConfig
        from datadream.io import read_json
        from datadream.stages.evaluate import load_classifier

        folder = context.artifacts[CLASSIFIER_ARTIFACT]
        override = None
        weights = context.artifacts.get(BASE_WEIGHTS_ARTIFACT)
        if weights:
            recorded = read_json(os.path.join(folder, MARKER))["model"]
            if os.path.isdir(weights):  # an open_clip folder (config + weights), i.e. models.clip: local-dir:
                override = ModelsConfig(clip=f"local-dir:{weights}", clip_pretrained=None)
            else:  # the weights of a named open_clip architecture
                override = ModelsConfig(clip=recorded["clip"], clip_pretrained=weights)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.classifier = load_classifier(folder, override, device)
        self.model_version = os.environ.get(MODEL_VERSION_ENV) or None

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if INPUT_COLUMN not in model_input.columns:
            raise _bad_input(f"input needs a column {INPUT_COLUMN!r}; got {list(model_input.columns)}")
        clf = self.classifier
        values = model_input[INPUT_COLUMN].tolist()
        rows = []
        for start in range(0, len(values), BATCH_SIZE):
            batch = [decode_image(v, start + i) for i, v in enumerate(values[start:start + BATCH_SIZE])]
            probs = clf.predict_proba(batch)
            for p in probs:
                top = int(p.argmax())
                info = clf.classes[top]
                rows.append({"label": info.slug, "name": info.name, "probability": float(p[top]),
                             "probabilities": [float(x) for x in p],
                             "model_version": getattr(self, "model_version", None)})
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


mlflow.models.set_model(ClassifierModel())
