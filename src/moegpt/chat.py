"""Chat templates: a model folder's own Jinja template (``tokenizer_config.json``'s
``chat_template``, rendered as Hugging Face transformers renders it) turned into token ids, and
the assistant spans a fine-tuning run trains on.

One function renders for serving (``/v1/chat/completions``, ``moegpt generate --chat``) and
for supervised fine-tuning, so a model is tuned and served on the same text.

Message contents are data: a special-token string typed into a message stays plain text. The
template is rendered with each content replaced by a marker; the template's own text is split
at special-token strings (which become their ids), and each run of text between two special
tokens, template text and contents together, is encoded as one piece. Tokenizers split at
special tokens before encoding the text between them, so for contents free of special-token
strings the ids equal those of tokenizing the rendered string, as transformers does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from moegpt.data.tokenizer import IMAGE
from moegpt.errors import UserError

TOKENIZER_CONFIG = "tokenizer_config.json"
ROLES = ("system", "user", "assistant")
# moegpt's own template (ChatML), written beside the tokenizer of every model it trains.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# A content's stand-in while the template renders: no template adds or strips NUL bytes.
_MARKER = "\x00moegpt-content-{}\x00"
_MARKERS = re.compile("\x00moegpt-content-(\\d+)\x00")

# An image's place in a message's content: a server puts one where each image part stood,
# and it becomes the tokenizer's <|image|> token (IMAGE) whatever the text around it.
IMAGE_PLACE = "\x00moegpt-image\x00"

Message = Mapping[str, str]

# The special tokens transformers hands a template (its special_tokens_map), by config key.
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class TemplateError(UserError):
    """A chat template that cannot render, or renders no usable assistant turn."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' ``tojson``: not HTML-escaped (Jinja's own is), non-ASCII kept."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _environment() -> ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in: sandboxed, blocks trimmed,
    loop controls, ``raise_exception``, ``tojson`` and ``strftime_now``."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@dataclass(frozen=True)
class Encoded:
    """A rendered conversation: token ids, and which of them are trained on."""

    ids: list[int]
    labels: list[bool]  # True on assistant turns and their end-of-turn token


class ChatTemplate:
    """A Jinja chat template over a tokenizer."""

    def __init__(
        self, source: str, tokenizer: Tokenizer, special: Mapping[str, str] | None = None
    ) -> None:
        try:
            self.template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise TemplateError(f"chat_template: not valid Jinja ({e.message})") from None
        self.source = source
        self.tokenizer = tokenizer
        # bos_token, eos_token, ...: the variables templates expect beside the messages
        self.special = dict(special or {})
        self._plain = Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True  # contents' special strings stay text
        # A text run after a special token, encoded alone, would take the "▁" that a
        # Metaspace pre-tokenizer with prepend_scheme "first" gives only the start of the text
        self._continuing = _without_first_prepend(self._plain)
        added = tokenizer.get_added_tokens_decoder()
        self._special_ids = {t.content: i for i, t in added.items() if t.special}
        names = sorted(self._special_ids, key=len, reverse=True)  # longest match first
        self._special_re = re.compile("|".join(map(re.escape, names))) if names else None

    @classmethod
    def from_folder(cls, folder: str | Path, tokenizer: Tokenizer) -> ChatTemplate | None:
        """The template of a model folder (None if it has none)."""
        path = Path(folder) / TOKENIZER_CONFIG
        if not path.is_file():
            return None
        return cls.from_config(path.read_bytes(), tokenizer, str(path))

    @classmethod
    def from_config(cls, text: bytes, tokenizer: Tokenizer, where: str) -> ChatTemplate | None:
        """The template of a ``tokenizer_config.json``'s ``text`` (None if it has none);
        ``where`` names the file in errors."""
        try:
            config = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{where}: not valid JSON ({e})") from None
        source = config.get("chat_template") if isinstance(config, dict) else None
        if isinstance(source, list):  # named templates: transformers uses "default"
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if source is None:
            return None
        if not isinstance(source, str):
            raise UserError(f"{where}: chat_template must be a string")
        # transformers passes its special tokens map, not every *_token key (add_eos_token is
        # a flag, and false would render as the string "False")
        special = {
            k: _token_text(config[k]) for k in SPECIAL_TOKEN_KEYS if config.get(k) is not None
        }
        return cls(source, tokenizer, special)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The template's text for ``messages``, as transformers' ``apply_chat_template``
        renders it (``tokenize=False``)."""
        try:
            return self.template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                tools=None,  # as transformers passes them when a request has none
                documents=None,
                **self.special,
            )
        except (jinja2.exceptions.TemplateError, TypeError) as e:  # TypeError: a filter's
            raise TemplateError(f"chat_template: {e}") from None  # arguments, say

    def encode(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of the rendered conversation (contents' special strings as plain text)."""
        check_messages(messages)
        return self._encode(messages, add_generation_prompt)

    def _encode(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
        """:meth:`encode` of checked messages, or of none (the generation prompt alone)."""
        marked = [{**m, "content": _MARKER.format(i)} for i, m in enumerate(messages)]
        text = self.render(marked, add_generation_prompt)
        found = [int(i) for i in _MARKERS.findall(text)]
        rendered = self.render(messages, add_generation_prompt)
        contents = [m["content"] for m in messages]
        if found != list(range(len(messages))) or rendered != _MARKERS.sub(
            lambda m: contents[int(m.group(1))], text
        ):
            # The template changes contents (Llama 3 trims them): encode its text as
            # transformers does, which is safe only while no content holds a special token.
            for i, content in enumerate(contents):
                plain = content.replace(IMAGE_PLACE, "")
                if self._special_re is not None and self._special_re.search(plain):
                    raise TemplateError(
                        f"messages[{i}].content: holds special-token text, which this chat "
                        "template (it rewrites contents) cannot keep plain"
                    )
            if IMAGE_PLACE in rendered:
                self._image_id()  # the tokenizer has the token the places become
            rendered = rendered.replace(IMAGE_PLACE, IMAGE)
            return self.tokenizer.encode(rendered, add_special_tokens=False).ids
        pieces: list[str | int] = []  # text runs and special-token ids
        for i, template_text in enumerate(_MARKERS.split(text)):
            if i % 2:  # a content: plain text, joined to the text around it
                runs = messages[int(template_text)]["content"].split(IMAGE_PLACE)
                for k, run in enumerate(runs):
                    if k:
                        pieces.append(self._image_id())
                    _append_text(pieces, run)
                continue
            at = 0
            for match in self._special_re.finditer(template_text) if self._special_re else ():
                _append_text(pieces, template_text[at : match.start()])
                pieces.append(self._special_ids[match.group()])
                at = match.end()
            _append_text(pieces, template_text[at:])
        texts = [p for p in pieces if isinstance(p, str)]
        starts = 1 if pieces and isinstance(pieces[0], str) else 0  # a run at the text's start
        continuing = self._continuing or self._plain
        encoded = iter(
            self._plain.encode_batch(texts[:starts], add_special_tokens=False)
            + continuing.encode_batch(texts[starts:], add_special_tokens=False)
        )
        ids: list[int] = []
        for piece in pieces:
            ids += [piece] if isinstance(piece, int) else next(encoded).ids
        return ids

    def _image_id(self) -> int:
        if IMAGE not in self._special_ids:
            raise TemplateError(f"messages: an image, but this tokenizer has no {IMAGE} token")
        return self._special_ids[IMAGE]

    def encode_with_labels(self, messages: Sequence[Message]) -> Encoded:
        """The conversation's ids with its assistant turns marked for training.

        Each assistant turn is what rendering the conversation through that turn adds to
        rendering it up to the turn with the generation prompt, cut after its last special
        token (the end of turn; a trailing newline is not trained on). This works for any
        template that renders a conversation's beginning the same way whatever follows."""
        ids = self.encode(messages)
        labels = [False] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._encode(messages[:i], add_generation_prompt=True)
            through = self._encode(messages[: i + 1], add_generation_prompt=False)
            if through[: len(before)] != before or ids[: len(through)] != through:
                raise TemplateError(
                    f"chat_template: the rendering of messages[{i}] (assistant) changes the "
                    "text before it, so its tokens cannot be told apart"
                )
            span = range(len(before), len(through))
            ends = [p for p in span if ids[p] in self._special_ids.values()]
            if ends:
                span = range(span.start, ends[-1] + 1)
            for p in span:
                labels[p] = True
        if not any(labels):
            raise TemplateError("chat_template: renders no assistant tokens to train on")
        return Encoded(ids, labels)

    def end_of_turn_ids(self) -> tuple[int, ...]:
        """The special token that ends an assistant turn (the stop of chat requests); none
        where the template ends turns without one, or cannot be read that way."""
        probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        try:
            encoded = self.encode_with_labels(probe)
        except TemplateError:
            return ()
        last = max(p for p, trained in enumerate(encoded.labels) if trained)
        token = encoded.ids[last]
        return (token,) if token in self._special_ids.values() else ()


def _without_first_prepend(tokenizer: Tokenizer) -> Tokenizer | None:
    """A copy of ``tokenizer`` whose Metaspace pre-tokenizer never prepends "▁", where it
    prepends one to the text's start only (``prepend_scheme = "first"``); None otherwise."""
    spec = json.loads(tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    firsts = [
        step
        for step in steps
        if step.get("type") == "Metaspace" and step.get("prepend_scheme") == "first"
    ]
    if not firsts:
        return None
    for step in firsts:
        step["prepend_scheme"] = "never"
    continuing = Tokenizer.from_str(json.dumps(spec))
    continuing.encode_special_tokens = True
    return continuing


def _token_text(value: Any) -> str:
    """A special-token entry of tokenizer_config.json: a string or an AddedToken dict."""
    return value.get("content", "") if isinstance(value, dict) else str(value)


def _append_text(pieces: list[str | int], text: str) -> None:
    if not text:
        return
    if pieces and isinstance(pieces[-1], str):
        pieces[-1] += text
    else:
        pieces.append(text)


def check_messages(messages: Sequence[Any], where: str = "messages") -> None:
    """Each message a {"role", "content"} object with a known role and string content."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise UserError(f"{where}: expected a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise UserError(f"{where}[{i}]: expected an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise UserError(f"{where}[{i}].role: must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise UserError(f"{where}[{i}].content: must be a string, got {content!r}")


def chatml_tokenizer_config() -> str:
    """``tokenizer_config.json`` of a moegpt tokenizer: its special tokens and ChatML."""
    config = {
        "chat_template": CHATML_TEMPLATE,
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return json.dumps(config, indent=2) + "\n"
