"""The recipe, persona and backend schema: YAML in, typed models out, every problem as `FILE:LINE: message`.

A recipe declares one kind of turn (its sources with tier and cache keys, its backend, its speech
bridges); a persona declares one identity. Loading keeps line numbers so that every problem points at
the line to fix, and validation collects all problems of a file instead of stopping at the first.

The package's modules: `schema` (the models), `loader` (YAML with line numbers, loading and finding files),
`errors` (problems, and pydantic's errors as problems), `usercode` (source functions and their files),
`lints` (checks beyond the schema) and `salvage` (`validate_paths`, reporting everything in one run).
"""

from turnflow.recipe.errors import Problem, RecipeError
from turnflow.recipe.lints import persona_adapter_problems
from turnflow.recipe.loader import (
    MAX_FILE_BYTES,
    MAX_YAML_VALUES,
    available_personas,
    backends_for,
    default_backends_path,
    find_persona,
    load_backends,
    load_persona,
    load_recipe,
    persona_dir,
)
from turnflow.recipe.salvage import validate_paths
from turnflow.recipe.schema import (
    TIERS,
    AffinitySpec,
    BackendsFile,
    BackendSpec,
    BudgetSpec,
    CacheSpec,
    GenerationSpec,
    MediaSpec,
    Persona,
    Recipe,
    RoutingSpec,
    SkillSpec,
    SourceSpec,
    SpeechSpec,
    Tier,
    Tool,
    ToolFunction,
    TtsProfile,
    VoiceSpec,
)
from turnflow.recipe.usercode import (
    code_digest,
    file_digest,
    recipe_identity,
    resolve_source_fn,
    source_files,
    source_parameters,
    source_params,
)

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_YAML_VALUES",
    "TIERS",
    "AffinitySpec",
    "BackendSpec",
    "BackendsFile",
    "BudgetSpec",
    "CacheSpec",
    "GenerationSpec",
    "MediaSpec",
    "Persona",
    "Problem",
    "Recipe",
    "RecipeError",
    "RoutingSpec",
    "SkillSpec",
    "SourceSpec",
    "SpeechSpec",
    "Tier",
    "Tool",
    "ToolFunction",
    "TtsProfile",
    "VoiceSpec",
    "available_personas",
    "backends_for",
    "code_digest",
    "default_backends_path",
    "file_digest",
    "find_persona",
    "load_backends",
    "load_persona",
    "load_recipe",
    "persona_adapter_problems",
    "persona_dir",
    "recipe_identity",
    "resolve_source_fn",
    "source_files",
    "source_parameters",
    "source_params",
    "validate_paths",
]
