"""The text tokenizer of a backbone: open_clip's, or a local one for towers whose tokenizer is on the HF hub."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import open_clip
from open_clip.tokenizer import HFTokenizer

from anovl.backbones.registry import describe_error
from anovl.errors import AnovlError

Tokenizer = Callable[[list[str]], Any]  # texts → (len, context_length) token ids


class KnownTokenizer:
    """A tokenizer whose identity is known without running it: the model's own, or a local directory's.

    ``fingerprint`` keys the text-embedding cache; other callables are keyed by the token ids they give.
    """

    def __init__(self, tokenize: Tokenizer, fingerprint: str):
        self.tokenize, self.fingerprint = tokenize, fingerprint

    def __call__(self, texts: list[str]) -> Any:
        return self.tokenize(texts)


def _hash_directory(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(item for item in directory.iterdir() if item.is_file()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _needs_transformers(what: str, name: str) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise AnovlError(
            f"{name} needs the Hugging Face `transformers` package for its {what}; "
            "install it with `pip install anovl[hf]`"
        ) from None


def check_text_tower(name: str, config: dict[str, Any]) -> None:
    """Stop before building anything when the text tower needs a package that is missing."""
    if config["text_cfg"].get("hf_model_name"):
        _needs_transformers(f"text tower ({config['text_cfg']['hf_model_name']})", name)


def resolve_tokenizer(name: str, config: dict[str, Any], tokenizer: str | os.PathLike | Tokenizer | None) -> Tokenizer:
    """``tokenizer``: None (the model's own), a local tokenizer directory (what Hugging Face's
    ``save_pretrained`` writes) or its ``tokenizer.json`` file, or a callable texts → token ids."""
    if callable(tokenizer):
        return tokenizer
    text_cfg = config["text_cfg"]
    hub_name = text_cfg.get("hf_tokenizer_name")
    if tokenizer is None:
        try:
            return KnownTokenizer(open_clip.get_tokenizer(name), f"open_clip:{name}")
        except Exception as error:  # hub, network and missing-package errors come in many types
            source = f"the Hugging Face tokenizer {hub_name!r}" if hub_name else "its tokenizer"
            raise AnovlError(
                f"{name} needs {source}, which could not be loaded ({type(error).__name__}); when offline, "
                "save it elsewhere (AutoTokenizer.from_pretrained(...).save_pretrained(DIR)) and pass the "
                "local directory as tokenizer (--model.init_args.tokenizer DIR)"
            ) from None
    path = Path(tokenizer).expanduser()
    directory = path.parent if path.is_file() else path
    if not directory.is_dir():
        raise AnovlError(f"tokenizer {path} not found; give a local tokenizer directory or its tokenizer.json")
    _needs_transformers("local tokenizer", name)
    try:
        loaded = HFTokenizer(
            str(directory), context_length=text_cfg.get("context_length", 77), **text_cfg.get("tokenizer_kwargs", {})
        )
    except Exception as error:  # transformers raises assorted types for unreadable tokenizer folders
        raise AnovlError(f"cannot load the tokenizer in {directory} ({describe_error(error)})") from None
    return KnownTokenizer(loaded, f"local:{_hash_directory(directory)}")
