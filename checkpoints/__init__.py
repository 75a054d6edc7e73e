"""The shipped network weights (``*.ckpt`` at this folder's top; ``README.md`` describes each).

This folder is installed as the package ``prostlab.checkpoints`` (``pyproject.toml``'s
package-dir and package-data: the top-level ``*.ckpt`` only, not the ``runs/`` of local
training), so a wheel carries them; ``prostlab.resources.resolve_checkpoint`` turns a
``--ckpt_path`` of a shipped name into its file. There is no code here.
"""
