"""Fill-in-the-middle: the prompt a code model was trained on to write what goes between two pieces of code.

`POST /v1/completions` with `prompt` (the code before the gap) and `suffix` (the code after it), as DeepSeek's
FIM completion accepts, becomes, in the prefix-suffix-middle order that DeepSeek-Coder was trained on and
llama-server's `/infill` builds (tools/server/server-common.cpp, format_prompt_infill):

    [BOS] FIM_PRE prefix FIM_SUF suffix FIM_MID        deepseek-coder: <｜fim▁begin｜> … <｜fim▁hole｜> … <｜fim▁end｜>

and the model generates the middle. The three tokens come from the GGUF (its tokenizer.ggml.fim_*_token_id,
or llama.cpp's detection by their text); an engine that cannot say falls back to the catalog's `[models.fim]`
strings when each is one token of the vocabulary. A model with neither gets a 400 that says so.
The code is user text: special-token strings inside it stay text and never become FIM markers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deepserve.errors import InvalidRequestError, NotSupportedError

if TYPE_CHECKING:
    from deepserve.serving import ServedModel


def fim_token_ids(model: ServedModel) -> tuple[int, int, int] | None:
    """(prefix, suffix, middle) token ids of the model, or None if it was not trained for fill-in-the-middle."""
    from_engine = getattr(model.engine, "fim_token_ids", None)
    ids = from_engine() if from_engine is not None else None
    if ids is None and model.catalog is not None and model.catalog.fim is not None:
        fim = model.catalog.fim
        pieces = [model.engine.tokenize(text, add_special=False, parse_special=True)
                  for text in (fim.prefix, fim.suffix, fim.middle)]
        if all(len(p) == 1 for p in pieces):
            ids = (pieces[0][0], pieces[1][0], pieces[2][0])
    return ids


def wants_fim(model: ServedModel, suffix: str | None) -> bool:
    """Whether a completion request is a fill-in-the-middle one. An empty suffix (nothing after the gap, as
    editors send at the end of a file) is FIM for a model trained for it and a plain completion for the others."""
    if suffix is None:
        return False
    return suffix != "" or fim_token_ids(model) is not None


def fim_prompt_tokens(model: ServedModel, prefix: str | list[int], suffix: str) -> list[int]:
    """The FIM prompt for the code around the gap; a token-list prefix is taken as already tokenized."""
    ids = fim_token_ids(model)
    if ids is None:
        raise InvalidRequestError(
            f"The model `{model.model_id}` does not support fill-in-the-middle: its vocabulary has no FIM prefix, "
            "suffix and middle tokens, so `suffix` cannot be used with it. Send the prompt without `suffix`, or "
            "use a code model trained for infilling (e.g. deepseek-coder).",
            param="suffix",
        )
    pre, suf, mid = ids
    engine = model.engine
    bos = engine.tokenize("", add_special=True, parse_special=False)  # [BOS] when the model wants one, else []
    before = list(prefix) if isinstance(prefix, list) else engine.tokenize(prefix, add_special=False,
                                                                          parse_special=False)
    after = engine.tokenize(suffix, add_special=False, parse_special=False)
    return [*bos, pre, *before, suf, *after, mid]


# llama-server fits the code around the gap in one batch of its default size, 3:1 before and after the gap.
INFILL_BATCH = 2048
MAX_TOKEN_CHARS = 64  # longer than any token of a code model's vocabulary (runs of spaces are the longest)
INFILL_ROOM = 256  # output tokens the snippets leave room for when the request names no n_predict
SNIPPET_SEPARATOR = "\n\n--- snippet ---\n\n"  # between extra chunks, for models without a file separator token


def infill_prompt_tokens(model: ServedModel, prefix: str, suffix: str, extra: list[tuple[str, str]], prompt: str,
                         max_tokens: int | None) -> list[int]:
    """llama-server's /infill prompt (format_prompt_infill): other files' text (`extra`: (filename, text)) as
    snippets (after FILE_SEP and the file's name where the vocabulary has repo-level tokens, with REPO first and
    FILE_SEP "filename" last), then [BOS] FIM_PRE prefix prompt FIM_SUF suffix FIM_MID. The prefix keeps its last 1,536 tokens and
    the suffix its first 512 less the prompt's, as llama-server's default batch does; the snippets keep their
    ends, as much as llama-server keeps (the window less a batch) and never so much that `max_tokens`
    (INFILL_ROOM when None) no longer fits after the prompt. `prompt`'s special tokens are read as such."""
    ids = fim_token_ids(model)
    if ids is None:
        raise NotSupportedError(f"Infill is not supported by the model `{model.model_id}`: its vocabulary has no "
                                "FIM prefix, suffix and middle tokens.", param="model")
    pre, suf, mid = ids
    engine = model.engine

    def tokens(text: str, special: bool = False) -> list[int]:
        return engine.tokenize(text, add_special=False, parse_special=special) if text else []

    # Only the text that can be kept is tokenized (a megabyte of code around the cursor would hold the event
    # loop for seconds): no token is longer than MAX_TOKEN_CHARS characters.
    keep_before, keep_after = 3 * (INFILL_BATCH // 4), INFILL_BATCH // 4
    written = tokens(prompt, special=True)
    before = tokens(prefix[-keep_before * MAX_TOKEN_CHARS:])
    after = tokens(suffix[:keep_after * MAX_TOKEN_CHARS])
    before = before[-keep_before:]
    after = after[:max(0, keep_after - (2 + len(written)))]
    bos = engine.tokenize("", add_special=True, parse_special=False)
    core = [*bos, pre, *before, *written, suf, *after, mid]
    room = INFILL_ROOM if max_tokens is None else max_tokens
    # llama-server's budget, with its default n_predict of -1: the window less a batch, plus 2.
    budget = min(max(0, model.ctx_size - INFILL_BATCH + 2), max(0, model.ctx_size - len(core) - room))
    # A repo-level FIM vocabulary (Qwen2.5-Coder's): REPO "myproject\n", each snippet after FILE_SEP "its name\n",
    # then FILE_SEP "filename\n" for the file being edited, as llama-server writes it (the names are its own).
    repo, file_sep = getattr(engine, "fim_repo_token_ids", lambda: (None, None))()
    head = [repo, *tokens("myproject\n")] if repo is not None else []
    snippets = [file_sep, *tokens("filename\n")] if file_sep is not None else []
    separator = tokens(SNIPPET_SEPARATOR)
    for filename, text in reversed(extra):  # the last snippets are kept: only those are tokenized
        if len(snippets) >= budget:
            break
        # deepseek-coder has no file separator token: snippets are marked in text
        marker = [file_sep, *tokens(filename + "\n")] if file_sep is not None else separator
        snippets = marker + tokens(text[-budget * MAX_TOKEN_CHARS:]) + snippets
    snippets = head + snippets
    return [*snippets[len(snippets) - min(len(snippets), budget):], *core]  # before BOS, as llama-server puts them
