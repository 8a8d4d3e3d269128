"""Built-in configs, shipped with the package: ``--config NAME[:ARG]`` loads ``NAME.py`` here.

Each module defines ``get_config(arg="")`` returning an ``ml_collections.ConfigDict``; its
docstring's first line is what ``fedjax-med configs`` lists. The top-level ``configs/*.py`` of a
checkout are thin wrappers of these modules, so ``--config configs/NAME.py[:ARG]`` keeps working.
"""
