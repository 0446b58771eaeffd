"""Problems as `FILE:LINE: message`, and pydantic's validation errors translated into them."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ValidationError

from turnflow.recipe.schema import _SCHEMAS, TIERS, BackendsFile, BackendSpec

if TYPE_CHECKING:
    from turnflow.recipe.loader import _Document


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a file, with the line to fix."""

    file: str
    line: int
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{self.file}:{self.line}: {prefix}{self.message}"


class RecipeError(ValueError):
    """A recipe, persona or backends file that cannot be used; `problems` lists every reason."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------------------------- pydantic errors


def _pydantic_problems(doc: _Document, exc: ValidationError, what: str) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        kind = err["type"]
        value = err.get("input")
        field = loc[-1] if loc else what
        if kind == "extra_forbidden":
            model_fields = _fields_at(what, loc[:-1])
            msg = f"unknown key {field!r}{_did_you_mean(str(field), model_fields)}"
            if model_fields:
                msg += f" (allowed: {', '.join(model_fields)})"
        elif kind == "missing":
            msg = f"missing required key {field!r} in {_where(what, loc[:-1])}"
        elif kind == "literal_error" and field == "tier":
            msg = f"unknown tier {value!r}{_did_you_mean(str(value), TIERS)}; a tier is one of {', '.join(TIERS)}"
        elif kind == "literal_error":
            msg = f"{field}: {value!r} is not allowed; {err['msg'].lower()}"
        elif kind in ("less_than_equal", "greater_than_equal", "less_than", "greater_than"):
            msg = f"{field}: {value!r} is out of range ({err['msg'].lower()})"
        elif kind == "string_pattern_mismatch" and field == "fn":
            msg = f"fn {value!r} must be 'module:function' (a module beside the recipe or importable)"
        elif kind == "string_pattern_mismatch":
            msg = f"{field}: {value!r} is not a valid name (letters, digits, '_' or '-', not starting with a symbol)"
        elif kind in ("model_type", "dict_type"):
            msg = f"{_where(what, loc)} must be a mapping of keys, got {type(value).__name__}"
        elif kind in ("tuple_type", "list_type"):
            msg = f"{field} must be a list, got {type(value).__name__} {value!r}"
        elif kind == "value_error":  # a validator's own words say what is wrong and what would be right
            msg = f"{field}: {err.get('ctx', {}).get('error', err['msg'])}"
        else:
            msg = f"{field}: {err['msg']} (got {value!r})"
        line = doc.line(loc + ("<value>",)) if kind not in ("extra_forbidden", "missing") else doc.line(loc)
        problems.append(Problem(str(doc.path), line, msg))
    return problems


def _model_at(what: str, loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: Any = _SCHEMAS[what]
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            if model is BackendsFile or what == "backends":
                model = BackendSpec
                continue
            return None
        model = _inner_model(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _fields_at(what: str, loc: tuple[Any, ...]) -> list[str]:
    model = _model_at(what, loc)
    return list(model.model_fields) if model else []


def _where(what: str, loc: tuple[Any, ...]) -> str:
    if not loc:
        return f"the {what}"
    return " ".join(f"item {p}" if isinstance(p, int) else repr(p) for p in loc)
