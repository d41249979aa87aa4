"""Base models fetched by name from the Hugging Face Hub or a mirror of it (`HF_ENDPOINT`), through the
`huggingface_hub` client. The web tier looks a model up before anything is downloaded (its size, licence,
whether it is gated, whether Tuneboard can train it, whether the disk has room) and keeps the Hub tokens;
a worker downloads (worker/download.py) into the ordinary Hugging Face cache, where other tools find it
too and from where the Models page lists it (app.model_registry).

A token is kept per hub address in the data folder (readable by the server's user only), never shown or
logged, and given only to calls to the address it was saved for: every call names its token, or `False`
for none, so that the client's own token lookup (HF_TOKEN, the login file) never sends one anywhere else.
The client itself keeps a token on a redirect to the Hub's own hosts (huggingface.co, hf.co), so a mirror
that redirected there would pass on the mirror's token: `guard_tokens` makes every request of the client
to any other origin than the hub's leave without it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from app.config import Settings
from app.model_registry import is_causal_lm
from app.units import filesize

# A model id as the Hub spells them: an optional owner, a name; letters, digits, - _ .
REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}$")
# The files a model needs: its configuration, tokenizer and chat template, and its weights in one format
# (safetensors, else PyTorch's); never other formats (ONNX, GGUF, TensorFlow, Flax) or the copies some
# repositories keep in subfolders.
CONFIG_FILES = (
    "*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt", "*.jinja", "spiece.model",
)  # fmt: skip
SAFETENSORS, PYTORCH = ("*.safetensors",), ("pytorch_model*.bin",)
SAFETENSORS_INDEX = "model.safetensors.index.json"
TIMEOUT = 20.0  # seconds for the Hub to answer a lookup
# Where a model may be fetched from by name: the Hugging Face Hub (or the mirror HF_ENDPOINT names), or
# ModelScope (app.modelscope).
HUGGINGFACE, MODELSCOPE = "huggingface", "modelscope"
SOURCES = {HUGGINGFACE: "Hugging Face Hub", MODELSCOPE: "ModelScope"}


class HubProblem(Exception):
    """A sentence for the user about a model id, a token or the Hub itself."""


@dataclass
class HubModel:
    repo_id: str
    revision: str
    commit: str
    endpoint: str
    files: dict[str, int]  # the files Tuneboard downloads, with their sizes
    license: str | None
    gated: bool
    architecture: str | None
    refusal: str | None  # why Tuneboard cannot train it, when it cannot
    disk_free: int | None
    others: int = 0  # files left out (other formats, duplicates)
    access: bool | None = None  # gated: whether the saved token may fetch its files (None: not known)
    source: str = "huggingface"  # huggingface (the Hub or a mirror of it) | modelscope

    @property
    def where(self) -> str:
        return site_name(self.source, self.endpoint)

    @property
    def size(self) -> int:
        return sum(self.files.values())

    @property
    def fits_disk(self) -> bool:
        return self.disk_free is None or self.size <= self.disk_free


def endpoint() -> str:
    """The hub this server downloads from: huggingface.co, or the mirror HF_ENDPOINT names."""
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def hub_name(url: str) -> str:
    return "the Hugging Face Hub" if url == "https://huggingface.co" else url


def capital(text: str) -> str:
    """A name opening a sentence ("the Hugging Face Hub …")."""
    return text[:1].upper() + text[1:]


def source_endpoint(source: str) -> str:
    """The address this server fetches from for a source (SOURCES)."""
    if source == MODELSCOPE:
        from app import modelscope

        return modelscope.endpoint()
    return endpoint()


def site_name(source: str, url: str) -> str:
    """A source's site, named for a sentence."""
    if source == MODELSCOPE:
        from app import modelscope

        return modelscope.site_name(url)
    return hub_name(url)


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_folder(repo_id: str) -> Path:
    """A model's folder in the Hugging Face cache (blobs, refs, snapshots), named as the client names it."""
    from huggingface_hub.file_download import repo_folder_name

    return cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model")


# --- tokens -----------------------------------------------------------------------------------------------

_guarded: list[str | None] = []  # the hub the guard was installed for (None: this server's, as it is now)


def _origin(url: str) -> tuple[str, str, int | None]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def guard_tokens(hub: str | None = None) -> None:
    """Make the client's requests carry a token to `hub` only (None: the hub this server uses, read at each
    request): on every request to another origin — a redirect to the Hub's own hosts included, where the
    client would keep it — the Authorization header is dropped. The client's own request hooks stay; the
    client's shared session is rebuilt with this one added. Installed once per process (the last hub
    given wins)."""
    import httpx2
    from huggingface_hub import get_session, set_client_factory

    if _guarded:
        _guarded[0] = hub
        return
    hooks = get_session().event_hooks
    _guarded.append(hub)

    def only_to_the_hub(request: httpx2.Request) -> None:
        allowed = (_guarded[0] if _guarded else None) or endpoint()
        if "authorization" in request.headers and _origin(str(request.url)) != _origin(allowed):
            del request.headers["authorization"]

    def client() -> httpx2.Client:
        return httpx2.Client(
            event_hooks={"request": [*hooks["request"], only_to_the_hub], "response": [*hooks["response"]]},
            follow_redirects=True,
            timeout=None,
        )

    set_client_factory(client)


def _tokens_file(settings: Settings) -> Path:
    return settings.data_dir / "secrets" / "hub-tokens.json"


def _read_tokens(settings: Settings) -> dict[str, str]:
    try:
        tokens = json.loads(_tokens_file(settings).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in tokens.items() if isinstance(k, str) and isinstance(v, str)}


def token_for(settings: Settings, url: str) -> str | bool:
    """The token saved for `url`, or False: no token at all (not the client's own lookup)."""
    return _read_tokens(settings).get(url.rstrip("/")) or False


def has_token(settings: Settings, url: str) -> bool:
    return bool(token_for(settings, url))


def _write_tokens(settings: Settings, tokens: dict[str, str]) -> None:
    path = _tokens_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".hub-tokens-")  # mode 0600
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        json.dump(tokens, out)
    os.replace(temporary, path)


def save_token(settings: Settings, url: str, token: str, source: str = HUGGINGFACE) -> str:
    """Check `token` with the hub at `url` and keep it for that hub; returns the account's name."""
    token = token.strip()
    if not re.fullmatch(r"[A-Za-z0-9_-]{8,200}", token):
        example = "ms-… letters, digits and dashes" if source == MODELSCOPE else "hf_… letters and digits"
        raise HubProblem(f"That does not look like a {SOURCES.get(source, 'hub')} token ({example}).")
    if source == MODELSCOPE:
        from app import modelscope

        name = modelscope.whoami(url, token)
    else:
        from huggingface_hub import HfApi

        try:
            name = str(HfApi(endpoint=url).whoami(token=token).get("name") or "your account")
        except Exception as exc:  # noqa: BLE001 - every failure becomes its sentence
            raise HubProblem(_sentence(exc, url, what="the token")) from None
    _write_tokens(settings, _read_tokens(settings) | {url.rstrip("/"): token})
    return name


def forget_token(settings: Settings, url: str) -> None:
    tokens = _read_tokens(settings)
    if tokens.pop(url.rstrip("/"), None) is not None:
        _write_tokens(settings, tokens)


# --- looking a model up -----------------------------------------------------------------------------------


def check_id(repo_id: str, revision: str | None, default: str = "main") -> tuple[str, str]:
    repo_id, revision = repo_id.strip(), (revision or "").strip() or default
    if not REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise HubProblem(
            f"{repo_id[:100]!r} is not a model id: write it as the Hub shows it, such as "
            "Qwen/Qwen2.5-0.5B-Instruct."
        )
    if not REVISION.fullmatch(revision) or ".." in revision:
        raise HubProblem(f"{revision[:100]!r} is not a revision: a branch, a tag or a commit.")
    return repo_id, revision


def needed_files(files: dict[str, int], shards: set[str] | None = None) -> dict[str, int]:
    """The files to download: configuration and tokenizer files and the weights in one format, from the
    repository's top folder; of a sharded model's weights, only the `shards` its index names (a repository
    may also keep a consolidated copy of the same weights)."""
    top = {name: size for name, size in files.items() if "/" not in name}

    def matching(patterns: tuple[str, ...]) -> dict[str, int]:
        return {n: s for n, s in top.items() if any(fnmatch.fnmatch(n, p) for p in patterns)}

    safetensors = matching(SAFETENSORS)
    if safetensors and shards and shards <= set(safetensors):
        safetensors = {n: s for n, s in safetensors.items() if n in shards}
    weights = safetensors or matching(PYTORCH)
    config = matching(CONFIG_FILES)
    if not safetensors:  # a PyTorch index without safetensors: keep it, drop the other
        config = {n: s for n, s in config.items() if n != SAFETENSORS_INDEX}
    else:
        config = {n: s for n, s in config.items() if n != "pytorch_model.bin.index.json"}
    return config | weights


def refusal_of(repo_id: str, files: dict[str, int], config: dict | None) -> tuple[str | None, str | None]:
    """(the architecture, why Tuneboard cannot train the model or None)."""
    architectures = list((config or {}).get("architectures") or [])
    architecture = architectures[0] if architectures else None
    if "config.json" not in files:
        return architecture, (
            f"{repo_id} has no config.json: it is not a transformers model (a GGUF file, a dataset or "
            "an adapter?). Tuneboard trains causal language models in the transformers format."
        )
    if not any(fnmatch.fnmatch(n, p) for n in files for p in SAFETENSORS + PYTORCH):
        return architecture, f"{repo_id} has no weights Tuneboard reads (safetensors or PyTorch .bin)."
    if "tokenizer.json" not in files:
        return architecture, (
            f"{repo_id} has no tokenizer.json (a fast tokenizer), which Tuneboard needs to count and "
            "train on tokens."
        )
    if not is_causal_lm(config or {}):
        return architecture, (
            f"{repo_id} is a {architecture}, not a causal language model: Tuneboard fine-tunes models that "
            "generate text (…ForCausalLM)."
        )
    return architecture, None


def disk_free(folder: Path) -> int | None:
    """Free bytes where the cache is (or would be created)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def lookup(
    settings: Settings, repo_id: str, revision: str | None = None, source: str = HUGGINGFACE
) -> HubModel:
    """What downloading `repo_id` at `revision` would bring, asked of the hub (or of ModelScope);
    HubProblem with a sentence for an unknown id or revision, a gated model without access, a hub that
    does not answer."""
    if source == MODELSCOPE:
        from app import modelscope

        return modelscope.lookup(settings, repo_id, revision)
    if source != HUGGINGFACE:
        raise HubProblem(f"Models are fetched from {' or '.join(SOURCES.values())}, not {source[:40]!r}.")
    repo_id, revision = check_id(repo_id, revision)
    from huggingface_hub import HfApi

    url = endpoint()
    api, token = HfApi(endpoint=url), token_for(settings, url)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True, token=token, timeout=TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - every failure becomes its sentence
        raise HubProblem(_sentence(exc, url, repo_id=repo_id, revision=revision)) from None
    every = {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}
    commit = str(info.sha or revision)
    shards = _indexed_shards(url, repo_id, commit, token) if SAFETENSORS_INDEX in every else None
    files = needed_files(every, shards)
    card = info.card_data
    license_ = getattr(card, "license", None) if card is not None else None
    architecture, refusal = refusal_of(repo_id, files, info.config)
    model = HubModel(
        repo_id=repo_id,
        revision=revision,
        commit=commit,
        endpoint=url,
        files=files,
        license=str(license_) if license_ else None,
        gated=bool(info.gated),
        architecture=architecture,
        refusal=refusal,
        disk_free=disk_free(cache_dir()),
        others=len(every) - len(files),
    )
    if model.gated and model.refusal is None:
        model.refusal = _gated_access(model, token)
        model.access = True if model.refusal is None else (False if "is gated" in model.refusal else None)
    if not model.fits_disk:
        model.refusal = model.refusal or (
            f"{repo_id} needs {filesize(model.size)} and the disk holding the Hugging Face cache "
            f"({cache_dir()}) has {filesize(model.disk_free or 0)} free. Free some space, or point HF_HOME "
            "at a larger disk."
        )
    return model


def _indexed_shards(url: str, repo_id: str, commit: str, token: str | bool) -> set[str] | None:
    """The weight files a sharded model's index names, read from the hub (a small JSON file); None when it
    cannot be read (then every top-level safetensors file is fetched)."""
    from urllib.parse import quote

    from huggingface_hub.utils import build_hf_headers, get_session

    address = f"{url}/{repo_id}/resolve/{quote(commit, safe='')}/{SAFETENSORS_INDEX}"
    try:
        answer = get_session().get(
            address, headers=build_hf_headers(token=token), follow_redirects=True, timeout=TIMEOUT
        )
        answer.raise_for_status()
        weight_map = answer.json()["weight_map"]
        return {str(name) for name in weight_map.values()} or None
    except Exception:  # noqa: BLE001 - a gated model, a missing or odd index: fetch every shard instead
        return None


def _gated_access(model: HubModel, token: str | bool) -> str | None:
    """For a gated model (whose description anyone may read): whether the saved token may fetch its files,
    asked with one HEAD request for its config; the sentence when it may not."""
    from urllib.parse import quote

    from huggingface_hub import get_hf_file_metadata

    address = f"{model.endpoint}/{model.repo_id}/resolve/{quote(model.commit, safe='')}/config.json"
    try:
        get_hf_file_metadata(address, token=token, timeout=TIMEOUT, endpoint=model.endpoint)
    except Exception as exc:  # noqa: BLE001 - every failure becomes its sentence
        return _sentence(exc, model.endpoint, repo_id=model.repo_id, revision=model.revision)
    return None


def offline_sentence(url: str) -> str:
    return (
        f"{capital(hub_name(url))} cannot be reached from this server, so models cannot be fetched by name "
        "here. Without a network: copy a model's folder from another machine's Hugging Face cache "
        "(~/.cache/huggingface/hub) into this one's, or register a local folder below."
    )


def _sentence(
    exc: BaseException, url: str, *, repo_id: str = "", revision: str = "", what: str = "the model"
) -> str:
    """The user's sentence for a failure of the Hub client."""
    return known_sentence(exc, url, repo_id=repo_id, revision=revision, what=what) or (
        f"{capital(hub_name(url))} could not be asked about {what}: {exc}"
    )


def known_sentence(
    exc: BaseException, url: str, *, repo_id: str = "", revision: str = "", what: str = "the model"
) -> str | None:
    """The sentence for a failure the Hub client names (not found, gated, offline, an HTTP error), or
    None."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = hub_name(url)
    if isinstance(exc, GatedRepoError):
        return (
            f"{repo_id} is gated: accept its conditions on its page on {where} with your account, then save "
            "a token of that account here (a read token is enough)."
        )
    if isinstance(exc, RepositoryNotFoundError):
        return (
            f"There is no model {repo_id} on {where} (or it is private, and the token saved here has no "
            "access to it). Check the spelling: owner/name, as on the model's page."
        )
    if isinstance(exc, RevisionNotFoundError):
        return f"{repo_id} has no revision {revision!r} on {where}: give a branch, a tag or a commit it has."
    if isinstance(exc, (OfflineModeIsEnabled, httpx2.ConnectError, httpx2.ConnectTimeout)):
        return offline_sentence(url)
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status == 401 and what == "the token":
            account = "copy it again from your account's settings (Access Tokens)"
            return f"{capital(where)} refused that token: {account}."
        return f"{capital(where)} answered with an error about {what} (HTTP {status}); try again later."
    return None
