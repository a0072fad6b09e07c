"""llama-server's request fields for /completion and /infill, with its defaults (tools/server/server-schema.cpp)."""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from deepserve.engine.types import GrammarSpec, SamplingParams
from deepserve.errors import InvalidRequestError
from deepserve.structured import schema_grammar

MAX_N_PROBS = 100  # llama-server has no limit; each costs a row of the vocabulary's sort
# llama.cpp's one-letter sampler names (common/sampling.cpp)
SAMPLER_LETTERS = {"k": "top_k", "p": "top_p", "m": "min_p", "t": "temperature", "e": "penalties", "y": "typ_p",
                   "d": "dry", "x": "xtc", "s": "top_n_sigma", "i": "infill", "a": "adaptive_p"}
BAN = -100.0  # llama-server's `false` bias (never this token): the strongest bias deepserve's sampler takes


class NativeCompletionRequest(BaseModel):
    # Fields llama-server takes and deepserve has no use for (cache_prompt, id_slot, typical_p,
    # post_sampling_probs...) are ignored, as llama-server ignores fields it does not know.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # JSON's Infinity / NaN literals: 400
    model: str | None = None  # llama-server serves one model; deepserve may serve several
    prompt: str | list[StrictInt] | list[str | list[StrictInt]] = ""  # one prompt (text or ids), or several
    n_predict: int = Field(-1, ge=-1)  # -1: until the end of the context window (or the catalog's default)
    max_tokens: int | None = Field(None, ge=-1)  # llama-server's alias of n_predict
    temperature: float = Field(0.8, ge=0.0)
    top_k: int = 40
    top_p: float = Field(0.95, ge=0.0, le=1.0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, ge=0.0, le=2.0)
    repeat_last_n: int = Field(64, ge=-1)  # tokens the penalties look at, the prompt's included (-1: the window)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int = -1  # -1 (llama-server's LLAMA_DEFAULT_SEED): a random seed
    stop: list[str] = Field(default_factory=list)
    stream: StrictBool = False
    n_probs: int = Field(0, ge=-1, le=MAX_N_PROBS)  # -1 (or 0): none
    ignore_eos: bool = False
    logit_bias: list[list[Any]] | dict[str, Any] | None = None
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    return_tokens: bool = False
    response_fields: list[str] | None = None
    # Which samplers run (llama-server's `samplers`; llama.vim sends ["top_k", "top_p", "infill"]): one left out
    # does nothing, e.g. no "temperature" samples at 1.0. None: all of them.
    samplers: list[str] | str | None = None
    n_indent: int = Field(0, ge=0)  # after the first line, stop at a line indented less than this (editor plugins)
    t_max_predict_ms: int = Field(0, ge=0)  # after this long generating, stop at the next new line (0: no limit)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @property
    def single_prompt(self) -> bool:
        return isinstance(self.prompt, str) or not self.prompt or isinstance(self.prompt[0], int)

    def prompts(self) -> list[str | list[int]]:
        return [self.prompt] if self.single_prompt else list(self.prompt)  # type: ignore[list-item]

    @property
    def requested_max_tokens(self) -> int | None:
        given_max_tokens = self.max_tokens is not None and "n_predict" not in self.model_fields_set
        n = self.max_tokens if given_max_tokens else self.n_predict
        return None if n < 0 else n

    def to_sampling(self, max_tokens: int, tokenize) -> SamplingParams:
        if self.grammar is not None and self.json_schema is not None:
            raise InvalidRequestError("Send either grammar or json_schema, not both.", param="grammar")
        grammar = None
        if self.grammar:
            grammar = GrammarSpec(gbnf=self.grammar, root="root")
        elif self.json_schema is not None:
            grammar = schema_grammar(self.json_schema)
        samplers = self.samplers
        if isinstance(samplers, str):  # llama-server's letter form, e.g. "kpt"
            samplers = [SAMPLER_LETTERS.get(letter, letter) for letter in samplers]
        runs = (lambda name: True) if samplers is None else (lambda name: name in samplers)  # noqa: E731
        penalties = runs("penalties")
        return SamplingParams(
            temperature=self.temperature if runs("temperature") else 1.0,
            top_p=self.top_p if runs("top_p") else 1.0,
            top_k=max(0, self.top_k) if runs("top_k") else 0,
            min_p=self.min_p if runs("min_p") else 0.0,
            seed=None if self.seed < 0 else self.seed,
            repetition_penalty=(self.repeat_penalty or 1.0) if penalties else 1.0,
            frequency_penalty=self.frequency_penalty if penalties else 0.0,
            presence_penalty=self.presence_penalty if penalties else 0.0,
            max_tokens=max_tokens, stop=list(self.stop), ignore_eos=self.ignore_eos,
            logprobs=self.n_probs > 0, top_logprobs=max(0, self.n_probs),
            logit_bias=self._logit_bias(tokenize), grammar=grammar,
            n_indent=self.n_indent, t_max_predict_ms=self.t_max_predict_ms, penalty_last_n=self.repeat_last_n,
            infill=samplers is not None and "infill" in samplers,  # not among llama-server's default samplers
        )

    def _logit_bias(self, tokenize) -> dict[int, float]:
        """llama-server's forms: [[id or text, bias or false], ...] or {"id or text": bias or false}; a text
        biases each of its tokens."""
        pairs = self.logit_bias.items() if isinstance(self.logit_bias, dict) else (self.logit_bias or [])
        bias: dict[int, float] = {}
        for pair in pairs:
            if len(pair) != 2:
                raise InvalidRequestError("logit_bias entries are [token id or text, bias or false].",
                                          param="logit_bias")
            key, value = pair
            if value is True:  # llama-server ignores it
                continue
            if value is False:
                value = BAN
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
                raise InvalidRequestError("logit_bias: a bias is not a finite number or false.", param="logit_bias")
            if isinstance(key, str) and re.fullmatch(r"-?[0-9]{1,12}", key) and isinstance(self.logit_bias, dict):
                ids = [int(key)]
            elif isinstance(key, str):
                ids = tokenize(key)
            elif isinstance(key, int) and not isinstance(key, bool):
                ids = [key]
            else:
                raise InvalidRequestError(f"logit_bias: {key!r} is not a token id or text.", param="logit_bias")
            for token in ids:
                if token >= 0:  # llama-server skips negative ids
                    bias[token] = max(BAN, min(100.0, float(value)))
        return bias


def _finite(number: int | float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an integer past any float (a JSON number of 310 digits)
        return False


class ExtraChunk(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str
    filename: str = "tmp"


class InfillRequest(NativeCompletionRequest):
    prompt: str = ""  # written after the prefix, just before the gap (llama-server's order)
    input_prefix: str
    input_suffix: str
    input_extra: list[ExtraChunk] = Field(default_factory=list)  # other files' text, put before the FIM prompt
