"""What a chat request asks for beyond its messages and sampling numbers, turned into engine parameters the
same way for every dialect: the model's default sampling, reasoning (style and budget), structured output
(`response_format`) and tools.

A dialect builds `ChatOptions` from its body, calls `prepare_chat()` for the prompt (tools described to the
template, earlier reasoning stripped by ServedModel.chat_prompt_tokens), and `configure()` on its
SamplingParams.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from deepserve.engine.types import Generation, GrammarSpec, ReasoningFormat, ReasoningParams, SamplingParams, TextPrompt
from deepserve.errors import InvalidRequestError
from deepserve.reasoning import EFFORT_BUDGETS, OPEN_TAG, budget_for, prompt_reasoning_prefix
from deepserve.structured import response_format_grammar
from deepserve.tools import MARKERS, check_tools, prepare_tool_messages, tool_call_grammar, tool_format_for

REASONING_FORMATS = tuple(f.value for f in ReasoningFormat)


@dataclass(slots=True)
class ChatOptions:
    reasoning_format: str | None = None  # deepseek | raw | hidden; None: the model's default
    reasoning_effort: str | None = None  # a key of EFFORT_BUDGETS
    max_reasoning_tokens: int | None = None
    response_format: Any = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    generation: Generation = Generation.OPEN


@dataclass(slots=True)
class PreparedChat:
    prompt_tokens: list[int] | TextPrompt  # TextPrompt: the model is served by an upstream engine
    reasoning: ReasoningParams
    grammar: GrammarSpec | None = None
    tool_format: str | None = None
    response_format: dict[str, Any] | None = None  # forwarded to an upstream engine, which enforces it

    def configure(self, model: Any, sampling: SamplingParams, *, omitted: Iterable[str] = ()) -> SamplingParams:
        """`sampling` with the model's defaults where the request gave none, and the chat's engine options."""
        apply_model_defaults(model, sampling, omitted=omitted)
        sampling.reasoning = self.reasoning
        sampling.grammar = self.grammar
        sampling.tool_format = self.tool_format
        sampling.response_format = self.response_format
        return sampling


def apply_model_defaults(model: Any, sampling: SamplingParams, *, omitted: Iterable[str],
                         num_prompt_tokens: int = 0) -> SamplingParams:
    """The one place where a model's recommended sampling fills what a request omitted (R1: temperature 0.6,
    top_p 0.95, from its catalog entry). `omitted` names the fields the request did not give. With
    "max_tokens" among them (dialects whose schema has its own default), the catalog's default max_tokens wins
    over the dialect's (deepseek-r1-32b: 100), as ServedModel.resolve_max_tokens applies it; a max_tokens given
    above the catalog's limit is refused (400)."""
    entry = getattr(model, "catalog", None)
    if entry is None:
        return sampling
    omitted = set(omitted)
    if "temperature" in omitted and entry.temperature is not None:
        sampling.temperature = entry.temperature
    if "top_p" in omitted and entry.top_p is not None:
        sampling.top_p = entry.top_p
    if "max_tokens" in omitted:
        if entry.default_max_tokens is not None:
            sampling.max_tokens = model.resolve_max_tokens(None, num_prompt_tokens)
    else:
        model.resolve_max_tokens(sampling.max_tokens, num_prompt_tokens)  # raises above the model's limit
    return sampling


def reasoning_params(model: Any, options: ChatOptions) -> ReasoningParams:
    """Reasoning for this model and request: on where the catalog says the model reasons (the engine also
    turns it on when the prompt ends inside `<think>`); the style the request names, else the model's."""
    entry = getattr(model, "catalog", None)
    fmt = options.reasoning_format or (getattr(entry, "reasoning_format", None) if entry else None) or "deepseek"
    if fmt not in REASONING_FORMATS:
        raise InvalidRequestError(f"reasoning_format must be one of {', '.join(REASONING_FORMATS)}, got {fmt!r}.",
                                  param="reasoning_format")
    if options.reasoning_effort is not None and options.reasoning_effort not in EFFORT_BUDGETS:
        raise InvalidRequestError(f"reasoning_effort must be one of {', '.join(EFFORT_BUDGETS)}, "
                                  f"got {options.reasoning_effort!r}.", param="reasoning_effort")
    if options.max_reasoning_tokens is not None and options.max_reasoning_tokens < 0:
        raise InvalidRequestError("max_reasoning_tokens must not be negative.", param="max_reasoning_tokens")
    return ReasoningParams(enabled=bool(entry is not None and entry.reasoning), format=ReasoningFormat(fmt),
                           budget=budget_for(options.reasoning_effort, options.max_reasoning_tokens))


def prepare_chat(model: Any, messages: list[dict[str, Any]], options: ChatOptions | None = None) -> PreparedChat:
    """Prompt tokens and engine options of a chat request on `model`."""
    options = options or ChatOptions()
    reasoning = reasoning_params(model, options)
    if getattr(model, "takes_text_prompts", False):
        # An upstream engine renders the template, describes the tools, parses calls and enforces
        # response_format itself: they travel as the request gave them (its refusals come back as 400s).
        check_tools(options.tools, options.tool_choice)
        prompt = model.upstream_chat_prompt(messages, tools=options.tools, tool_choice=options.tool_choice,
                                            parallel_tool_calls=options.parallel_tool_calls,
                                            generation=options.generation)
        return PreparedChat(prompt_tokens=prompt, reasoning=reasoning, response_format=options.response_format)
    grammar = response_format_grammar(options.response_format)
    functions, forced = check_tools(options.tools, options.tool_choice)
    tool_format = None
    template_kwargs: dict[str, Any] = {}
    if functions or any(m.get("tool_calls") for m in messages):
        # Earlier calls go back in the model's own syntax even when no tools are offered now.
        source = model.template.source
        messages, template_kwargs = prepare_tool_messages(messages, functions, source, tool_format_for(source))
    if functions:
        tool_format = tool_format_for(model.template.source)
        if forced is not None:
            if grammar is not None:
                raise InvalidRequestError("response_format and a forced tool_choice cannot be combined.",
                                          param="tool_choice")
            grammar = tool_call_grammar(functions, forced, tool_format,
                                        # several calls only when asked: llama-server's default. OpenAI's
                                        # (true) let a small model repeat its call until max_tokens cut it.
                                        parallel=forced == "*" and options.parallel_tool_calls is True,
                                        single_tokens=single_tokens(model, MARKERS))
    prompt_tokens = model.chat_prompt_tokens(messages, generation=options.generation, **template_kwargs)
    if options.generation is Generation.CONTINUE and prompt_reasoning_prefix(model.text_to_continue(messages[-1])):
        # The continued message is a thought still open (<think> without </think>), however long it is.
        reasoning = replace(reasoning, opened=OPEN_TAG + "\n")
    return PreparedChat(prompt_tokens=prompt_tokens, reasoning=reasoning, grammar=grammar, tool_format=tool_format)


def single_tokens(model: Any, texts: Iterable[str]) -> set[str]:
    """Which of `texts` are one token of the model's vocabulary (special tokens parsed)."""
    return {t for t in texts if len(model.engine.tokenize(t, add_special=False, parse_special=True)) == 1}


def configure_sampling(model: Any, sampling: SamplingParams, options: ChatOptions | None = None, *,
                       omitted: Iterable[str] = (), num_prompt_tokens: int = 0) -> SamplingParams:
    """For dialects without tools (Workers AI, Dataoorts): defaults, reasoning and response_format."""
    options = options or ChatOptions()
    apply_model_defaults(model, sampling, omitted=omitted, num_prompt_tokens=num_prompt_tokens)
    sampling.reasoning = reasoning_params(model, options)
    if getattr(model, "takes_text_prompts", False):
        sampling.response_format = options.response_format  # the upstream engine enforces it
    else:
        sampling.grammar = response_format_grammar(options.response_format)
    return sampling
