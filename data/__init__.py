"""The bundled example data, installed as the package ``prostlab.example_data``.

``pyproject.toml``'s package-dir maps this folder into the package, so a wheel carries the same
files as the source tree (see ``README.md`` here); ``prostlab.data.example_path()`` finds them with
``importlib.resources``. There is no code here.
"""
