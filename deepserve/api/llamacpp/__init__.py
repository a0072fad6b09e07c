"""llama.cpp's own server API (llama-server's non-OpenAI routes): `POST /completion` and `POST /infill`.

What llama.cpp's clients speak: editor plugins (llama.vim, llama.vscode) send code around the cursor to
/infill, and scripts written against llama-server send raw prompts to /completion with its field names
(n_predict, n_probs, repeat_penalty, grammar, json_schema) and read its answer (content, stop_type, timings,
completion_probabilities). Requests, answers, stream events and errors take llama-server's shapes
(tools/server in the llama.cpp that llama-cpp-python vendors); keys as on /v1.
"""
