"""Model bundles: a trained head plus everything needed to label new images the same way.

A scikit-learn head is stored with skops (no pickle), a Keras head as a `.keras` file loaded with
`safe_mode=True` (no Python code in lambdas); so is a whole fine-tuned network (`keras-model`: image in,
class probabilities out), which then replaces both the backbone and the head. Either way its SHA-256 is
recorded in bundle.json and
checked before loading (the checked bytes are the ones deserialised), so an altered or swapped file
is refused rather than read.

The hash only guards against corruption: whoever hands over a bundle can rewrite bundle.json too. So
a bundle is untrusted input, and loading it may only build the exact types our heads are made of
(`SKOPS_TYPES`); anything else, above all a callable (`builtins.eval`, `numpy.load`, ...), is refused
by name before skops constructs a single object.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import shutil
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError, field_serializer, field_validator, model_validator

from transfer_flow.storage.atomic import atomic_path
from transfer_flow.storage.compiled_models import CachedFile
from transfer_flow.storage.content_keys import file_sha256
from transfer_flow.storage.errors import BundleError, OutputExistsError, first_problem
from transfer_flow.storage.extraction_record import ExtractionRecord, read_record, record_attrs

HEAD_FILE = "head.skops"
KERAS_HEAD_FILE = "head.keras"
KERAS_MODEL_FILE = "model.keras"
HEAD_FILES = {"skops": HEAD_FILE, "keras": KERAS_HEAD_FILE, "keras-model": KERAS_MODEL_FILE}
HeadFormat = Literal["skops", "keras", "keras-model"]
IMAGES_PER_CALL = 32  # a whole network's predict batch: images are far larger than feature rows
METADATA_FILE = "bundle.json"
# The backbone's converted model, carried where it cannot be made again from the bundle alone (int8: calibrated on
# the training images); exactly these names, in this folder of the bundle.
BACKBONE_DIR = "backbone"
BACKBONE_FILES = ("model.xml", "model.bin")
_PREVIOUS_EXTRACTION_FIELDS = ("backbone", "weights_source", "image_size", "pooling", "precision", "preprocessing",
                               "feature_dtype")
# Every type a scikit-learn head of ours is made of (tasks/heads.py: logreg, linear-svm, the sgd pipeline),
# by exact name, with the skops loader that builds it: classes and plain data only, never a function.
# A head of a new kind adds its classes here (tests/storage/test_model_bundle.py round-trips every head).
_DATA = ("DictNode", "ListNode", "TupleNode", "JsonNode", "TypeNode")
_ARRAYS = ("NdArrayNode",)
SKOPS_TYPES: dict[str, tuple[str, ...]] = {
    "builtins.dict": _DATA, "builtins.list": _DATA, "builtins.tuple": _DATA, "builtins.str": _DATA,
    "builtins.int": _DATA, "builtins.float": _DATA, "builtins.bool": _DATA, "builtins.NoneType": _DATA,
    "numpy.ndarray": _ARRAYS,
    **{f"numpy.{dtype}": _ARRAYS for dtype in ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                                                "uint8", "uint16", "uint32", "uint64", "bool", "bool_", "str_")},
    "sklearn.linear_model._logistic.LogisticRegression": ("ObjectNode",),
    "sklearn.svm._classes.LinearSVC": ("ObjectNode",),
    "sklearn.linear_model._stochastic_gradient.SGDClassifier": ("ObjectNode",),
    "sklearn.preprocessing._data.StandardScaler": ("ObjectNode",),
    "sklearn.pipeline.Pipeline": ("ObjectNode",),
    "sklearn._loss._loss.CyHalfBinomialLoss": ("LossNode",),
    "sklearn._loss._loss.CyHalfMultinomialLoss": ("LossNode",),
}


class BundleMetadata(BaseModel):
    extraction: ExtractionRecord = Field(description="How the training features were made; new images go the same way.")
    feature_dim: int
    class_names: list[str]
    head: str
    head_format: HeadFormat = Field(
        default="skops",
        description="How the head file is stored; keras-model: the whole network, preprocessed image in.")
    head_params: dict[str, Any] = Field(default_factory=dict)
    store_fingerprint: str
    stage_key: str = Field(default="", description="Cache key of the training that made this bundle.")
    training_summary: dict[str, Any] = Field(default_factory=dict, description="n_train, best_params, cv_score.")
    head_sha256: str = ""
    backbone_files: dict[str, CachedFile] = Field(
        default_factory=dict,
        description=f"The backbone's converted model carried in {BACKBONE_DIR}/ (int8 only: its calibration needs "
                    "the training images): file name → size and SHA-256.")
    created: str = ""
    library_versions: dict[str, str] = Field(default_factory=dict)

    @property
    def whole_model(self) -> bool:
        """The head is the whole network: it reads preprocessed images, not the store's features."""
        return self.head_format == "keras-model"

    @field_validator("backbone_files")
    @classmethod
    def _known_backbone_files(cls, files: dict[str, CachedFile]) -> dict[str, CachedFile]:
        if files and sorted(files) != sorted(BACKBONE_FILES):
            raise ValueError(f"Expected the backbone files {', '.join(BACKBONE_FILES)}, got {', '.join(sorted(files))}")
        return files

    @model_validator(mode="before")
    @classmethod
    def _previous_layout(cls, data: Any) -> Any:
        """bundle.json of the previous version: the extraction fields sat flat beside the others."""
        if isinstance(data, dict) and "extraction" not in data and "backbone" in data:
            data = dict(data)
            data["extraction"] = {key: data.pop(key) for key in _PREVIOUS_EXTRACTION_FIELDS if key in data}
        return data

    @field_validator("extraction", mode="before")
    @classmethod
    def _read_extraction(cls, value: Any) -> Any:
        return read_record(value) if isinstance(value, dict) else value

    @field_serializer("extraction")
    def _write_extraction(self, record: ExtractionRecord) -> dict[str, Any]:
        return record_attrs(record)  # the same flat keys as a store's attributes


class ModelBundle(BaseModel):
    """A saved bundle: where it is and what it holds."""

    path: str
    metadata: BundleMetadata

    @property
    def head_path(self) -> Path:
        return Path(self.path) / HEAD_FILES[self.metadata.head_format]


class KerasHead:
    """A Keras classifier seen as a scikit-learn one: predict (class indices) and predict_proba."""

    def __init__(self, model: Any, sha256: str, batch_size: int = 1024):
        self.model = model
        self.sha256_ = sha256  # what the registry fingerprints (trailing underscore: a fitted attribute)
        self.batch_size = batch_size

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Features (or, for a whole network, preprocessed images) → class probabilities."""
        return np.asarray(self.model.predict(np.asarray(features, np.float32), verbose=0, batch_size=self.batch_size))

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.argmax(self.predict_proba(features), axis=1)


def _is_keras_model(head: Any) -> bool:
    return any(cls.__module__.startswith("keras") and cls.__name__ in ("Model", "Sequential", "Functional")
               for cls in type(head).__mro__)


def _versions() -> dict[str, str]:
    names = ("transfer-flow", "scikit-learn", "keras", "tensorflow-cpu", "numpy", "skops")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def save_bundle(directory: Path, head: Any, bundle_metadata: BundleMetadata, *, overwrite: bool = False,
                backbone: Path | None = None) -> ModelBundle:
    """`backbone`: a folder holding the backbone's converted model (BACKBONE_FILES), copied into the bundle."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise OutputExistsError(f"Model bundle {directory} already exists (pass --overwrite to replace it)")
    head_format = "keras" if _is_keras_model(head) else "skops"
    if bundle_metadata.head_format == "keras-model":
        if head_format != "keras":
            raise BundleError(f"A keras-model bundle holds a Keras model, got {type(head).__name__}")
        head_format = "keras-model"
    with atomic_path(directory, overwrite=overwrite, is_dir=True) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        head_file = tmp / HEAD_FILES[head_format]
        if head_format != "skops":
            head.save(head_file)
        else:
            import skops.io as sio  # deferred: it imports scikit-learn's whole type registry (seconds)

            head_file.write_bytes(sio.dumps(head))
        carried = {}
        if backbone is not None:
            (tmp / BACKBONE_DIR).mkdir()
            for name in BACKBONE_FILES:
                copy = Path(shutil.copyfile(Path(backbone) / name, tmp / BACKBONE_DIR / name))
                carried[name] = CachedFile(size=copy.stat().st_size, sha256=file_sha256(copy))
        final = bundle_metadata.model_copy(update={
            "head_format": head_format,
            "head_sha256": hashlib.sha256(head_file.read_bytes()).hexdigest(),
            "backbone_files": carried,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "library_versions": _versions(),
        })
        (tmp / METADATA_FILE).write_text(final.model_dump_json(indent=2), encoding="utf-8")
    return ModelBundle(path=str(directory), metadata=final)


def copy_bundled_backbone(bundle: ModelBundle, destination: Path) -> None:
    """Copy the backbone's converted model the bundle carries into `destination`, each file's size checked before
    it is read and the copy's SHA-256 checked against bundle.json: what is used afterwards is the checked copy.
    BundleError (one line) when the bundle carries none, or a file is missing, of another size or content."""
    files = bundle.metadata.backbone_files
    if not files:
        raise BundleError(f"Bundle {bundle.path} carries no backbone model")
    for name, expected in files.items():
        if name not in BACKBONE_FILES:  # bundle.json is validated, but this is the last line before the disk
            raise BundleError(f"Bundle {bundle.path} lists {name!r} as a backbone file: refusing it")
        source = Path(bundle.path) / BACKBONE_DIR / name
        if source.is_symlink() or not source.is_file():
            raise BundleError(f"{source} is missing or not a plain file: the bundle is incomplete")
        if source.stat().st_size != expected.size:
            raise BundleError(f"{source} has {source.stat().st_size} bytes, {METADATA_FILE} records {expected.size}: "
                              "refusing to load it")
        copy = Path(shutil.copyfile(source, Path(destination) / name))
        if copy.stat().st_size != expected.size or file_sha256(copy) != expected.sha256:
            copy.unlink()
            raise BundleError(f"{source} does not match the hash recorded in {METADATA_FILE}: refusing to load it")


# A bundle's metadata is ~10 kB (a fine-tuned one's curves included); a larger file is not one of ours.
MAX_METADATA_BYTES = 4 * 2**20


def read_bundle_metadata(directory: Path) -> BundleMetadata:
    """The bundle's metadata, refused (BundleError) when missing, oversized or not what this version writes."""
    source = Path(directory) / METADATA_FILE
    if not source.is_file():
        raise BundleError(f"{directory} is not a model bundle: {METADATA_FILE} is missing")
    if source.stat().st_size > MAX_METADATA_BYTES:
        raise BundleError(f"{source} is {source.stat().st_size} bytes, more than a bundle's metadata can be "
                          f"({MAX_METADATA_BYTES}): refusing to read it")
    try:
        return BundleMetadata.model_validate_json(source.read_bytes())
    except ValidationError as error:
        raise BundleError(f"{source} is not a bundle this version can read: {first_problem(error)}") from None


def load_head(bundle: ModelBundle) -> Any:
    """The trained head, after checking its hash; a skops head must hold only scikit-learn/numpy types,
    a Keras head is loaded with safe_mode (no arbitrary code). Both answer predict and predict_proba or
    decision_function like a scikit-learn classifier."""
    source = bundle.head_path
    try:
        payload = source.read_bytes()
    except OSError as error:
        raise BundleError(f"{source} cannot be read ({error.strerror or error}): the bundle is incomplete") from None
    digest = hashlib.sha256(payload).hexdigest()
    if digest != bundle.metadata.head_sha256:
        raise BundleError(f"{source} does not match the hash recorded in {METADATA_FILE}: refusing to load it")
    if bundle.metadata.head_format != "skops":
        return KerasHead(_load_keras(payload, source), digest,
                         IMAGES_PER_CALL if bundle.metadata.whole_model else 1024)
    import skops.io as sio

    allowed = _skops_types(payload, source)
    try:
        return sio.loads(payload, trusted=sorted(allowed))
    except Exception as error:  # noqa: BLE001 - skops raises many kinds on a malformed file
        raise BundleError(f"{source} cannot be loaded: {_first_line(error)}") from error


def _skops_types(payload: bytes, source: Path) -> set[str]:
    """Every type the skops file names, checked against SKOPS_TYPES before anything is constructed."""
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            schema = json.loads(archive.read("schema.json"))
    except (zipfile.BadZipFile, KeyError, ValueError, EOFError) as error:
        raise BundleError(f"{source} is truncated or not a skops file ({_first_line(error)})") from None
    found: set[str] = set()
    pending: list[Any] = [schema]
    while pending:  # every dict in the schema, however deep: a node can hide anywhere
        node = pending.pop()
        if isinstance(node, list):
            pending += node
        elif isinstance(node, dict):
            pending += node.values()
            if "__class__" in node or "__loader__" in node:
                name = f"{node.get('__module__')}.{node.get('__class__')}"
                # A CachedNode only points back at an object already loaded (and checked) in this file.
                loaders = SKOPS_TYPES.get(name)
                if loaders is None or node.get("__loader__") not in (*loaders, "CachedNode"):
                    raise BundleError(f"{source} holds {name} ({node.get('__loader__')}), which no head of "
                                      "transfer-flow contains: refusing to load it (a bundle is untrusted input)")
                found.add(name)
    return found


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _load_keras(payload: bytes, source: Path) -> Any:
    """Load the very bytes whose hash was checked (a private copy: the file cannot change in between).

    A .keras file is a zip; every member's CRC is checked first, because Keras (through h5py) can crash
    the process outright on damaged weights."""
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as error:
        raise BundleError(f"{source} is truncated or not a .keras file ({_first_line(error)}): "
                          "copy the bundle again") from None
    except Exception as error:  # noqa: BLE001 - zlib and zipfile raise various errors on damaged members
        raise BundleError(f"{source} is damaged ({_first_line(error)}): copy the bundle again") from None
    if damaged is not None:
        raise BundleError(f"{source} is damaged ({damaged} fails its checksum): copy the bundle again")
    import keras

    with tempfile.TemporaryDirectory(prefix="transfer-flow-head-") as folder:
        copy = Path(folder) / source.name
        copy.write_bytes(payload)
        try:
            return keras.saving.load_model(copy, compile=False, safe_mode=True)
        except Exception as error:  # noqa: BLE001 - Keras raises many kinds on a malformed or unsafe file
            raise BundleError(f"The Keras head cannot be loaded safely: {str(error).splitlines()[0][:200]}") from error


def head_matches(bundle: ModelBundle) -> bool:
    """The head file is there and is the one bundle.json describes."""
    head = bundle.head_path
    return head.is_file() and hashlib.sha256(head.read_bytes()).hexdigest() == bundle.metadata.head_sha256


def load_bundle(directory: Path) -> ModelBundle:
    return ModelBundle(path=str(directory), metadata=read_bundle_metadata(directory))
