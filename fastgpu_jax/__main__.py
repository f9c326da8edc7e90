"""``python -m fastgpu_jax`` is the ``fastgpu-jax`` command."""

from fastgpu_jax.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
