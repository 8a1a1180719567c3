"""The file-free byte tokenizer of the built-in model, and token helpers for any tokenizer."""
from __future__ import annotations

from typing import Any, Iterable, Sequence


class ByteTokenizer:
    """A file-free byte-level tokenizer (ByT5 style): ids 0..2 are special, bytes are offset by 3.

    ``pad = 0``, ``eos = 1``, ``bos (also unk) = 2``; byte ``b`` has id ``b + 3``. Any text
    round-trips through ``encode``/``decode`` (UTF-8).
    """

    pad_token_id = 0
    eos_token_id = 1
    bos_token_id = 2
    unk_token_id = 2
    offset = 3
    vocab_size = 256 + 3
    # No Jinja template: ``apply_chat_template`` below is the template.
    chat_template = None

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        data = bytes(i - self.offset for i in ids if i >= self.offset)
        if not skip_special_tokens:
            names = {self.pad_token_id: "<pad>", self.eos_token_id: "</s>", self.bos_token_id: "<s>"}
            parts, run = [], []
            for i in ids:
                if i >= self.offset:
                    run.append(i - self.offset)
                else:
                    parts.append(bytes(run).decode("utf-8", errors="replace"))
                    parts.append(names[i])
                    run = []
            parts.append(bytes(run).decode("utf-8", errors="replace"))
            return "".join(parts)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False, **_: Any):
        """Render messages with :func:`simple_chat_template` (and encode them if ``tokenize``)."""
        text = simple_chat_template(messages, add_generation_prompt)
        return self.encode(text) if tokenize else text


# simple_chat_template as a Jinja template, for the saved Hugging Face copy of the byte tokenizer.
SIMPLE_CHAT_JINJA = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable character for each byte: what the ``tokenizers`` ByteLevel pre-tokenizer emits."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def hf_byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` with :class:`ByteTokenizer`'s ids (pad 0, eos 1, bos 2, byte b -> b + 3),
    built in code from the ``tokenizers`` library: what ``model/`` saves, for ``AutoTokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = {"<pad>": ByteTokenizer.pad_token_id, "</s>": ByteTokenizer.eos_token_id,
                "<s>": ByteTokenizer.bos_token_id}
    vocab = dict(specials)
    vocab.update({char: b + ByteTokenizer.offset for b, char in _bytes_to_unicode().items()})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", ByteTokenizer.bos_token_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        bos_token="<s>", unk_token="<s>",
                                        split_special_tokens=True)  # "<s>" in text is three bytes, as ours
    tokenizer.chat_template = SIMPLE_CHAT_JINJA
    return tokenizer


def simple_chat_template(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """``"<|role|>\\ncontent\\n"`` per message, then ``"<|assistant|>\\n"`` if a reply is expected."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return text + "<|assistant|>\n" if add_generation_prompt else text


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer brings its own chat template (an instruct model's); the byte tokenizer does not."""
    return not isinstance(tokenizer, ByteTokenizer) and bool(getattr(tokenizer, "chat_template", None))


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens, for our tokenizer and for HF tokenizers."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pad_token_id(tokenizer) -> int:
    """The padding id (HF tokenizers without one pad with EOS; padded positions are masked anyway)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return 0 if pad is None else int(pad)
