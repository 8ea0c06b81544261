"""`dkdm.toml` <-> typed, frozen dataclasses.

Precedence, lowest first: built-in defaults < the settings recommended for the teacher < the
TOML file < command-line flags < repeated `--set section.key=value`. Unknown keys, wrong types
and out-of-range values are ConfigErrors naming the file, the key and what was expected ("did
you mean" for misspelt keys). The schema is in `schema.py`, the reading and checking in
`loading.py`.
"""

from dkdm_cli.config.loading import (
    class_list,
    defaults_for,
    field_docs,
    load_config,
    merge,
    parse_set,
    read_toml,
)
from dkdm_cli.config.schema import (
    DEFAULT_CONFIG_NAME,
    MAX_BATCH,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_ITERATIONS,
    SAMPLER_CHOICES,
    SAMPLERS,
    Choice,
    Compile,
    Config,
    DistillConfig,
    EvalConfig,
    ExportConfig,
    Init,
    Mode,
    NetworkPrecision,
    Objective,
    Precision,
    SampleConfig,
    StudentConfig,
    TeacherConfig,
)

__all__ = [
    "DEFAULT_CONFIG_NAME", "MAX_BATCH", "MAX_GUIDANCE", "MAX_IMAGES", "MAX_ITERATIONS",
    "SAMPLERS", "SAMPLER_CHOICES", "Choice", "Compile", "Config", "DistillConfig", "EvalConfig",
    "ExportConfig", "Init", "Mode", "NetworkPrecision", "Objective", "Precision", "SampleConfig",
    "StudentConfig", "TeacherConfig", "class_list", "defaults_for", "field_docs", "load_config",
    "merge", "parse_set", "read_toml",
]
