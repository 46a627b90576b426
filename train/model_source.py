"""What ``model.pretrained`` names, checked before diffusers and transformers try to load it.

Their errors for a wrong path are tracebacks that end by blaming the internet connection (a path
that does not exist is taken for a hub id). memsieve-train, memsieve-detect and memsieve-eval
load through :func:`train.components.load_pretrained`, which asks this module first and turns a
failure into one line: the folder does not exist, it is not a diffusers folder (and what is
missing), or, for a hub id, that it could not be fetched and whether only the local cache was
searched (``model.local_files_only`` / ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

WEIGHTS = ("*.safetensors", "*.bin", "*.index.json")  # variants (fp16) and shards included
# Every part of an SD folder and the files that make it loadable: (name shown, patterns, any one of which will do).
SD_PARTS = {
    "unet": (("config.json", ("config.json",)), ("diffusion_pytorch_model.safetensors", WEIGHTS)),
    "text_encoder": (("config.json", ("config.json",)), ("model.safetensors", WEIGHTS)),
    "tokenizer": (("tokenizer.json", ("tokenizer.json", "vocab.json", "tokenizer_config.json")),),
    "scheduler": (("scheduler_config.json", ("scheduler_config.json",)),),
}
OPTIONAL_PARTS = {"vae": (("config.json", ("config.json",)), ("diffusion_pytorch_model.safetensors", WEIGHTS))}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def missing_files(folder: Path, needs: tuple[tuple[str, tuple[str, ...]], ...]) -> list[str]:
    """The name of each need that ``folder`` has no file for."""
    return [name for name, patterns in needs if not any(any(folder.glob(pattern)) for pattern in patterns)]


def folder_problems(root: Path) -> list[str]:
    """What keeps ``root`` from being a diffusers SD folder: missing parts and files in them."""
    problems = []
    for part, needs in {**SD_PARTS, **{k: v for k, v in OPTIONAL_PARTS.items() if (root / k).exists()}}.items():
        if not (root / part).is_dir():
            problems.append(f"{part}/")
        else:
            problems += [f"{part}/{name}" for name in missing_files(root / part, needs)]
    return problems


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith("/") or not HUB_ID.match(name)


def offline(local_files_only: bool) -> bool:
    return local_files_only or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection to the hub (``HF_ENDPOINT``). On a node without internet,
    huggingface_hub retries each file with backoff for half a minute, printing every retry; this
    finds out at once. Behind a proxy (``HTTPS_PROXY`` and the like) the hub is assumed reachable.
    Asked once per process: the SD model, the CLIP check and the CLIP scorer share the answer."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    url = urlparse(hub_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout).close()
    except OSError:
        return False
    return True


def goes_online(name: str, local_files_only: bool) -> bool:
    """Whether loading ``name`` may use the network: a hub id, downloads allowed, the hub reachable.
    Loaders pass ``local_files_only=not goes_online(...)``, so an unreachable hub means the cache."""
    return not Path(name).expanduser().exists() and not offline(local_files_only) and hub_reachable()


def check_pretrained(name: str, setting: str = "model.pretrained") -> None:
    """Fail in one line when ``name`` is a local path that is not a complete diffusers SD folder.

    Hub ids pass here; :func:`hub_error` words their failure when loading them fails.
    """
    root = Path(name).expanduser()
    if root.exists():
        if not root.is_dir():
            raise FileNotFoundError(f"{setting}={name} is a file; expected a diffusers model folder "
                                    "(unet/, text_encoder/, tokenizer/, scheduler/, optionally vae/)")
        problems = folder_problems(root)
        if problems:
            raise FileNotFoundError(f"{setting}={name} is not a diffusers model folder: it lacks "
                                    f"{', '.join(problems)}")
    elif looks_like_path(name):
        raise FileNotFoundError(f"{setting}={name} does not exist; expected a diffusers model folder or a hub id "
                                "such as CompVis/stable-diffusion-v1-4")


def hub_error(name: str, local_files_only: bool, err: Exception, setting: str = "model.pretrained",
              flag: str = "model.local_files_only", online: bool = True) -> FileNotFoundError:
    """One line for a hub id that could not be loaded, saying where it was looked for
    (``online``: what :func:`goes_online` said for it)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if offline(local_files_only):
        where = (f"only the local cache was searched ({flag}={str(local_files_only).lower()}"
                 f"{', HF_HUB_OFFLINE set' if offline(False) else ''}); allow downloads or give a local folder")
    elif not online:
        where = (f"{hub_endpoint()} cannot be reached from this machine, so only the local cache was searched; "
                 "download the model where there is a connection and give its folder")
    else:
        where = (f"the hub could not be reached or has no such model ({flag}=false); check the id and the "
                 "network, or give a local folder")
    return FileNotFoundError(f"{setting}={name} is not a local folder and could not be loaded as a hub id: "
                             f"{where} [{first[:200]}]")
