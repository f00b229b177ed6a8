"""The artifact contracts as code: each pipeline artifact is a folder with a marker file written last.

    FewShotSet    fewshot.json    classes.json, train/val/test manifests, the shots themselves
    Adapters      adapter.json    diffusers LoRA weights per class (or one for the dataset) + the index
    SyntheticSet  generate.json   images + manifest.jsonl (class, prompt, seed, adapter)
    Classifier    classifier.json CLIP LoRA + class head (safetensors), classes, model, preprocessing
    Metrics       metrics.json    top-1, top-5, per-class accuracy, confusion matrix (+ confusion.csv);
                                  in a pipeline also setting.json and a copy of the classifier

Nothing else in the package names these files: the stages write them through the constants here, and
the steps, the registry and the entry points read them through these classes. A folder without its
marker is unfinished, and opening it is a `UserError` naming the folder.

Layer: this module sits with `data` (it needs only io, errors and the manifest types), below the
stages, so that the stages that write an artifact and the steps that read it share one definition.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from datadream.errors import UserError

if TYPE_CHECKING:
    from datadream.data.manifest import ClassInfo

# The readers import what they need when called: `datadream --help` names the markers without loading more.

FEWSHOT_MARKER = "fewshot.json"
ADAPTERS_MARKER = "adapter.json"  # also the per-adapter metadata file inside each adapter folder
ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"  # each unit's LoRA weights (diffusers' file name)
SYNTHETIC_MARKER = "generate.json"
CLASSIFIER_MARKER = "classifier.json"
CLASSIFIER_LORA = "lora.safetensors"  # the best epoch's LoRA tensors
CLASSIFIER_HEAD = "head.safetensors"  # the class head (text embeddings) and logit scale
METRICS_MARKER = "metrics.json"

CLASSES_FILE = "classes.json"
SYNTHETIC_MANIFEST = "manifest.jsonl"
CONFUSION_FILE = "confusion.csv"
SETTING_FILE = "setting.json"
CLASSIFIER_COPY = "classifier"  # the classifier folder inside a pipeline's Metrics (register reads it)
SPLITS = ("train", "val", "test")
# Beside a step's output after a UserError: the one-line message, so a retry fails at once with it.
USER_ERROR_NOTE = ".user-error"


def split_manifest(folder: str | os.PathLike, split: str) -> Path:
    """`<folder>/<split>.jsonl`, the manifest of one split of a FewShotSet."""
    if split not in SPLITS:
        raise UserError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    return Path(folder) / f"{split}.jsonl"


@dataclass(frozen=True)
class _Artifact:
    """A finished artifact folder; `open` checks its marker, the constructor does not."""

    path: Path
    MARKER: ClassVar[str]
    WHAT: ClassVar[str]

    @classmethod
    def open(cls, path: str | os.PathLike):
        folder = Path(path)
        if not (folder / cls.MARKER).is_file():
            raise UserError(f"{folder}: no {cls.MARKER} (not a finished {cls.WHAT} output)")
        return cls(folder)

    @property
    def marker(self) -> Path:
        return self.path / self.MARKER

    @cached_property
    def meta(self) -> dict[str, Any]:
        """The marker file's content."""
        from datadream.io import read_json

        return read_json(self.marker)

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class FewShotSet(_Artifact):
    MARKER: ClassVar[str] = FEWSHOT_MARKER
    WHAT: ClassVar[str] = "fewshot"

    @property
    def classes_file(self) -> Path:
        return self.path / CLASSES_FILE

    def classes(self) -> list[ClassInfo]:
        from datadream.data.manifest import read_classes

        return read_classes(self.classes_file)

    def names(self) -> dict[str, str]:
        """Class slug -> display name."""
        return {c.slug: c.name for c in self.classes()}

    def manifest(self, split: str) -> Path:
        return split_manifest(self.path, split)

    @property
    def data_hash(self) -> str:
        """sha256 of the three manifests' hashes: downstream steps key their caches on content."""
        from datadream.io import sha256_json

        return sha256_json(self.meta["manifest_sha256"])


@dataclass(frozen=True)
class Adapters(_Artifact):
    MARKER: ClassVar[str] = ADAPTERS_MARKER
    WHAT: ClassVar[str] = "adapt"

    @property
    def index(self) -> dict[str, Any]:
        """The adapter index: mode, classes (slug -> adapter folder), prompts, weight_name, fingerprint."""
        return self.meta

    def units(self) -> set[str]:
        return set(self.index["classes"].values())

    def verify(self, units: set[str]) -> None:
        """Check the weights of `units` against the sha256 their adapter.json records (inside the folder,
        regular files, content unchanged); UserError naming the first file that fails."""
        from datadream.io import read_json, sha256_cached

        root = os.path.realpath(self.path)
        for unit in sorted(units):
            weights = self.path / unit / self.index.get("weight_name", ADAPTER_WEIGHTS)
            meta = read_json(self.path / unit / ADAPTERS_MARKER)
            real = os.path.realpath(weights)
            if not real.startswith(root + os.sep):
                raise UserError(f"{weights}: lies outside --adapters {self.path}")
            if not os.path.isfile(real):
                raise UserError(f"{weights}: missing or not a regular file; re-run adapt")
            if sha256_cached(real) != meta.get("weights_sha256"):
                raise UserError(f"{weights}: changed since adapt wrote it (sha256 differs from {unit}/adapter.json); "
                                "re-run adapt")


@dataclass(frozen=True)
class SyntheticSet(_Artifact):
    MARKER: ClassVar[str] = SYNTHETIC_MARKER
    WHAT: ClassVar[str] = "generate"

    @property
    def manifest(self) -> Path:
        return self.path / SYNTHETIC_MANIFEST


@dataclass(frozen=True)
class Classifier(_Artifact):
    MARKER: ClassVar[str] = CLASSIFIER_MARKER
    WHAT: ClassVar[str] = "classify"

    @property
    def best_val_top1(self) -> float | None:
        return self.meta.get("best_val_top1")

    def val_history(self) -> list[float | None]:
        return [h.get("val_top1") for h in self.meta.get("history", [])]


@dataclass(frozen=True)
class Metrics(_Artifact):
    MARKER: ClassVar[str] = METRICS_MARKER
    WHAT: ClassVar[str] = "evaluate"

    @property
    def confusion_csv(self) -> Path:
        return self.path / CONFUSION_FILE

    def setting(self) -> dict[str, str]:
        """The pipeline's label of the classifier scored here: train_on, mode, label."""
        from datadream.io import read_json

        return read_json(self.path / SETTING_FILE)

    @property
    def classifier(self) -> Classifier:
        """The classifier these metrics score, copied beside them by the pipeline's evaluate step."""
        return Classifier.open(self.path / CLASSIFIER_COPY)

    def attach(self, classifier: str | os.PathLike, setting: dict[str, str]) -> None:
        """Keep the scored classifier (a few MB: LoRA + head) and its label beside the metrics."""
        classifier = Classifier.open(classifier)
        import shutil

        from datadream.io import atomic_write_json

        copy = self.path / CLASSIFIER_COPY
        if copy.exists():
            shutil.rmtree(copy)
        shutil.copytree(classifier.path, copy)
        atomic_write_json(self.path / SETTING_FILE, setting)
