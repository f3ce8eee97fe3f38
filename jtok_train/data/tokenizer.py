"""Byte-level BPE tokenizer (HF ``tokenizers``) and the wrapper Megatron's datasets use.

What Megatron-Core's ``GPTDataset`` needs from ``GPTDatasetConfig.tokenizer`` (checked on 0.16.1, duck-typed,
no isinstance check):

- ``vocab_size`` (int): picks the token dtype code (uint16 up to 65,536 ids, else int32);
- ``eod`` (int): the end-of-document id, used for the loss mask / position-id resets;
- ``unique_identifiers`` (JSON-able dict): part of the dataset cache hash (``_key_config_attributes`` includes
  ``tokenizer``; ``json.dumps(..., default=lambda o: o.unique_identifiers)``). Ours includes the sha256 of
  tokenizer.json, so a retrained tokenizer never reuses stale index caches;
- optionally ``pad``: absent here on purpose, so Megatron uses its own pad id -1 (never a real token);
  ``special_tokens_dict`` / ``eos`` are probed with try/except.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Union

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

__all__ = ["EOD_TOKEN", "EOD_CANDIDATES", "Tokenizer", "train_tokenizer", "load_tokenizer", "padded_vocab_size",
           "find_eod_token"]

EOD_TOKEN = "<|endoftext|>"
# End-of-document tokens of common pretrained tokenizers, tried in this order when neither an explicit token nor
# a tokenizer_config.json ``eos_token`` names one: GPT-2/Qwen2/our BPE, Llama-3, Llama-2/T5/Mistral, Gemma.
EOD_CANDIDATES = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>")
CONFIG_NAME = "tokenizer_config.json"


def padded_vocab_size(tokenizer_vocab: int, divisible_by: int = 128, tensor_parallel: int = 1) -> int:
    """The model vocabulary Megatron would use: ``tokenizer_vocab`` rounded up to a multiple of
    ``divisible_by * tensor_parallel`` (Megatron-LM's ``--make-vocab-size-divisible-by``, default 128)."""
    multiple = max(1, divisible_by) * max(1, tensor_parallel)
    return -(-int(tokenizer_vocab) // multiple) * multiple


def _config_eos(tokenizer_file: Path) -> Optional[str]:
    """``eos_token`` of the tokenizer_config.json next to ``tokenizer_file`` (HF layout), if any."""
    cfg = tokenizer_file.parent / CONFIG_NAME
    if not cfg.is_file():
        return None
    try:
        eos = json.loads(cfg.read_text()).get("eos_token")
    except (ValueError, OSError, AttributeError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None


def find_eod_token(hf_tokenizer, path: Optional[Path] = None, eod_token: Optional[str] = None) -> str:
    """The end-of-document token: ``eod_token`` if given, else tokenizer_config.json's ``eos_token``, else the
    first of :data:`EOD_CANDIDATES` the vocabulary holds. Raises ValueError naming the file and the fix."""
    where = str(path) if path is not None else "<in memory>"
    if eod_token is not None:
        if hf_tokenizer.token_to_id(eod_token) is None:
            raise ValueError(f"tokenizer {where} has no token {eod_token!r}; pass --eod-token naming one of its "
                             "special tokens")
        return eod_token
    if path is not None:
        eos = _config_eos(Path(path))
        if eos is not None and hf_tokenizer.token_to_id(eos) is not None:
            return eos
    for cand in EOD_CANDIDATES:
        if hf_tokenizer.token_to_id(cand) is not None:
            return cand
    raise ValueError(f"tokenizer {where} has no end-of-document token (looked for {', '.join(EOD_CANDIDATES)} and a "
                     f"{CONFIG_NAME} eos_token next to it); pass --eod-token naming it")


class Tokenizer:
    """A loaded byte-level BPE tokenizer with the interface Megatron's GPT datasets expect.

    Attributes: ``vocab_size``, ``eod`` (id of ``<|endoftext|>``), ``path``, ``sha256``,
    ``unique_identifiers``. Methods: ``encode``, ``encode_batch``, ``decode``, plus the Megatron-style
    aliases ``tokenize`` / ``detokenize``.
    """

    def __init__(self, hf_tokenizer, path: Optional[Union[str, os.PathLike]] = None, sha256: str = "",
                 eod_token: Optional[str] = None):
        self._tok = hf_tokenizer
        self.path = str(path) if path is not None else None
        self.sha256 = sha256 or hashlib.sha256(hf_tokenizer.to_str().encode("utf-8")).hexdigest()
        self.eod_token: str = find_eod_token(hf_tokenizer, Path(path) if path is not None else None, eod_token)
        self.eod: int = int(hf_tokenizer.token_to_id(self.eod_token))
        # ids are 0..n-1 in every tokenizer we know; max id + 1 also covers one with a gap among its added tokens
        vocab = hf_tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(int(hf_tokenizer.get_vocab_size(with_added_tokens=True)),
                                   (max(vocab.values()) + 1) if vocab else 0)
        self.unique_identifiers = OrderedDict(
            [("class", "jtok_train.data.tokenizer.Tokenizer"), ("sha256", self.sha256),
             ("vocab_size", self.vocab_size), ("eod", self.eod)]
        )

    # Megatron probes these through getattr/try; ``eos`` is the same id as ``eod`` for a GPT corpus.
    @property
    def eos(self) -> int:
        return self.eod

    @property
    def hf(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` (no EOD appended)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Token ids of several texts, encoded in parallel by the Rust library."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    tokenize = encode
    detokenize = decode

    def id_to_token(self, i: int) -> Optional[str]:
        return self._tok.id_to_token(int(i))

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    out_path: Optional[Union[str, os.PathLike]] = None,
    min_frequency: int = 2,
    length: Optional[int] = None,
) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` and (when ``out_path`` is given) save it as tokenizer.json.

    The vocabulary holds ``<|endoftext|>`` (id 0), the 256 byte symbols, and merges up to ``vocab_size``
    (the result can be smaller on a tiny corpus). No normaliser, no prefix space: decode(encode(s)) == s for
    any string. Deterministic for a given input order.
    """
    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes + EOD + 1 merge), got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_as_strings(texts), trainer=trainer, length=length)
    sha = ""
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".tmp")
        tok.save(str(tmp))
        os.replace(tmp, out_path)
        sha = _file_sha256(out_path)
    return Tokenizer(tok, out_path, sha)


def _as_strings(texts: Iterable) -> Iterator[str]:
    for t in texts:
        yield t.text if hasattr(t, "text") else t


def load_tokenizer(path: Union[str, os.PathLike], eod_token: Optional[str] = None) -> Tokenizer:
    """Load a tokenizer.json: one :func:`train_tokenizer` wrote, or any Hugging Face ``tokenizers`` file (a
    directory holding one is accepted). The end-of-document token is ``eod_token``, else the ``eos_token`` of a
    tokenizer_config.json next to the file, else the first of :data:`EOD_CANDIDATES` it holds."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file {path} not found; build it with `jtok-data build --source ... --out {path.parent}`"
        )
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(
            f"tokenizer file {path} is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            f"rebuild it with `jtok-data build --out {path.parent} --force ...`"
        ) from None
    return Tokenizer(hf, path, _file_sha256(path), eod_token)
