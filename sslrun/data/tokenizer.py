"""CLIP's text tokenizer: lower-cased byte-level BPE with a 49,408-token vocabulary, offline.

The merges ship with sslrun (`bpe_simple_vocab_16e6.txt.gz`, OpenAI CLIP's vocabulary, MIT
licence), so nothing is fetched at run time, and the ids are CLIP's own: a text tower trained here
speaks the same tokens as OpenAI's and open_clip's. (CLIP also runs `ftfy.fix_text`, which repairs
mis-decoded unicode; we only unescape HTML and normalise whitespace, so text with mojibake may
tokenize differently.)

Encoding (Radford et al. 2019, sec. 2.2; Sennrich et al. 2016): clean and lower-case the text,
split it into words, numbers and punctuation runs, map each word's UTF-8 bytes to printable
unicode characters, mark the word's end with `</w>`, then apply the learned merges lowest rank
first. A caption becomes `[<start>] tokens [<end>]`, cut to the context length (the end token
kept) and padded with 0.
"""

import functools
import gzip
import html
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import regex
import torch

VOCAB_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
START, END = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes x 2 (word end or not) + merges + 2 special
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2  # what a text tower embeds, without reading the merges
END_ID = VOCAB_SIZE - 1  # the end token comes last; its position pools the text tower
WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@functools.lru_cache(maxsize=1)
def byte_characters() -> Dict[int, str]:
    """A printable unicode character for each byte (GPT-2's table): bytes that print as themselves
    keep their character, the others (controls, space) map to 256, 257, ... so BPE never sees
    whitespace or control characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    # The order (printable bytes first) is the order of the first 256 vocabulary entries.
    table = {byte: chr(byte) for byte in printable}
    table.update({byte: chr(256 + n) for n, byte in enumerate(others)})
    return table


class Tokenizer:
    """`tokenizer(["a photo of a cat."])` -> LongTensor [1, context_length] of CLIP token ids."""

    def __init__(self, context_length: int = 77):
        if context_length < 2:
            raise ValueError(f"context_length={context_length}: needs room for the start and end tokens")
        self.context_length = context_length
        with gzip.open(VOCAB_FILE, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : NUM_MERGES + 1]  # the first line is a header
        merges = [tuple(line.split()) for line in lines]
        characters = list(byte_characters().values())
        vocabulary = characters + [c + "</w>" for c in characters] + ["".join(m) for m in merges] + [START, END]
        self.encoder = {token: i for i, token in enumerate(vocabulary)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.merge_rank: Dict[Tuple[str, str], int] = {pair: i for i, pair in enumerate(merges)}
        self.start_id, self.end_id = self.encoder[START], self.encoder[END]
        self._cache: Dict[str, List[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @staticmethod
    def clean(text: str) -> str:
        return " ".join(html.unescape(html.unescape(text)).split()).lower()

    def _bpe(self, word: str) -> List[int]:
        """Token ids of one pre-tokenized word (its bytes already mapped to characters)."""
        if word in self._cache:
            return self._cache[word]
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = [(self.merge_rank.get(pair, NUM_MERGES), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
            rank, best = min(pairs)
            if rank == NUM_MERGES:
                break
            first, second = symbols[best], symbols[best + 1]
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence of the best pair, left to right
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = [self.encoder[s] for s in symbols]
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> List[int]:
        """Token ids of `text`, without start and end tokens."""
        table = byte_characters()
        ids: List[int] = []
        for word in WORD_PATTERN.findall(self.clean(text)):
            ids.extend(self._bpe("".join(table[b] for b in word.encode("utf-8"))))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The cleaned text back from ids (start, end and padding dropped)."""
        inverse = {c: b for b, c in byte_characters().items()}
        skip = {0, self.start_id, self.end_id}
        data = bytearray()
        for token in (self.decoder[int(i)] for i in ids if int(i) not in skip):
            word_end = token.endswith("</w>")
            data.extend(inverse[c] for c in token.removesuffix("</w>"))
            if word_end:
                data.extend(b" ")
        return data.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        tokens = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.start_id, *self.encode(text)][: self.context_length - 1] + [self.end_id]
            tokens[row, : len(ids)] = torch.tensor(ids)
        return tokens
