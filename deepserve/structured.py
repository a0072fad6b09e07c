"""Structured output: OpenAI `response_format` (json_object, json_schema) as a llama.cpp GBNF grammar.

The JSON-schema → GBNF conversion is llama-cpp-python's own (`llama_cpp.llama_grammar.SchemaConverter`, pure
Python). It ignores schema keywords it does not know, which would let the output break the schema, so every
schema is checked first: a keyword the grammar cannot enforce is refused with a 400 that names it and where
it is. What passes is enforced exactly, so the answer always parses and validates once generation ends.

Supported: type (one or a list), properties, required, additionalProperties, items, prefixItems, minItems,
maxItems, enum, const, anyOf, oneOf, allOf (of objects), minLength / maxLength, pattern (anchored ^...$),
format date / time / date-time / uuid, minimum / maximum / exclusiveMinimum / exclusiveMaximum on
integers (a non-integer bound rounds inward; the grammar spells exactly the integers in range), local $ref
with $defs / definitions, and annotations (title, description, default, examples, ...). Not supported (400):
minimum / maximum / exclusiveMinimum / exclusiveMaximum on numbers (or without "type": "integer"),
multipleOf, not, if / then / else, patternProperties, propertyNames, uniqueItems, contains, minProperties,
maxProperties, dependentRequired, dependentSchemas, remote $ref, other formats, ...
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

from deepserve.engine.types import GrammarSpec
from deepserve.errors import InvalidRequestError


def _load_llama_grammar() -> Any:
    """llama-cpp-python's llama_grammar.py, loaded on its own: it is pure Python (stdlib only), and importing
    it through the `llama_cpp` package would load libllama, which only the engine's runner does."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llama-cpp-python is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "llama_grammar.py"
    module_spec = importlib.util.spec_from_file_location("deepserve._llama_grammar", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


_llama_grammar = _load_llama_grammar()
SchemaConverter = _llama_grammar.SchemaConverter

ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                         "readOnly", "writeOnly", "$anchor"})
DEFINITIONS = ("$defs", "definitions")
TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"})
_KNOWN = frozenset({"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
                    "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "minLength", "maxLength", "pattern",
                    "format", "$ref", *DEFINITIONS, "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
BOUNDS = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
# The converter's string character allows raw control characters, which JSON (and json.loads) forbids.
_CHAR_RULE = re.compile(r"^char ::= .*$", re.MULTILINE)
_JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'


class SchemaConverterError(ValueError):
    """The schema uses something the grammar cannot enforce; the message names it and where."""


def literal(text: str) -> str:
    """A GBNF string literal matching `text` exactly."""
    escaped = (text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
               .replace("\t", "\\t"))
    return f'"{escaped}"'


# ---- integers within bounds -------------------------------------------------------------------------------
# The range rules below are ported from llama.cpp's JSON-schema converter, `_generate_min_max_int` in
# examples/json_schema_to_grammar.py of https://github.com/ggml-org/llama.cpp (MIT License, Copyright (c) the
# ggml authors): its two-sided case, with "-0" left out. Its one-sided cases are not ported: there a minimum
# of 105 also accepts 15..19 and 100..104, and a maximum of -3 accepts "-03" (checked with llama.cpp's grammar
# engine). One-sided bounds are built here from the two-sided rule instead.
_OPEN_DIGITS = 16  # an integer without bounds has at most 16 digits in the converter's grammar (integral-part)
_BOUND_DIGITS = 40  # bounds past 10**40 are refused rather than spelled out digit by digit


def _digit_range(low: str, high: str) -> str:
    return f"[{low}]" if low == high else f"[{low}-{high}]"


def _any_digits(least: int, most: int) -> str:
    """Between `least` and `most` digits (0 <= least <= most)."""
    assert 0 <= least <= most, (least, most)  # llama.cpp does not survive [0-9]{16,15}
    if least == most:
        return "[0-9]" if least == 1 else f"[0-9]{{{least}}}"
    return f"[0-9]{{{least},{most}}}"


def _uniform_range(low: str, high: str) -> str:
    """Digit strings of one length from `low` to `high` (low <= high); a sequence, no top-level `|`."""
    i = 0
    while i < len(low) and low[i] == high[i]:
        i += 1
    parts = [f'"{low[:i]}"'] if i else []
    if i < len(low):
        rest = len(low) - i - 1
        if rest == 0:
            parts.append(_digit_range(low[i], high[i]))
        else:
            low_rest, high_rest = low[i + 1:], high[i + 1:]
            zeros, nines = "0" * rest, "9" * rest
            alternatives = []
            high_done = False
            if low_rest == zeros:
                alternatives.append(f"{_digit_range(low[i], chr(ord(high[i]) - 1))} {_any_digits(rest, rest)}")
            else:
                alternatives.append(f"[{low[i]}] ({_uniform_range(low_rest, nines)})")
                if ord(low[i]) < ord(high[i]) - 1:
                    if high_rest == nines:
                        alternatives.append(f"{_digit_range(chr(ord(low[i]) + 1), high[i])} {_any_digits(rest, rest)}")
                        high_done = True
                    else:
                        alternatives.append(f"{_digit_range(chr(ord(low[i]) + 1), chr(ord(high[i]) - 1))} "
                                            f"{_any_digits(rest, rest)}")
            if not high_done:
                alternatives.append(f"{_digit_range(high[i], high[i])} {_uniform_range(zeros, high_rest)}")
            parts.append(f"({' | '.join(alternatives)})")
    return " ".join(parts)


def _natural_range(low: int, high: int) -> str:
    """The numerals (no leading zeros) of low..high, 0 <= low <= high: one uniform range per length."""
    alternatives = []
    low_text, high_text = str(low), str(high)
    for length in range(len(low_text), len(high_text)):
        alternatives.append(_uniform_range(low_text, "9" * length))
        low_text = "1" + "0" * length
    alternatives.append(_uniform_range(low_text, high_text))
    return " | ".join(alternatives)


def _at_least(low: int) -> str:
    """The numerals of low and up (low >= 0), as long as an unbounded integer may be (or as long as `low`)."""
    length = len(str(low))
    rule = _natural_range(low, 10 ** length - 1)
    if length < _OPEN_DIGITS:
        rule += f" | [1-9] {_any_digits(length, _OPEN_DIGITS - 1)}"
    return rule


def integer_range_rule(low: int | None, high: int | None) -> str:
    """A GBNF rule body for the JSON integers from `low` to `high` (None: unbounded that way), never "-0"."""
    if low is not None and high is not None:
        if low > high:
            raise ValueError(f"empty integer range {low}..{high}")
        if high < 0:
            return f'"-" ({_natural_range(-high, -low)})'
        if low < 0:
            return f'"-" ({_natural_range(1, -low)}) | {_natural_range(0, high)}'
        return _natural_range(low, high)
    if low is not None:
        return f'"-" ({_natural_range(1, -low)}) | {_at_least(0)}' if low < 0 else _at_least(low)
    if high is not None:
        return f'"-" ({_at_least(-high)})' if high < 0 else f'"-" ({_at_least(1)}) | {_natural_range(0, high)}'
    raise ValueError("an integer range needs a bound")


def _integer_bounds(schema: dict[str, Any], where: str) -> tuple[int | None, int | None]:
    """The least and greatest integer `schema`'s bounds allow (None: no bound that way); exclusive bounds and
    non-integer bounds round inward (exclusiveMinimum 0 -> 1, minimum 1.5 -> 2)."""
    low = high = None
    for key in BOUNDS:
        if key not in schema:
            continue
        value = schema[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value in (math.inf, -math.inf) \
                or value != value:  # NaN (math.isfinite would overflow on a huge int)
            raise SchemaConverterError(f"{where}: '{key}' must be a finite number, got {json.dumps(value)}")
        if abs(value) >= 10 ** _BOUND_DIGITS:
            raise SchemaConverterError(f"{where}: '{key}' is too large: integer bounds are supported up to "
                                       f"{_BOUND_DIGITS} digits")
        if key in ("minimum", "exclusiveMinimum"):
            bound = math.ceil(value) if key == "minimum" else math.floor(value) + 1
            low = bound if low is None else max(low, bound)
        else:
            bound = math.floor(value) if key == "maximum" else math.ceil(value) - 1
            high = bound if high is None else min(high, bound)
    if low is not None and high is not None and low > high:
        raise SchemaConverterError(f"{where}: no integer is within the bounds (at least {low} and at most {high})")
    return low, high


# What a schema may ask for, so that one request can neither crash the engine nor stall the others:
# llama.cpp's grammar parser recurses once per repetition (maxItems 30,000 overflowed its stack: a segfault for
# every request in flight; 2,000 is refused by its parser), and its grammar filter costs time per open
# alternative at every token (a 20,000-value enum took ~7 s a token, for every sequence in the step). OpenAI's
# structured outputs allow at most 1,000 enum values and 10 levels of nesting.
MAX_REPETITIONS = 1000  # minItems and minLength at most; a larger maxItems / maxLength is left unenforced
MAX_ALTERNATIVES = 1000  # enum values and anyOf/oneOf branches, all together
MAX_DEPTH = 64  # levels of nested JSON in the schema


def _check_size(schema: Any, where: str) -> None:
    """Depth and alternatives, counted without recursion (a schema nested 10,000 deep must get a 400, not a
    RecursionError)."""
    alternatives, stack = 0, [(schema, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise SchemaConverterError(f"{where}: the schema is nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, dict):
            for key in ("enum", "anyOf", "oneOf"):
                if isinstance(node.get(key), list):
                    alternatives += len(node[key])
            stack.extend((value, depth + 1) for key, value in node.items() if key not in ("enum", "const"))
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node)
    if alternatives > MAX_ALTERNATIVES:
        raise SchemaConverterError(f"{where}: the schema has {alternatives} enum values and anyOf/oneOf branches; "
                                   f"at most {MAX_ALTERNATIVES} can be enforced")


def _check_repetitions(schema: dict[str, Any], where: str, low_key: str, high_key: str) -> None:
    low, high = schema.get(low_key, 0), schema.get(high_key)
    for key, value in ((low_key, low), (high_key, high)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise SchemaConverterError(f"{where}: {key} must be a non-negative integer")
    if low > MAX_REPETITIONS:
        raise SchemaConverterError(f"{where}: {low_key} {low} is more than the {MAX_REPETITIONS} that can be enforced")
    if high is not None and high < low:
        raise SchemaConverterError(f"{where}: {low_key} {low} is more than {high_key} {high}")


def _check(schema: Any, where: str, defs: dict[str, Any]) -> None:
    if isinstance(schema, bool):
        if schema is False:
            raise SchemaConverterError(f"{where}: the schema `false` accepts nothing")
        return
    if not isinstance(schema, dict):
        raise SchemaConverterError(f"{where}: a schema must be an object, got {type(schema).__name__}")
    for key, value in schema.items():
        if key in ANNOTATIONS:
            continue
        if key == "uniqueItems" and value is False:
            continue
        if key not in _KNOWN:
            raise SchemaConverterError(f"{where}: the JSON schema keyword '{key}' is not supported")
    keys = {k for k in schema if k not in ANNOTATIONS and k not in DEFINITIONS and k != "uniqueItems"}
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        bad = [k for k in kinds if k not in TYPES]
        if bad or not kinds:
            raise SchemaConverterError(f"{where}: unknown type {bad[0] if bad else kind!r}")
        if isinstance(kind, list) and keys - {"type"}:
            raise SchemaConverterError(f"{where}: 'type' as a list together with "
                                       f"'{sorted(keys - {'type'})[0]}' is not supported (use anyOf)")
    for name in DEFINITIONS:
        for def_name, sub in (schema.get(name) or {}).items():
            _check(sub, f"{where}/{name}/{def_name}", defs)
    if "$ref" in schema:
        ref = schema["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise SchemaConverterError(f"{where}: only local $ref ('#/...') is supported, got {ref!r}")
        if keys - {"$ref"}:
            raise SchemaConverterError(f"{where}: '{sorted(keys - {'$ref'})[0]}' beside $ref is not supported")
        return
    for union in ("anyOf", "oneOf"):
        if union in schema:
            if keys - {union}:
                raise SchemaConverterError(f"{where}: '{sorted(keys - {union})[0]}' beside {union} is not supported")
            if not isinstance(schema[union], list) or not schema[union]:
                raise SchemaConverterError(f"{where}/{union}: must be a non-empty list")
            for i, sub in enumerate(schema[union]):
                _check(sub, f"{where}/{union}/{i}", defs)
            return
    if "allOf" in schema:
        if keys - {"allOf", "type"} or kind not in (None, "object"):
            raise SchemaConverterError(f"{where}: allOf is supported only as a list of object schemas with properties")
        for i, sub in enumerate(schema["allOf"]):
            target = sub
            if isinstance(sub, dict) and "$ref" in sub:
                _check(sub, f"{where}/allOf/{i}", defs)
                target = _lookup(defs, sub["$ref"])
            if not isinstance(target, dict) or "properties" not in target or "anyOf" in target:
                raise SchemaConverterError(f"{where}/allOf/{i}: allOf is supported only for object schemas with properties")
            _check(target, f"{where}/allOf/{i}", defs)
        return
    if "enum" in schema or "const" in schema:
        if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
            raise SchemaConverterError(f"{where}/enum: must be a non-empty list")
        extra = keys - {"enum", "const", "type"}
        if extra:
            raise SchemaConverterError(f"{where}: '{sorted(extra)[0]}' beside enum/const is not supported")
        return
    if "properties" in schema or "additionalProperties" in schema or "required" in schema:
        if kind not in (None, "object"):
            raise SchemaConverterError(f"{where}: properties on a schema of type {kind!r}")
        extra = keys - {"type", "properties", "required", "additionalProperties"}
        if extra:
            raise SchemaConverterError(f"{where}: '{sorted(extra)[0]}' on an object is not supported")
        if not isinstance(schema.get("properties", {}), dict):
            raise SchemaConverterError(f"{where}/properties: must be an object")
        if not isinstance(schema.get("required", []), list):
            raise SchemaConverterError(f"{where}/required: must be a list of property names")
        properties = schema.get("properties") or {}
        for name, sub in properties.items():
            _check(sub, f"{where}/properties/{name}", defs)
        for name in schema.get("required") or []:
            if name not in properties:
                raise SchemaConverterError(f"{where}: 'required' names '{name}', which is not in 'properties'")
        additional = schema.get("additionalProperties")
        if isinstance(additional, dict):
            _check(additional, f"{where}/additionalProperties", defs)
        return
    if "items" in schema or "prefixItems" in schema:
        if kind not in (None, "array"):
            raise SchemaConverterError(f"{where}: items on a schema of type {kind!r}")
        if "items" in schema and "prefixItems" in schema:
            raise SchemaConverterError(f"{where}: 'prefixItems' together with 'items' is not supported")
        items = schema.get("items", schema.get("prefixItems"))
        if isinstance(items, list):
            if keys - {"type", "items", "prefixItems"}:
                raise SchemaConverterError(f"{where}: '{sorted(keys - {'type', 'items', 'prefixItems'})[0]}' "
                                           "with a tuple of items is not supported")
            for i, sub in enumerate(items):
                _check(sub, f"{where}/items/{i}", defs)
        else:
            extra = keys - {"type", "items", "minItems", "maxItems"}
            if extra:
                raise SchemaConverterError(f"{where}: '{sorted(extra)[0]}' on an array is not supported")
            _check_repetitions(schema, where, "minItems", "maxItems")
            _check(items, f"{where}/items", defs)
        return
    if keys & {"minItems", "maxItems"}:
        raise SchemaConverterError(f"{where}: minItems / maxItems need 'items'")
    bounds = sorted(keys & set(BOUNDS))
    if bounds:
        if kind != "integer":
            on = f"type {kind!r}" if kind is not None else "a schema without a type"
            raise SchemaConverterError(f"{where}: the JSON schema keyword '{bounds[0]}' is not supported on {on}: "
                                       "minimum/maximum are supported on integers only")
        _integer_bounds(schema, where)
    string_keys = keys & {"pattern", "format", "minLength", "maxLength"}
    if string_keys:
        if kind not in ("string", None) or (kind is None and string_keys & {"minLength", "maxLength"}):
            raise SchemaConverterError(f"{where}: '{sorted(string_keys)[0]}' needs type 'string'")
        if "pattern" in schema:
            pattern = schema["pattern"]
            if string_keys - {"pattern"}:
                raise SchemaConverterError(f"{where}: 'pattern' together with '{sorted(string_keys - {'pattern'})[0]}' "
                                           "is not supported")
            if not isinstance(pattern, str) or not (pattern.startswith("^") and pattern.endswith("$")):
                raise SchemaConverterError(f"{where}: a 'pattern' must be anchored (start with ^ and end with $)")
            try:
                re.compile(pattern)
            except re.error as error:
                raise SchemaConverterError(f"{where}: the pattern is not a valid regular expression: {error}") from None
            counts = [int(n) for m in re.finditer(r"\{(\d*)(?:,(\d*))?\}", pattern) for n in m.groups() if n]
            if any(count > MAX_REPETITIONS for count in counts):
                raise SchemaConverterError(f"{where}: the pattern repeats more than the {MAX_REPETITIONS} times "
                                           "that can be enforced")
        elif "format" in schema:
            if schema["format"] not in FORMATS:
                raise SchemaConverterError(f"{where}: the string format '{schema['format']}' is not supported")
            if string_keys - {"format"}:
                raise SchemaConverterError(f"{where}: 'format' together with '{sorted(string_keys - {'format'})[0]}' "
                                           "is not supported")
        else:
            _check_repetitions(schema, where, "minLength", "maxLength")


def _drop_large_maxima(schema: Any) -> Any:
    """maxItems / maxLength above MAX_REPETITIONS left out of the grammar (a common `max_length=4096` would
    otherwise be refused): such a bound is not enforced, max_tokens bounds the answer anyway."""
    if isinstance(schema, list):
        return [_drop_large_maxima(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {key: _drop_large_maxima(value) if key not in ("enum", "const") else value
            for key, value in schema.items()
            if not (key in ("maxItems", "maxLength") and isinstance(value, int) and value > MAX_REPETITIONS)}


def _lookup(defs: dict[str, Any], ref: str) -> Any:
    target: Any = defs
    for part in ref[2:].split("/"):
        if not isinstance(target, dict) or part not in target:
            raise SchemaConverterError(f"$ref {ref!r} points nowhere")
        target = target[part]
    return target


def _strip_annotations(schema: Any) -> Any:
    """The schema without annotations (the converter would trip on a schema holding only a description)."""
    if isinstance(schema, list):
        return [_strip_annotations(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ANNOTATIONS or (key == "uniqueItems" and value is False):
            continue
        if key in ("properties", *DEFINITIONS) and isinstance(value, dict):
            out[key] = {k: _strip_annotations(v) for k, v in value.items()}
        elif key in ("enum", "const"):
            out[key] = value
        else:
            out[key] = _strip_annotations(value)
    return out


def _true_to_empty(schema: Any) -> Any:
    """`true` (anything) as the converter spells it."""
    if schema is True:
        return {}
    if isinstance(schema, list):
        return [_true_to_empty(s) for s in schema]
    if isinstance(schema, dict):
        return {k: (v if k in ("enum", "const", "additionalProperties") and not isinstance(v, dict)
                    else _true_to_empty(v)) for k, v in schema.items()}
    return schema


def _prefix_refs(schema: Any, prefix: str) -> Any:
    """Rename every definition (and reference to it) with `prefix`, so two schemas' definitions never clash."""
    if isinstance(schema, list):
        return [_prefix_refs(s, prefix) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in DEFINITIONS and isinstance(value, dict):
            out[key] = {f"{prefix}{name}": _prefix_refs(sub, prefix) for name, sub in value.items()}
        elif key == "$ref" and isinstance(value, str):
            parts = value.split("/")
            if len(parts) >= 3 and parts[1] in DEFINITIONS:
                parts[2] = prefix + parts[2]
            out[key] = "/".join(parts)
        elif key in ("enum", "const"):
            out[key] = value
        else:
            out[key] = _prefix_refs(value, prefix)
    return out


class CheckedConverter(SchemaConverter):
    def __init__(self) -> None:
        super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        self._num_schemas = 0

    def visit(self, schema: Any, name: str) -> str:
        """The converter's visit, plus integers with bounds (which it ignores); it calls this for every part
        of the schema (properties, items, anyOf, $defs), so bounded integers work anywhere."""
        if isinstance(schema, dict) and schema.get("type") == "integer" and any(k in schema for k in BOUNDS):
            low, high = _integer_bounds(schema, "")  # _check has refused bad bounds, naming where
            rule_name = name + "-" if name in _llama_grammar.RESERVED_NAMES else name or "root"
            return self._add_rule(rule_name, f"({integer_range_rule(low, high)}) space")
        return super().visit(schema, name)

    def visit_checked(self, schema: Any, name: str, *, where: str) -> str:
        """Check `schema` and add its rules; return the name of its top rule ("" names it `root`)."""
        where += "#"  # then a JSON pointer to the part of the schema: "...schema#/properties/age"
        _check_size(schema, where)
        try:
            _check(schema, where, schema if isinstance(schema, dict) else {})
        except (AttributeError, TypeError) as error:  # a keyword holding the wrong kind of value
            raise SchemaConverterError(f"{where}: a keyword holds a value of the wrong type: {error}") from None
        self._num_schemas += 1
        prepared = _drop_large_maxima(_true_to_empty(_strip_annotations(copy.deepcopy(schema))))
        if name:
            prepared = _prefix_refs(prepared, f"{name}-")
        try:
            prepared = self.resolve_refs(prepared, f"schema{self._num_schemas}")
            return self.visit(prepared, name)
        except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as error:
            raise SchemaConverterError(f"{where}: this schema cannot be turned into a grammar: {error}") from None


def new_converter() -> CheckedConverter:
    return CheckedConverter()


def finish_grammar(converter: SchemaConverter, rules: list[str] = (), *, root: str = "root") -> GrammarSpec:
    text = converter.format_grammar()
    text = _CHAR_RULE.sub(lambda _: _JSON_CHAR, text)
    return GrammarSpec(gbnf="\n".join([text, *rules]) + "\n", root=root)


def schema_grammar(schema: Any, *, where: str = "response_format.json_schema.schema") -> GrammarSpec:
    """The grammar of JSON documents valid under `schema`; InvalidRequestError (400) names what is unsupported."""
    converter = new_converter()
    try:
        converter.visit_checked(schema, "", where=where)
    except SchemaConverterError as error:
        raise InvalidRequestError(str(error), param="response_format") from None
    return finish_grammar(converter)


def response_format_grammar(response_format: Any) -> GrammarSpec | None:
    """The grammar an OpenAI `response_format` asks for (None for text). Also accepts Cloudflare's
    `{"type": "json_schema", "json_schema": <the schema itself>}`."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise InvalidRequestError("response_format must be an object.", param="response_format")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return schema_grammar({"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidRequestError("response_format.json_schema must be an object holding the schema.",
                                      param="response_format")
        if "schema" in spec:
            return schema_grammar(spec["schema"])
        if set(spec) <= {"name", "description", "strict"}:  # OpenAI without a schema: any JSON object
            return schema_grammar({"type": "object"})
        return schema_grammar(spec, where="response_format.json_schema")
    raise InvalidRequestError(
        f"response_format.type must be 'text', 'json_object' or 'json_schema', got {json.dumps(kind)}.",
        param="response_format",
    )
