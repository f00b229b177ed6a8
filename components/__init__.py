"""KFP components: one thin lightweight component per DataDream stage.

`build(image)` wraps the functions of `components.stages` with `dsl.component(base_image=image,
install_kfp_package=False)`: the image (docker/) carries kfp and `datadream`; the functions import
what they need inside their bodies, as lightweight components must.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

from datadream import __version__

# The one place the image reference is set; `datadream pipeline compile --image` or $DATADREAM_IMAGE
# override it at compile time.
DEFAULT_IMAGE = f"ghcr.io/datadream/datadream:{__version__}"
STEPS = ("fewshot", "adapt", "generate", "gather", "gather_adapters", "classify", "evaluate", "summarize", "register",
         "tune_prepare", "tune_worker", "tune_best", "finish")


def image_reference() -> str:
    return os.environ.get("DATADREAM_IMAGE") or DEFAULT_IMAGE


def build(image: str) -> SimpleNamespace:
    """The components, all running in `image`."""
    from kfp import dsl

    from components import stages

    if not image or not image.strip() or any(c.isspace() for c in image):
        from datadream.errors import UserError

        raise UserError(f"--image {image!r}: expected a container image reference, e.g. {DEFAULT_IMAGE}")
    return SimpleNamespace(**{
        name: dsl.component(getattr(stages, name), base_image=image, install_kfp_package=False) for name in STEPS
    })
