"""Teachers: resolving a spec (spec.py), the loaders per format, and the registry of named
teachers. Importing the package registers the built-in and public teachers (as models/ does)."""

from dkdm_cli.teachers import builtin as _builtin  # noqa: F401  (registers `digits`)
from dkdm_cli.teachers import public as _public  # noqa: F401  (registers the public teachers)
