"""Chat templates for models that have none (`data.chat_template: chatml | llama3 | path/to/template.jinja`).

A base model's tokenizer often has no chat template, so chat data cannot be rendered. The chosen template is
set on the run's tokenizer before the data is encoded, saved beside the run's adapter or model as
`chat_template.jinja` (the file name transformers, vLLM and llama.cpp read), and put back on the tokenizer
whenever the run is loaded (`tunesmith chat/generate/eval/export`), so inference renders prompts exactly as
training did. The templates render conversations prefix by prefix, which is how assistant turns are found
for the loss (data/tokenize.py).

Markers such as `<|im_start|>` that are not tokens of the model's vocabulary are learned as plain text;
generation then stops on the turn's end marker as a string (generate.py).
"""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError
from .io import atomic_write_text

# ChatML (OpenAI's, used by Qwen, SmolLM, Hermes): each turn <|im_start|>role\ncontent<|im_end|>\n
CHATML = ("{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{%- endif %}")
# Llama 3: <|begin_of_text|> once, then <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|> per turn
LLAMA3 = ("{{- bos_token or '' }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
BUILTIN = {"chatml": CHATML, "llama3": LLAMA3}
TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")  # how templates close a turn
TEMPLATE_FILE = "chat_template.jinja"


def is_template_spec(spec: str) -> bool:
    """A built-in name or a path to a Jinja file (checked when the config is built; the file when it is read)."""
    return spec in BUILTIN or spec.endswith((".jinja", ".j2", ".jinja2"))


def resolve_chat_template(spec: str) -> str:
    """The Jinja text of a built-in template or a template file."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.chat_template: {spec} not found; give chatml, llama3 or a path to a .jinja file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"data.chat_template: {spec} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                          f"{e.start}); re-save it as UTF-8") from None
    if not text.strip():
        raise ConfigError(f"data.chat_template: {spec} is empty; write a Jinja chat template in it, or use chatml or "
                          "llama3")
    return text


def use_chat_template(tok, spec: str | None) -> str | None:
    """Set data.chat_template on the tokenizer (None: keep its own). Returns a note for the run's output."""
    if not spec:
        return None
    text = resolve_chat_template(spec)
    had = bool(getattr(tok, "chat_template", None))
    tok.chat_template = text
    try:  # a broken template fails here, naming the setting, not deep inside the data pipeline
        rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                              "content": "hello there"}], tokenize=False)
    except Exception as e:  # noqa: BLE001 - Jinja raises many kinds
        raise ConfigError(f"data.chat_template: {spec} does not render a conversation ({type(e).__name__}: {e})") \
            from None
    if "hello there" not in rendered:
        raise ConfigError(f"data.chat_template: {spec} does not write the messages' content (a user 'hi' and an "
                          f"assistant 'hello there' render as {rendered[:120]!r}); use {{{{ message['content'] }}}}")
    missing = [m for m in TURN_ENDS if m in text and not is_single_token(tok, m)]
    return (f"chat template: {spec} (data.chat_template{', replacing the tokenizer' + chr(39) + 's own' if had else ''})"
            + (f"; {', '.join(missing)} is not a token of this vocabulary, so it is learned as text" if missing else ""))


def is_single_token(tok, text: str) -> bool:
    ids = tok.convert_tokens_to_ids(text)
    return isinstance(ids, int) and ids != tok.unk_token_id and ids is not None


def save_chat_template(tok, folder: Path) -> Path | None:
    """Write the tokenizer's template as folder/chat_template.jinja (what transformers and llama.cpp read)."""
    text = getattr(tok, "chat_template", None)
    if not isinstance(text, str) or not text:
        return None
    return atomic_write_text(Path(folder) / TEMPLATE_FILE, text)


def saved_chat_template(run_dir: str | Path) -> str | None:
    """The chat template a run trained with, when it chose one (data.chat_template): saved beside its adapter
    or model (also for a server that loads the base tokenizer and the run's adapter)."""
    for sub in ("adapter", "model"):
        path = Path(run_dir) / sub / TEMPLATE_FILE
        if path.is_file():
            return path.read_text(encoding="utf-8")
    return None


def apply_run_template(tok, run_dir: str | Path, spec: str | None) -> None:
    """Put a run's chosen template back on its (base) tokenizer when loading the run."""
    if tok is None or not spec:
        return
    tok.chat_template = saved_chat_template(run_dir) or resolve_chat_template(spec)


def turn_end_markers(tok) -> list[str]:
    """The end-of-turn markers the tokenizer's template writes (generation stops on them)."""
    text = getattr(tok, "chat_template", None) or ""
    return [m for m in TURN_ENDS if m in text]
