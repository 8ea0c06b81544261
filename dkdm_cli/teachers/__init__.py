"""Teachers: resolving a spec (spec.py) and one loader per format (native, diffusers, hub, ADM).

Importing the package registers the built-in and public teachers, as dkdm_cli.models registers its
presets: the registry is full before anything reads it, and no module imports upward to fill it.
"""

from dkdm_cli.teachers import builtin as _builtin  # noqa: F401  (registers `digits`)
from dkdm_cli.teachers import public as _public  # noqa: F401  (registers the public teachers)
