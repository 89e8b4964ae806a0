"""The model's tokenizer, chat templates, and incremental UTF-8-safe detokenization.

Decoding never cleans up tokenization spaces: clean-up looks across token boundaries (" ." -> "."),
so text decoded piece by piece could then differ from the whole decoded at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engram_serve.engine.tool_calls import ToolUse, chat_inputs, template_reads_tools

REPLACEMENT_CHAR = "\ufffd"  # what a decoder emits for bytes that are not (yet) a whole character
PREFIX_CONTEXT = 5  # prompt tokens decoded before the first output token, for its leading space


class Tokenizer:
    """A Hugging Face tokenizer loaded from a model directory."""

    def __init__(self, model_dir: str | Path):
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir)
        self._tok = AutoTokenizer.from_pretrained(str(self.model_dir))
        # The Rust tokenizer decodes ~10x faster than the Python wrapper, and decoding runs once
        # per generated token; wrappers without one (slow tokenizers) decode through Python.
        self._backend = getattr(self._tok, "backend_tokenizer", None)
        self.eos_token_ids = self._find_eos_ids()

    def _find_eos_ids(self) -> tuple[int, ...]:
        """EOS ids of generation_config.json (chat models often list several) and the
        tokenizer's own, in that order, without repeats."""
        ids: list[int] = []
        path = self.model_dir / "generation_config.json"
        if path.exists():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids += [eos] if isinstance(eos, int) else list(eos or [])
        if self._tok.eos_token_id is not None:
            ids.append(self._tok.eos_token_id)
        return tuple(dict.fromkeys(int(i) for i in ids))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included."""
        return len(self._tok)

    def __len__(self) -> int:
        return len(self._tok)

    @property
    def hf_tokenizer(self) -> Any:
        """The wrapped transformers tokenizer (e.g. for engram/compression.py)."""
        return self._tok

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._tok.decode(
            ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    @property
    def chat_template_reads_tools(self) -> bool:
        """Whether the chat template renders tools itself (engine/tool_calls.py). Of a set of
        named templates, the one a request with tools gets ("tool_use", else "default")."""
        return template_reads_tools(self._tok.get_chat_template(tools=[]))

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tool_use: ToolUse | None = None,
    ) -> str:
        """The chat template applied to OpenAI-shaped `messages` (tool calls and results among
        them), as text, with the tools of `tool_use` offered."""
        if not self.has_chat_template:
            raise ValueError(
                f"the tokenizer in {self.model_dir} has no chat template; "
                "use the completions API with a plain prompt instead"
            )
        messages, tools = chat_inputs(messages, tool_use, self.chat_template_reads_tools)
        return self._tok.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tool_use: ToolUse | None = None,
    ) -> list[int]:
        """Token ids of the rendered chat. The template writes its own special tokens (BOS,
        turn markers), so none are added on top."""
        return self.encode(self.render_chat(messages, add_generation_prompt, tool_use), False)


class IncrementalDetokenizer:
    """Text of one request's output, one token at a time.

    Keeps two offsets into the token list: text before `read_offset` has been emitted;
    decoding starts at `prefix_offset` (a few tokens earlier), because a token's text can
    depend on its left neighbours (SentencePiece drops the leading space of the first token
    decoded). Each step decodes `ids[prefix:read]` and `ids[prefix:]` and emits the
    difference. While the new text ends in U+FFFD, the last token is an incomplete UTF-8
    character (a byte-level BPE or byte-fallback piece), so nothing is emitted until it
    completes; `flush()` releases whatever is held when the request ends.

    Invariant: everything `add` returned, plus `flush()`, equals the decode of all output
    tokens in the context of the prompt's tail.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids or [])[-PREFIX_CONTEXT:]
        self.token_ids: list[int] = context
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.text = ""  # everything emitted so far

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.token_ids[start:end], self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is partial)."""
        self.token_ids.append(int(token_id))
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset)
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """The text still held back (an unfinished character decodes to U+FFFD)."""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        delta = self._decode(self.prefix_offset)[len(prefix_text) :]
        self.prefix_offset = self.read_offset = len(self.token_ids)
        self.text += delta
        return delta
