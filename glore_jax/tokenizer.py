"""Sentencepiece tokenizer plus the control tokens of glore_jax's prompt formats.

Control tokens (`CONTROL_TOKENS`) get ids *after* the sentencepiece vocab,
`id = sp_vocab_size + k`. Sentencepiece can never emit such an id, so no user
text, not even the literal string "[BAD]", can encode to a control token:
the local refiner's error marker cannot be forged by a question or a draft.
`vocab_size` counts them, and the model's embedding must be at least that big.

Pad: a sentencepiece model's own pad id if it has one, else EOS. Every
consumer masks padding, so pad only has to be a valid id; choosing EOS means a
padded row decodes to the same text (EOS renders as nothing) and a sampler
that stops at EOS treats padding as already finished.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from glore_jax.errors import MissingPathError, TokenizerError

# Order is part of the id assignment: append, never reorder.
CONTROL_TOKENS: tuple[str, ...] = (
    "[BAD]",    # local refiner: the first wrong step of the draft starts after this
    "[SOL]",    # question -> solution
    "[DRAFT]",  # question -> draft to be refined
    "[FIX]",    # draft -> refinement
)
_CONTROL_RE = re.compile(r"(\\*)(" + "|".join(re.escape(name) for name in CONTROL_TOKENS) + ")")


class Tokenizer:
    """A loaded sentencepiece model with glore_jax's control tokens appended."""

    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.sp_vocab_size: int = self._sp.get_piece_size()
        self._control = {name: self.sp_vocab_size + k for k, name in enumerate(CONTROL_TOKENS)}
        self._control_names = {i: name for name, i in self._control.items()}
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError("the sentencepiece model must define bos and eos pieces")
        self.pad_id: int = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise MissingPathError(f"tokenizer file {path} does not exist")
        with open(path, "rb") as f:
            proto = f.read()
        try:
            return cls(proto)
        except TokenizerError as e:
            raise TokenizerError(f"tokenizer {path}: {e}") from None
        except (RuntimeError, OSError):  # sentencepiece reports a bad proto as an INTERNAL RuntimeError
            raise TokenizerError(f"tokenizer {path} is not a sentencepiece model (its {len(proto)} bytes do not "
                                 "parse as a ModelProto)") from None

    def __getstate__(self):  # picklable for multi-process data loading
        return {"model_proto": self._proto}

    def __setstate__(self, state):
        self.__init__(state["model_proto"])

    @property
    def vocab_size(self) -> int:
        """sentencepiece pieces + control tokens; the minimum model vocab."""
        return self.sp_vocab_size + len(CONTROL_TOKENS)

    @property
    def serialized(self) -> bytes:
        return self._proto

    def control_id(self, name: str) -> int:
        """Id of a control token, e.g. `control_id('[BAD]')`."""
        if name not in self._control:
            raise KeyError(f"unknown control token {name!r}; known: {CONTROL_TOKENS}")
        return self._control[name]

    @property
    def bad_id(self) -> int:
        return self._control["[BAD]"]

    def is_control(self, token_id: int) -> bool:
        return token_id in self._control_names

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of plain text (never control tokens)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = self._sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a sequence of str, got a single str")
        return [([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])
                for ids in self._sp.encode(list(texts))]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and the [start, end) *character* span of `text` each token covers.

        Sentencepiece reports UTF-8 byte offsets; they are mapped to character
        offsets so callers can locate lines found with ordinary str methods.
        """
        proto = self._sp.encode(text, out_type="proto")
        byte_to_char = [i for i, ch in enumerate(text) for _ in range(len(ch.encode("utf-8")))]
        byte_to_char.append(len(text))
        spans = [(byte_to_char[p.begin], byte_to_char[p.end]) for p in proto.pieces]
        return [p.id for p in proto.pieces], spans

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; control tokens render as their names, BOS/EOS/pad as nothing.

        Unambiguous: where plain text itself spells a control token's name
        (a question that says "[BAD]"), `escape` adds a backslash before it,
        so "[BAD]" in the output is always the token. `encode_markup` reads
        the text back; plain text without control names decodes unchanged.
        """
        out: list[str] = []
        run: list[int] = []
        for token in ids:
            token = int(token)
            if token in self._control_names:
                out.append(escape(self._sp.decode(run)))
                out.append(self._control_names[token])
                run = []
            elif 0 <= token < self.sp_vocab_size:
                run.append(token)
            else:
                raise ValueError(f"token id {token} outside vocab of size {self.vocab_size}")
        out.append(escape(self._sp.decode(run)))
        return "".join(out)

    def encode_markup(self, text: str) -> list[int]:
        """Ids of `decode`'s output: bare control names become their ids, escaped ones stay text."""
        ids: list[int] = []
        plain, pos = [], 0
        for match in _CONTROL_RE.finditer(text):
            slashes, name = match.group(1), match.group(2)
            plain.append(text[pos:match.start()])
            pos = match.end()
            if slashes:  # escaped: drop one backslash, keep the name as text
                plain.append(slashes[1:] + name)
                continue
            if "".join(plain):
                ids += self._sp.encode("".join(plain))
            plain = []
            ids.append(self._control[name])
        plain.append(text[pos:])
        if "".join(plain):
            ids += self._sp.encode("".join(plain))
        return ids


def escape(text: str) -> str:
    """Plain text with one backslash added before each control-token name it spells.

    A name preceded by n backslashes gets n + 1, so escaped text that itself
    contains backslashes still reads back exactly (`encode_markup`).
    """
    return _CONTROL_RE.sub(lambda m: "\\" + m.group(1) + m.group(2), text)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike | None = None, *,
                    model_type: str = "bpe") -> Tokenizer:
    """Trains a small sentencepiece model in-process and returns it (saved to `out_path` if given).

    Same scheme as the LLaMA-2/Mistral model: split digits, byte fallback,
    identity normalisation (so newlines and double spaces survive), unk=0,
    bos=1, eos=2, no pad. Texts are fed line by line so no piece ever spans
    a newline: step boundaries in a solution are always token boundaries.
    """
    if vocab_size < 300:
        raise ValueError(f"vocab_size {vocab_size} too small: byte fallback alone needs 256 + 3 pieces")

    def lines():
        for text in texts:
            for line in text.split("\n"):
                if line.strip():
                    yield line

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        split_digits=True, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        num_threads=1, minloglevel=2)
    tokenizer = Tokenizer(model.getvalue())
    if out_path is not None:
        with open(out_path, "wb") as f:
            f.write(tokenizer.serialized)
    return tokenizer
