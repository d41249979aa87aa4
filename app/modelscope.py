"""Base models fetched by name from ModelScope (modelscope.cn, or the site MODELSCOPE_ENDPOINT names),
through its official client, `modelscope_hub`. As for the Hugging Face Hub (app.hub): a lookup says what
a download would bring before anything is fetched, a worker downloads (worker/download.py) into
ModelScope's own cache, where its tools find it too and from where the Models page lists it
(app.model_registry), and a token kept for this site goes to it only.

ModelScope names a revision by its branch or tag (default "master") and keeps a snapshot per revision
name, so here a model's "commit" is its revision. The client sends a token (a header and its session
cookie) to the site it was made for only, never to the storage a download is redirected to.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from app.config import Settings
from app.hub import (
    SAFETENSORS_INDEX,
    HubModel,
    HubProblem,
    capital,
    check_id,
    disk_free,
    needed_files,
    refusal_of,
    token_for,
)
from app.units import filesize

SOURCE = "modelscope"
DEFAULT_REVISION = "master"
SMALL_FILE = 16 * 1024 * 1024  # the most a lookup reads of a model's config or weights' index
PUBLIC_SITES = ("https://modelscope.cn", "https://www.modelscope.cn", "https://modelscope.ai")
# The client retries a request that found no network five times with a growing pause (about 15 s); a
# lookup from the page answers sooner. An operator's own setting of these wins.
for _name, _value in (("MODELSCOPE_API_MAX_RETRIES", "2"), ("MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS", "2")):
    os.environ.setdefault(_name, _value)


def _config(url: str | None = None, token: str | bool | None = None):
    """The client's settings for `url` with `token`: a token, False for none at all ("" to the client, so
    that it never falls back to its own login file or MODELSCOPE_API_TOKEN), or None for the client's own
    (a worker's operator may set MODELSCOPE_API_TOKEN)."""
    from modelscope_hub import HubConfig

    chosen = token if isinstance(token, str) else ("" if token is False else None)
    return HubConfig(endpoint=url, token=chosen)


def endpoint() -> str:
    """The ModelScope site this server downloads from: modelscope.cn, or the one MODELSCOPE_ENDPOINT
    names. (No token: the client would read its credentials file for one; the Models page asks every second
    while a download runs.)"""
    return str(_config(token=False).endpoint).rstrip("/")


def site_name(url: str) -> str:
    return "ModelScope" if url.rstrip("/") in PUBLIC_SITES else f"the ModelScope site at {url}"


def cache_dir() -> Path:
    """ModelScope's cache (MODELSCOPE_CACHE, else ~/.cache/modelscope), by the client's own default for
    it, without making a whole configuration (that reads and mends its credentials file: the model list
    asks for the cache on every page)."""
    from dataclasses import fields

    from modelscope_hub import HubConfig

    default = next(f.default_factory for f in fields(HubConfig) if f.name == "cache_dir")
    return Path(default())  # type: ignore[operator]


def snapshot_folder(repo_id: str, revision: str) -> Path:
    """Where the client keeps a model's files at a revision: models/<owner>--<name>/snapshots/<revision>,
    or, as the client does, the folder of an older client's cache when one holds that model."""
    return (
        legacy_folder(repo_id) or cache_dir() / "models" / repo_id.replace("/", "--") / "snapshots" / revision
    )


def legacy_folder(repo_id: str) -> Path | None:
    """A model's folder in the layout of ModelScope's older clients (models/<owner>/<name with . as ___>,
    under hub/ in the default cache), which the client keeps downloading into when it is not empty."""
    owner, _, name = repo_id.partition("/")
    base = cache_dir()
    for folder in (
        base / "models" / owner / name.replace(".", "___"),
        base / "hub" / "models" / owner / name.replace(".", "___"),
    ):
        if folder.is_dir() and any(folder.iterdir()):
            return folder
    return None


def api(url: str, token: str | bool | None):
    from modelscope_hub import HubApi

    return HubApi(_config(url, token))


def lookup(settings: Settings, repo_id: str, revision: str | None = None) -> HubModel:
    """What downloading `repo_id` at `revision` from ModelScope would bring; HubProblem with a sentence for
    an unknown id or revision, a model it refuses without a token, a site that does not answer."""
    repo_id, revision = check_id(repo_id, revision, default=DEFAULT_REVISION)
    url = endpoint()
    if "/" not in repo_id:
        raise HubProblem(
            f"{capital(site_name(url))} names every model owner/name, such as Qwen/Qwen2.5-0.5B-Instruct."
        )
    token = token_for(settings, url)
    client = api(url, token)
    try:
        info = client.get_repo(repo_id, "model")
    except Exception as exc:  # noqa: BLE001 - every failure becomes its sentence
        raise HubProblem(sentence(exc, url, repo_id=repo_id)) from None
    try:
        listing = client.list_repo_files(repo_id, "model", revision=revision)
    except Exception as exc:  # noqa: BLE001
        raise HubProblem(sentence(exc, url, repo_id=repo_id, revision=revision)) from None
    every = {f.path: int(f.size or 0) for f in listing if not f.is_dir}
    config, shards, problem = _small_files(client, repo_id, revision, every)
    files = needed_files(every, shards)
    architecture, refusal = refusal_of(repo_id, files, config)
    gated = bool(info.gated)
    model = HubModel(
        repo_id=repo_id,
        revision=revision,
        commit=revision,
        endpoint=url,
        files=files,
        license=str(info.license) if info.license else None,
        gated=gated,
        architecture=architecture,
        refusal=problem or refusal,
        disk_free=disk_free(cache_dir()),
        others=len(every) - len(files),
        access=(problem is None) if gated else None,
        source=SOURCE,
    )
    if not model.fits_disk:
        model.refusal = model.refusal or (
            f"{repo_id} needs {filesize(model.size)} and the disk holding ModelScope's cache ({cache_dir()}) "
            f"has {filesize(model.disk_free or 0)} free. Free some space, or point MODELSCOPE_CACHE at a "
            "larger disk."
        )
    return model


def _small_files(
    client, repo_id: str, revision: str, every: dict[str, int]
) -> tuple[dict | None, set[str] | None, str | None]:
    """The model's config.json and its weights' index (which shards to fetch), read from the site:
    (config, shards, the sentence when the site refuses them: a model behind a login or an agreement)."""
    config, shards = None, None
    for name in ("config.json", SAFETENSORS_INDEX):
        if not 0 < every.get(name, 0) <= SMALL_FILE:
            continue
        try:
            with client.legacy.download_stream(repo_id, "model", name, revision) as answer:
                content = json.loads(answer.raw.read(SMALL_FILE + 1, decode_content=True))
        except ValueError:
            continue
        except Exception as exc:  # noqa: BLE001 - every failure becomes its sentence
            return None, None, sentence(exc, client.legacy.endpoint, repo_id=repo_id, revision=revision)
        if name == "config.json" and isinstance(content, dict):
            config = content
        elif isinstance(content, dict) and isinstance(content.get("weight_map"), dict):
            shards = {str(shard) for shard in content["weight_map"].values()} or None
    return config, shards, None


def whoami(url: str, token: str) -> str:
    """The account a token belongs to, asked of the site (HubProblem when it refuses the token)."""
    try:
        account = api(url, token).whoami()
    except Exception as exc:  # noqa: BLE001
        raise HubProblem(sentence(exc, url, what="the token")) from None
    return str(account.username or "your account")


def offline_sentence(url: str) -> str:
    return (
        f"{capital(site_name(url))} cannot be reached from this server, so models cannot be fetched from it "
        "by name here. Without a network: copy a model's folder from another machine's ModelScope cache "
        "(~/.cache/modelscope) into this one's, or register a local folder below."
    )


def sentence(
    exc: BaseException, url: str, *, repo_id: str = "", revision: str = "", what: str = "the model"
) -> str:
    """The user's sentence for a failure of the ModelScope client."""
    return known_sentence(exc, url, repo_id=repo_id, revision=revision, what=what) or (
        f"{capital(site_name(url))} could not be asked about {what}: {exc}"
    )


def known_sentence(
    exc: BaseException, url: str, *, repo_id: str = "", revision: str = "", what: str = "the model"
) -> str | None:
    """The sentence for a failure the client names (no network, refused, not found, damaged), or None."""
    import requests
    from modelscope_hub import (
        AuthenticationError,
        FileIntegrityError,
        NetworkError,
        NotExistError,
        PermissionDeniedError,
        RequestTimeoutError,
        ServerError,
    )

    where = site_name(url)
    if isinstance(exc, (RequestTimeoutError, requests.Timeout)) or "deadline" in type(exc).__name__.lower():
        return f"{capital(where)} did not answer in time about {what}; try again (a download resumes)."
    if isinstance(exc, (NetworkError, requests.ConnectionError)):  # no answer at all
        return offline_sentence(url)
    if isinstance(exc, (AuthenticationError, PermissionDeniedError)):
        if what == "the token":
            account = "copy it again from your account's settings (Access Token)"
            return f"{capital(where)} refused that token: {account}."
        return (
            f"{capital(where)} lets only some accounts fetch {repo_id}: sign in there, accept its terms on "
            "its page, then save a token of that account here."
        )
    if isinstance(exc, NotExistError):
        if revision:
            return f"{repo_id} has no revision {revision!r} on {where}: give a branch or a tag it has."
        return (
            f"There is no model {repo_id} on {where} (or it is private, and the token saved here has no "
            "access to it). Check the spelling: owner/name, as on the model's page."
        )
    if isinstance(exc, FileIntegrityError):
        damaged = "that does not match its listing (damaged in transfer)"
        return f"{capital(where)} sent a file of {repo_id} {damaged}."
    if isinstance(exc, ServerError):
        return f"{capital(where)} answered with an error about {what}; try again later."
    return None
