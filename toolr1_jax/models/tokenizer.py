"""Tokenizer: a transformers tokenizer plus token-exact chat-template rendering of new turns.

Multi-turn episodes never re-tokenize history: the prompt is rendered once, and each new turn is
rendered as the exact ids to append (`turn_delta_ids`), equal token for token to what the chat
template gives for the whole conversation.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import transformers

from toolr1_jax.models import sources

# Any of these marks a directory as holding a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# Placeholders for the turns around the split; plain words so no template escapes or strips them.
_USER_MARKER = "ToolROneUserPlaceholder"
_ASSISTANT_MARKER = "ToolROneAssistantPlaceholder"


class Tokenizer:
    """Wraps a transformers tokenizer (`.hf`) with the operations the agent needs.

    Args:
      hf: the transformers tokenizer; it must have a chat template for `prompt_ids` and
        `turn_delta_ids`.
      eos_token_ids: ids that end a generation (defaults to the tokenizer's eos token).
      template_kwargs: extra variables for the chat template (e.g. `enable_thinking=False`).
    """

    def __init__(
        self,
        hf,
        eos_token_ids: Sequence[int] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ):
        self.hf = hf
        if eos_token_ids is None:
            eos_token_ids = () if hf.eos_token_id is None else (hf.eos_token_id,)
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self.template_kwargs = dict(template_kwargs or {})
        self._special_tokens = tuple(
            tok.content for tok in hf.added_tokens_decoder.values() if tok.special
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocabulary plus added tokens)."""
        return len(self.hf)

    @property
    def pad_id(self) -> int:
        """The pad token id, or the first eos id when the tokenizer has no pad token."""
        if self.hf.pad_token_id is not None:
            return self.hf.pad_token_id
        if not self.eos_token_ids:
            raise ValueError("Tokenizer has neither a pad token nor an eos token.")
        return self.eos_token_ids[0]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS is added (chat templates write their own)."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
        """The chat template's text for `messages`."""
        if self.hf.chat_template is None:
            raise ValueError("Tokenizer has no chat template; set `hf.chat_template` first.")
        return self.hf.apply_chat_template(
            [dict(m) for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **self.template_kwargs,
        )

    def prompt_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Ids of `messages` with the generation prompt (so ending in the assistant header)."""
        return self.encode(self.render(messages, add_generation_prompt=True))

    def defuse_special_tokens(self, text: str) -> str:
        """`text` with a zero-width space after the first character of every special-token
        string, so it tokenizes as plain text."""
        for token in self._special_tokens:
            if token in text:
                text = text.replace(token, token[0] + "\u200b" + token[1:])
        return text

    def turn_delta_ids(self, role: str, content: str) -> list[int]:
        """Ids to append after an assistant turn that stopped before closing (e.g. at `</code>`).

        They close the assistant turn, add a `role` message with `content` (an observation) and
        open the next assistant turn. The delta is the template's text difference between a
        conversation ending in an assistant turn and the same one with the new message; it must
        start with a special token, so that tokenizing it alone gives the same ids as tokenizing
        the whole conversation. Special-token strings inside `content` (a program can print
        `<|im_end|>`) are defused first, so an observation can never end a turn.
        """
        content = self.defuse_special_tokens(content)
        base = [{"role": "user", "content": _USER_MARKER}]
        head = self.render(base, add_generation_prompt=True)
        full = self.render(
            [
                *base,
                {"role": "assistant", "content": _ASSISTANT_MARKER},
                {"role": role, "content": content},
            ],
            add_generation_prompt=True,
        )
        prefix = head + _ASSISTANT_MARKER
        if not full.startswith(prefix):
            raise ValueError(
                "Cannot split the chat template into turns: an assistant message is not rendered "
                "as the generation prompt followed by its content verbatim, so appended turns "
                "would not match the template."
            )
        delta = full[len(prefix) :]
        if not delta.startswith(self._special_tokens):
            raise ValueError(
                "Cannot split the chat template into turns: the text after an assistant message "
                f"starts with {delta[:20]!r}, not a special token, so its ids could merge with "
                "the assistant's last tokens."
            )
        delta_ids = self.encode(delta)
        if self.encode(prefix) + delta_ids != self.encode(full):
            raise ValueError(
                "Cannot split the chat template into turns: tokenizing the new turn alone gives "
                "different ids than tokenizing the whole conversation."
            )
        return delta_ids


def _generation_eos_ids(path: pathlib.Path) -> list[int]:
    """eos ids from generation_config.json, which often lists more than the tokenizer's one."""
    file = path / "generation_config.json"
    if not file.is_file():
        return []
    eos = json.loads(file.read_text()).get("eos_token_id")
    if eos is None:
        return []
    return list(eos) if isinstance(eos, list) else [eos]


def load_tokenizer(path, *, template_kwargs: Mapping[str, Any] | None = None) -> Tokenizer:
    """Loads the tokenizer of a local directory (as saved by transformers' `save_pretrained`), a
    GGUF file or a named model (see `sources.resolve`).

    The eos ids are the tokenizer's eos token plus any in `generation_config.json` beside it.
    """
    path = sources.resolve(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Tokenizer directory {str(path)!r} does not exist.")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ValueError(
            f"{str(path)!r} is not a tokenizer directory: it has none of "
            f"{', '.join(_TOKENIZER_FILES)}."
        )
    try:
        hf = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"Could not load a tokenizer from {str(path)!r}: {e}") from e
    eos = [] if hf.eos_token_id is None else [hf.eos_token_id]
    eos += [i for i in _generation_eos_ids(path) if i not in eos]
    return Tokenizer(hf, eos_token_ids=eos, template_kwargs=template_kwargs)


# A ChatML template (Qwen-style turns) for tokenizers this project trains itself.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_chatml_tokenizer(texts: Sequence[str], vocab_size: int, path) -> pathlib.Path:
    """Trains a byte-level BPE tokenizer with ChatML special tokens and saves it in HF format.

    For small from-scratch models (the synthetic suite, tests). Every byte is in the vocabulary,
    so any text encodes. Ids: `<|endoftext|>` = 0 (pad), `<|im_start|>` = 1, `<|im_end|>` = 2
    (eos); the vocabulary has at most `vocab_size` entries.
    """
    import tokenizers

    if vocab_size < 256 + len(CHATML_SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least 259 (bytes + specials), got {vocab_size}.")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(CHATML_SPECIAL_TOKENS),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    hf.chat_template = CHATML_TEMPLATE
    path = pathlib.Path(path)
    hf.save_pretrained(path)
    return path
