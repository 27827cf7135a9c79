"""``python -m fp8_compile.validate``: compare a model's FP8 output with its BF16 output.

The Python API is ``fp8_compile.validate(...)`` (``fp8_compile.validation.validate``); this
module only runs the command, so import the API from the package, not from here.
"""

from fp8_compile.validation.cli import main

if __name__ == "__main__":
    main()
