"""JAX's persistent compilation cache, switched on by a path or an environment variable.

With ``EMBEDDINGGEMMA_JAX_COMPILATION_CACHE=/some/dir`` (or ``enable("/some/dir")``) every compiled
batch shape is written there, and a later process with the same model, dtype, shapes, JAX version
and device loads it instead of compiling: the first embedding of a new process then costs only
loading the weights. JAX's own ``JAX_COMPILATION_CACHE_DIR`` works as well, but by default skips
programs that compiled in under a second; this package has few programs (one per length bucket),
so every one is worth keeping.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "EMBEDDINGGEMMA_JAX_COMPILATION_CACHE"


def enable(path: str | os.PathLike | None = None) -> Path | None:
    """Use ``path`` (default: ``$EMBEDDINGGEMMA_JAX_COMPILATION_CACHE``) as the persistent cache;
    returns the directory, or None when neither is set (the cache is then left as configured)."""
    import jax

    path = path or os.environ.get(ENV)
    if not path:
        return None
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the compilation cache directory {path} ({e.strerror}); "
                      f"set {ENV} to a writable directory") from e
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


__all__ = ["enable", "ENV"]
