"""The experiment configs (``*.yaml``) and registration presets (``registration/*.yaml``).

This folder is installed as the package ``prostlab.configs`` (``pyproject.toml``'s package-dir),
so a wheel carries the same files as the source tree; ``prostlab.resources`` finds them with
``importlib.resources``. There is no code here.
"""
